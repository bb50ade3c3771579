"""Writes to the market-data store. Each function is one transaction and idempotent.

A module per what they write: ``bars_trades`` (the ingester's bars and trades: checks,
the appending COPY and the staged upsert), ``quotes`` (top of book, by the same COPY
paths), ``status`` (trading status changes), ``retention`` (deleting what the retention
policies no longer keep; saving a policy), ``api_tokens``, ``symbols`` (their active
flag) and ``feeds`` (feed status).
"""
