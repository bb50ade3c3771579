"""Writes of bars and trades (rows or columns): checked, then an appending COPY or a staged upsert, a batch at once.

The COPY machinery here (the session's staging tables, the appending copy and its hints)
is also what services.quotes writes quotes with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

import psycopg
from django.db import IntegrityError, connection, transaction

from ops import metrics

from ..columns import (
    BarColumns,
    C,
    QuoteColumns,
    TradeColumns,
    bar_spans,
    columns_of,
    copy_payload,
    first_invalid,
    last_per_key,
    narrow_check,
    spans,
)
from ..errors import (
    ERR_BAD_SIDE,
    ERR_BAD_TIMEFRAME_STORED,
    ERR_HIGH_LOW,
    ERR_NAIVE_DATETIME,
    ERR_OUT_OF_RANGE,
    ERR_UNDEFINED_PRICE,
    ValidationError,
)
from ..storage import BAR_TABLE, QUOTE_TABLE, TRADE_TABLE
from ..timeframes import STORED_TIMEFRAMES

UNDEF_PRICE = 2**63 - 1
INT64_MIN = -(2**63)


class BarIn(NamedTuple):
    """A bar to write; prices in Databento fixed-point (1e-9)."""

    symbol_id: int
    timeframe: str
    ts: datetime
    publisher_id: int
    open: int
    high: int
    low: int
    close: int
    volume: int
    anomalies: int = 0


class TradeIn(NamedTuple):
    """A trade to write; ``ordinal`` numbers prints that share every other key part."""

    symbol_id: int
    ts_event: datetime
    ts_recv: datetime
    publisher_id: int
    sequence: int
    ordinal: int
    price: int
    size: int
    side: str
    flags: int = 0


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one batch did: rows received, newly inserted, changed, and already present."""

    received: int
    inserted: int
    updated: int
    # (symbol_id, timeframe) -> the first and last bar time of the batch (bars only): what a
    # cache-version bump names as changed, so cached pages wholly before it stay valid.
    spans: Mapping[tuple[int, str], tuple[datetime, datetime]] = dataclass_field(default_factory=dict)

    @property
    def unchanged(self) -> int:
        """Rows that were already stored exactly as given (duplicates)."""
        return self.received - self.inserted - self.updated


BAR_COLUMNS = ("symbol_id", "timeframe", "ts", "publisher_id", "open", "high", "low", "close", "volume", "anomalies")
BAR_TYPES = ("int8", "text", "timestamptz", "int4", "int8", "int8", "int8", "int8", "int8", "int2")  # bench/upsert.py
BAR_KEY = ("symbol_id", "timeframe", "ts", "publisher_id")
BAR_VALUES = ("open", "high", "low", "close", "volume", "anomalies")

TRADE_COLUMNS = TradeIn._fields
TRADE_KEY = ("symbol_id", "ts_event", "publisher_id", "sequence", "ordinal")

_cols = ", ".join
BAR_NEWEST_SQL = f"""
SELECT k.symbol_id, k.timeframe,
       (SELECT max(b.ts) FROM {BAR_TABLE} b WHERE b.symbol_id = k.symbol_id AND b.timeframe = k.timeframe)
FROM unnest(%s::bigint[], %s::text[]) AS k(symbol_id, timeframe)
"""
TRADE_NEWEST_SQL = f"""
SELECT k.symbol_id, (SELECT max(t.ts_event) FROM {TRADE_TABLE} t WHERE t.symbol_id = k.symbol_id)
FROM unnest(%s::bigint[]) AS k(symbol_id)
"""
QUOTE_NEWEST_SQL = f"""
SELECT k.symbol_id, (SELECT max(q.ts_recv) FROM {QUOTE_TABLE} q WHERE q.symbol_id = k.symbol_id)
FROM unnest(%s::bigint[]) AS k(symbol_id)
"""
# The series of a symbol's trades and of its quotes in the append hints, beside its bars' timeframes.
TRADE_SERIES = "trades"
QUOTE_SERIES = "quotes"
SERIES_NEWEST_SQL = {TRADE_SERIES: TRADE_NEWEST_SQL, QUOTE_SERIES: QUOTE_NEWEST_SQL}
BAR_UPSERT_SQL = f"""
WITH written AS (
    INSERT INTO {BAR_TABLE} AS t ({_cols(BAR_COLUMNS)})
    SELECT {_cols(BAR_COLUMNS)} FROM bar_stage
    ON CONFLICT ({_cols(BAR_KEY)}) DO UPDATE SET
        {_cols(f"{c} = EXCLUDED.{c}" for c in BAR_VALUES)}, ingested_at = statement_timestamp()
    WHERE ({_cols(f"t.{c}" for c in BAR_VALUES)}) IS DISTINCT FROM ({_cols(f"EXCLUDED.{c}" for c in BAR_VALUES)})
    RETURNING xmax = 0 AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written
"""
TRADE_INSERT_SQL = f"""
INSERT INTO {TRADE_TABLE} ({_cols(TRADE_COLUMNS)})
SELECT {_cols(TRADE_COLUMNS)} FROM trade_stage
ON CONFLICT ({_cols(TRADE_KEY)}) DO NOTHING
"""
_TIMEFRAMES = frozenset(STORED_TIMEFRAMES)
STAGES = {
    "bar_stage": (BAR_TABLE, BAR_COLUMNS),
    "trade_stage": (TRADE_TABLE, TRADE_COLUMNS),
    "quote_stage": (QUOTE_TABLE, tuple(name for name, _, _ in QuoteColumns.FIELDS)),
}


