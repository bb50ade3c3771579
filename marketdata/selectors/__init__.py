"""Reads from the market-data store. Views, consumers and the ingester call these, nothing else.

A module per what they read: ``symbols`` (symbols and their references), ``bars`` (bar
pages, resampled or stored, and the stored ranges the ingester's deriver builds on),
``bar_text`` (a stored page as the JSON text PostgreSQL writes), ``daily`` (daily
summaries), ``trades``, ``leaderboard`` and ``feeds`` (feed status, where a feed
resumes); ``paging`` holds what the page reads share (limits, range checks, cursors).
"""
