"""Writes of trading status changes (Databento's ``status`` schema): one INSERT per batch, idempotent."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import NamedTuple

from django.db import connection, transaction

from ops import metrics

from ..storage import STATUS_TABLE
from .bars_trades import WriteResult, check_aware


class StatusIn(NamedTuple):
    """A status change to write: Databento's codes, and None where a flag is unknown."""

    symbol_id: int
    ts_recv: datetime
    ts_event: datetime | None
    publisher_id: int
    ordinal: int
    action: int
    reason: int
    trading_event: int
    is_trading: bool | None
    is_quoting: bool | None
    is_short_sell_restricted: bool | None


STATUS_COLUMNS = StatusIn._fields
STATUS_TYPES = ("int8", "timestamptz", "timestamptz", "int4", "int2", "int4", "int4", "int4", "bool", "bool", "bool")
# Status changes are a few per instrument and day: one statement over arrays, no COPY.
STATUS_INSERT_SQL = f"""
INSERT INTO {STATUS_TABLE} ({", ".join(STATUS_COLUMNS)})
SELECT * FROM unnest({", ".join(f"%s::{t}[]" for t in STATUS_TYPES)})
ON CONFLICT (symbol_id, ts_recv, publisher_id, ordinal) DO NOTHING
"""


def status_changes_insert(
    *, changes: Sequence[StatusIn], before_commit: Callable[[], None] | None = None
) -> WriteResult:
    """Insert status changes in one transaction; a change already stored is kept once.

    ``before_commit`` is called inside the transaction, before it commits (the ingester's
    commit order, as bars_upsert).
    """
    if not changes:
        return WriteResult(0, 0, 0)
    started = time.perf_counter()
    for change in changes:
        check_aware("ts_recv", change.ts_recv)
        if change.ts_event is not None:
            check_aware("ts_event", change.ts_event)
    columns = [list(values) for values in zip(*changes, strict=True)]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(STATUS_INSERT_SQL, columns)
        inserted = cursor.rowcount
        if before_commit is not None:
            before_commit()
    metrics.DB_WRITE_ROWS.labels(STATUS_TABLE).inc(inserted)
    metrics.DB_WRITE_LATENCY.labels(STATUS_TABLE).observe(time.perf_counter() - started)
    return WriteResult(received=len(changes), inserted=inserted, updated=0)