def check_aware(field: str, value: datetime) -> None:
    """A ValidationError on ``field`` unless ``value`` is timezone-aware."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(ERR_NAIVE_DATETIME.format(field=field, value=value), field=field)


def _check_int(field: str, value: int, row: Any) -> None:
    if value == UNDEF_PRICE:
        raise ValidationError(ERR_UNDEFINED_PRICE.format(field=field, value=row), field=field)
    if not INT64_MIN <= value < UNDEF_PRICE:
        raise ValidationError(ERR_OUT_OF_RANGE.format(field=field, value=value), field=field)


def _check_bar(row: BarIn) -> None:
    """Raise the ValidationError for the first thing wrong with ``row``, in a fixed order of checks."""
    check_aware("ts", row.ts)
    if row.timeframe not in STORED_TIMEFRAMES:
        raise ValidationError(ERR_BAD_TIMEFRAME_STORED.format(value=row.timeframe), field="timeframe")
    for field in ("open", "high", "low", "close", "volume"):
        _check_int(field, getattr(row, field), row)
    if row.high < row.low:
        raise ValidationError(ERR_HIGH_LOW.format(field="high", high=row.high, low=row.low), field="high")


def _check_trade(row: TradeIn) -> None:
    """Raise the ValidationError for the first thing wrong with ``row``, in a fixed order of checks."""
    check_aware("ts_event", row.ts_event)
    check_aware("ts_recv", row.ts_recv)
    _check_int("price", row.price, row)
    _check_int("size", row.size, row)
    if row.side not in ("A", "B", "N"):
        raise ValidationError(ERR_BAD_SIDE.format(value=row.side), field="side")


def _checked(kind: type[C], rows: Sequence[Any] | C, check: Callable[[Any], None], row_type: Any) -> C:
    """Check every row; return them as columns. The first row that is wrong raises the
    ValidationError that names what (``check``, in its fixed order of checks), as rows did."""
    if isinstance(rows, kind):
        cols = rows
    else:
        try:
            cols = columns_of(kind, rows)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError, AttributeError):
            for row in rows:  # type: ignore[union-attr]  # a naive time, a number no column holds, a text of another width
                check(row)
            raise
    bad = first_invalid(cols)
    if bad is not None:
        check(row_type(*cols.row(bad)))
        narrow_check(cols, bad)
    return cols


def bars_checked(bars: Sequence[BarIn] | BarColumns) -> BarColumns:
    """Bars checked (see _checked), as columns."""
    return _checked(BarColumns, bars, _check_bar, BarIn)


def trades_checked(trades: Sequence[TradeIn] | TradeColumns) -> TradeColumns:
    """Trades checked (see _checked), as columns."""
    return _checked(TradeColumns, trades, _check_trade, TradeIn)


@contextmanager
def _staged(stage: str) -> Iterator[Any]:
    """One transaction (a savepoint inside a caller's) with an empty staging table; yield its cursor.

    The stage is a temporary table made once per database connection. ON COMMIT DELETE
    ROWS empties it at each commit for under 1% of the server's time; measured against it,
    a TRUNCATE per batch (a new file each time) cost 7% of bars/s and a DELETE per batch
    (dead rows piling up) 40%. Inside a caller's transaction there is no commit between
    two calls, so there it is truncated here.
    """
    commits = connection.get_autocommit() and not connection.in_atomic_block
    with transaction.atomic(), connection.cursor() as cursor:
        raw = connection.connection
        made: set[str] = raw.__dict__.setdefault("_marketdata_stages", set())
        if stage not in made:
            table, columns = STAGES[stage]
            cursor.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
                f"SELECT {_cols(columns)} FROM {table} WITH NO DATA"
            )
            # A column with a volatile default, never written or read, makes COPY insert
            # row by row: its multi-insert path builds one tuple slot per buffered row (up
            # to 1,000) for every COPY and drops them all at the end, which was half the
            # server's COPY time into this stage (measured: 2.2 -> 1.2 us/row of backend
            # CPU in 1,000-row batches). The stage is temporary (no WAL, local buffers), so
            # multi-insert has nothing to save here.
            cursor.execute(f"ALTER TABLE {stage} ADD COLUMN IF NOT EXISTS copy_row_by_row float8 DEFAULT random()")
            # The table exists for good only once this commits: a rollback removes it.
            transaction.on_commit(partial(made.add, stage))
        if not commits:
            cursor.execute(f"TRUNCATE {stage}")
        yield cursor


def _copy_payload(
    cursor: Any, table: str, columns: Sequence[str], payload: bytes, before_end: Callable[[], None] | None = None
) -> None:
    """COPY a whole binary payload (header and trailer included) into ``table``; ``before_end``
    is called once every row is sent, before the copy ends (an exception from it aborts the copy)."""
    with cursor.copy(f"COPY {table} ({_cols(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(payload)
        if before_end is not None:
            before_end()


# (database alias, symbol_id, timeframe) -> the newest bar time known to be stored. Only a
# hint for choosing the append path: the table's unique key is what keeps writes right,
# so a hint another process made stale costs at most one refused copy.
_newest: dict[tuple[str, int, str], datetime] = {}
_NOTHING = datetime.min.replace(tzinfo=UTC)


def _appends_only(cursor: Any, spans: dict[tuple[int, str], tuple[datetime, datetime]]) -> bool:
    """Tell whether every row is newer than anything stored for its (symbol, timeframe or a SERIES_NEWEST_SQL name)."""
    alias = connection.alias
    unknown = [key for key in spans if (alias, *key) not in _newest]
    bar_keys = [key for key in unknown if key[1] not in SERIES_NEWEST_SQL]
    if bar_keys:
        ids, tfs = zip(*bar_keys, strict=True)
        cursor.execute(BAR_NEWEST_SQL, [list(ids), list(tfs)])
        for symbol_id, timeframe, newest in cursor.fetchall():
            _newest[(alias, symbol_id, timeframe)] = newest or _NOTHING
    for name, sql in SERIES_NEWEST_SQL.items():
        series_ids = [symbol_id for symbol_id, series in unknown if series == name]
        if series_ids:
            cursor.execute(sql, [series_ids])
            for symbol_id, newest in cursor.fetchall():
                _newest[(alias, symbol_id, name)] = newest or _NOTHING
    return all(first > _newest[(alias, *key)] for key, (first, _) in spans.items())


def _remember(spans: dict[tuple[int, str], tuple[datetime, datetime]]) -> None:
    alias = connection.alias
    for key, (_, last) in spans.items():
        known = _newest.get((alias, *key), _NOTHING)
        _newest[(alias, *key)] = max(known, last)


def _append(
    spans: dict[tuple[int, str], tuple[datetime, datetime]],
    copy: Callable[[Any, Callable[[], None] | None], None],
    before_commit: Callable[[], None] | None,
) -> bool:
    """``copy(cursor, before_end)`` the rows straight into their table if each extends its
    series; tell whether it did.

    Rows sharing a key, or a row another writer stored meanwhile, make the unique key
    refuse the copy, which rolls back: False, and the caller takes the staged path.
    Inside a caller's transaction the copy has a savepoint. Outside one it is a statement
    of its own in autocommit, which PostgreSQL commits as the copy ends: no BEGIN and no
    COMMIT round trip (a savepoint's two had cost 7% of a batch's time), and
    ``before_commit`` runs once every row is sent, before the copy's end commits it.
    """
    try:
        if connection.in_atomic_block:
            with transaction.atomic(), connection.cursor() as cursor:
                if not _appends_only(cursor, spans):
                    return False
                copy(cursor.cursor, None)
                if before_commit is not None:
                    before_commit()
            return True
        with connection.cursor() as cursor:
            if not _appends_only(cursor, spans):
                return False
            copy(cursor.cursor, before_commit)
        return True
    except (IntegrityError, psycopg.errors.UniqueViolation):
        metrics.DB_APPEND_FALLBACKS.inc()
        return False


def bars_upsert(*, bars: Sequence[BarIn] | BarColumns, before_commit: Callable[[], None] | None = None) -> WriteResult:
    """Insert or update bars (rows or columns) in one transaction: COPY to a staging table, one
    INSERT ... ON CONFLICT.

    A batch that only extends each series (the live and replay case: every bar newer than
    the newest stored for its symbol and timeframe) cannot conflict, so it is copied
    straight into the table: half the server's work of the staged upsert (measured 84,000
    -> 157,000 bars/s in 1,000-row batches). Should another writer get there first, the
    unique key refuses the copy, which rolls back, and the batch takes the staged path.
    Rows are made columns first (marketdata/columns.py): one binary COPY payload.

    ``before_commit`` is called inside the transaction, once its rows are sent and before
    it commits (the appending copy: before the copy's end, which commits it; inside a
    caller's transaction: before its savepoint is released); an exception from it rolls
    the batch back. The ingester orders its two writers' commits with it (ingest/pipeline.py).
    """
    if not len(bars):
        return WriteResult(0, 0, 0)
    started = time.perf_counter()
    cols = bars_checked(bars)
    key_spans = bar_spans(cols)
    payload = copy_payload(cols)

    def copy(cursor: Any, end: Callable[[], None] | None) -> None:
        _copy_payload(cursor, BAR_TABLE, BAR_COLUMNS, payload, end)

    if _append(key_spans, copy, before_commit):
        result = WriteResult(received=len(cols), inserted=len(cols), updated=0, spans=key_spans)
    else:
        with _staged("bar_stage") as cursor:
            _copy_payload(cursor.cursor, "bar_stage", BAR_COLUMNS, copy_payload(last_per_key(cols)))
            cursor.execute(BAR_UPSERT_SQL)
            inserted, updated = cursor.fetchone()
            if before_commit is not None:
                before_commit()
        result = WriteResult(received=len(cols), inserted=inserted, updated=updated, spans=key_spans)
    transaction.on_commit(partial(_remember, key_spans))
    metrics.DB_WRITE_ROWS.labels(BAR_TABLE).inc(result.inserted + result.updated)
    metrics.DB_WRITE_LATENCY.labels(BAR_TABLE).observe(time.perf_counter() - started)
    return result


def trades_insert(
    *, trades: Sequence[TradeIn] | TradeColumns, before_commit: Callable[[], None] | None = None
) -> WriteResult:
    """Insert trades (rows or columns) in one transaction; a trade already stored is kept once.

    As for bars, a batch whose every trade is newer than the newest stored for its symbol
    (the live and replay case) is copied straight into the table; otherwise, or when the
    unique key refuses the copy, COPY to a staging table and INSERT ... ON CONFLICT DO
    NOTHING. Measured in 5,000-trade batches: 154,000 -> 241,000 trades/s, 5.3 -> 3.1 us of
    server CPU a trade. Rows are made columns first (marketdata/columns.py): one binary
    COPY payload built by array operations, not a row at a time. ``before_commit``: as for
    bars_upsert.
    """
    if not len(trades):
        return WriteResult(0, 0, 0)
    started = time.perf_counter()
    cols = trades_checked(trades)
    series = {(symbol_id, TRADE_SERIES): span for symbol_id, span in spans(cols.symbol_id, cols.ts_event).items()}
    return insert_once(
        cols, series, TRADE_TABLE, TRADE_COLUMNS, "trade_stage", TRADE_INSERT_SQL, before_commit, started
    )


def insert_once(
    cols: Any,
    series: dict[tuple[int, str], tuple[datetime, datetime]],
    table: str,
    columns: Sequence[str],
    stage: str,
    insert_sql: str,
    before_commit: Callable[[], None] | None,
    started: float,
) -> WriteResult:
    """Checked columns into ``table``, a row already stored kept once: trades' and quotes' write.

    The appending COPY when every row of ``series`` is newer than what is stored, else a COPY
    to ``stage`` and ``insert_sql`` (INSERT ... ON CONFLICT DO NOTHING); counted in the metrics.
    """
    payload = copy_payload(cols)

    def copy(cursor: Any, end: Callable[[], None] | None) -> None:
        _copy_payload(cursor, table, columns, payload, end)

    if _append(series, copy, before_commit):
        inserted = len(cols)
    else:
        with _staged(stage) as cursor:
            _copy_payload(cursor.cursor, stage, columns, payload)
            cursor.execute(insert_sql)
            inserted = cursor.rowcount
            if before_commit is not None:
                before_commit()
    transaction.on_commit(partial(_remember, series))
    metrics.DB_WRITE_ROWS.labels(table).inc(inserted)
    metrics.DB_WRITE_LATENCY.labels(table).observe(time.perf_counter() - started)
    return WriteResult(received=len(cols), inserted=inserted, updated=0)
