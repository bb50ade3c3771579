"""Reads of bars: pages of a served timeframe (resampled from a stored base where needed),
the latest bar of symbols, and the stored ranges the ingester's deriver builds on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.utils import timezone

from ..errors import ERR_UNKNOWN_SYMBOL, UnknownSymbolError, ValidationError
from ..models import Symbol
from ..storage import BAR_TABLE
from ..timeframes import (
    DURATIONS,
    OHLCV,
    ORIGIN,
    STORED_TIMEFRAMES,
    bucket_ceil,
    bucket_start,
    source_candidates,
    validate_timeframe,
)
from .paging import DEFAULT_LIMIT, ERR_LIMIT, ERR_RANGE, MAX_LIMIT, aware, cursor_decode, cursor_encode
from .symbols import symbol_get

# How far a read first looks for `limit` buckets, in multiples of limit * timeframe; the
# window doubles until the page is full or the requested range is exhausted.
WINDOW_FACTOR = 2
MAX_WINDOW_STEPS = 12


@dataclass(frozen=True, slots=True)
class BarOut:
    """A served bar: ``ts`` is its open; ``final`` is False while it is still forming."""

    ts: datetime
    open: int
    high: int
    low: int
    close: int
    volume: int
    anomalies: int
    final: bool


@dataclass(frozen=True, slots=True)
class BarPage:
    """One page of bars and the cursor of the next page (None when there is none)."""

    symbol: str
    tf: str
    bars: list[BarOut]
    next_cursor: str | None


def stored_timeframes(*, symbol_id: int) -> list[str]:
    """Stored base timeframes that hold at least one bar of this symbol."""
    sql = " UNION ALL ".join(
        f"(SELECT %s::text FROM {BAR_TABLE} WHERE symbol_id = %s AND timeframe = %s LIMIT 1)"
        for _ in ("1s", "1m", "1h", "1d")
    )
    params: list[Any] = []
    for tf in ("1s", "1m", "1h", "1d"):
        params += [tf, symbol_id, tf]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [row[0] for row in cursor.fetchall()]


def source_timeframe(symbol_id: int, tf: str) -> str | None:
    stored = set(stored_timeframes(symbol_id=symbol_id))
    for candidate in source_candidates(tf):
        if candidate in stored:
            return candidate
    return None


# The bucket comes back as microseconds since ORIGIN: parsing 1,000 timestamps as text
# through Django's psycopg loader took ~7 ms of a 1,000-bar page, this takes ~0.5.
_AGG_SELECT = """
SELECT (extract(epoch FROM {bucket} - %(origin)s) * 1000000)::bigint,
       (array_agg(open ORDER BY ts, publisher_id))[1],
       max(high), min(low),
       (array_agg(close ORDER BY ts DESC, publisher_id DESC))[1],
       sum(volume)::bigint, bit_or(anomalies)::int
FROM marketdata_bar
WHERE symbol_id = %(symbol_id)s AND timeframe = %(base)s AND ts >= %(lo)s AND ts < %(hi)s {anomaly_filter}
GROUP BY {bucket} ORDER BY {bucket} {direction} LIMIT %(limit)s
"""


def _aggregate(
    *, symbol_id: int, base: str, tf: str, lo: datetime, hi: datetime, limit: int, exclude: bool, descending: bool
) -> list[tuple]:
    """Bars of ``tf`` built from ``base`` rows with lo <= ts < hi (one row per bucket)."""
    # Same-timeframe reads group by ts itself, so PostgreSQL streams them off the
    # primary key; several publishers' bars of one ts are consolidated by the same rule.
    bucket = "ts" if base == tf else "date_bin(%(stride)s, ts, %(origin)s)"
    sql = _AGG_SELECT.format(
        bucket=bucket,
        anomaly_filter="AND anomalies = 0" if exclude else "",
        direction="DESC" if descending else "ASC",
    )
    params: dict[str, Any] = {
        "symbol_id": symbol_id,
        "base": base,
        "lo": lo,
        "hi": hi,
        "limit": limit,
        "stride": DURATIONS[tf],
        "origin": ORIGIN,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    micro = timedelta(microseconds=1)
    return [(ORIGIN + r[0] * micro, *r[1:]) for r in rows]


def _span(symbol_id: int, base: str) -> tuple[datetime | None, datetime | None]:
    """Open times of the first and the last stored ``base`` bar of a symbol (two index probes)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT min(ts), max(ts) FROM {BAR_TABLE} WHERE symbol_id = %s AND timeframe = %s", [symbol_id, base]
        )
        first, last = cursor.fetchone()
    return first, last


def _bars_window(
    *,
    symbol_id: int,
    base: str,
    tf: str,
    lo: datetime | None,
    hi: datetime,
    limit: int,
    exclude: bool,
    descending: bool,
) -> list[tuple]:
    """Up to ``limit`` buckets in [lo, hi), reading a growing window so a page never scans all history.

    The window starts at the stored bars' edge (not at a far-off start or end), doubles
    while the page is short, and its last step covers the whole rest of the range, so a
    page is never cut short by gaps in the data.
    """
    if base == tf:
        return _aggregate(
            symbol_id=symbol_id, base=base, tf=tf, lo=lo or ORIGIN - timedelta(days=365 * 100), hi=hi,
            limit=limit, exclude=exclude, descending=descending,
        )  # fmt: skip
    stride = DURATIONS[tf]
    first, last = _span(symbol_id, base)
    if first is None or last is None:
        return []
    # Clamp to the buckets that hold stored bars.
    hi = min(hi, bucket_start(last, tf) + stride)
    lo = max(lo, bucket_start(first, tf)) if lo is not None else bucket_start(first, tf)
    if lo >= hi:
        return []
    width = stride * limit * WINDOW_FACTOR
    rows: list[tuple] = []
    for step in range(MAX_WINDOW_STEPS):
        whole = step == MAX_WINDOW_STEPS - 1
        if descending:  # the latest buckets before hi
            w_lo, w_hi = (lo if whole else max(lo, hi - width)), hi
            exhausted = w_lo <= lo
        else:
            w_lo, w_hi = lo, (hi if whole else min(lo + width, hi))
            exhausted = w_hi >= hi
        rows = _aggregate(
            symbol_id=symbol_id, base=base, tf=tf, lo=w_lo, hi=w_hi, limit=limit, exclude=exclude,
            descending=descending,
        )  # fmt: skip
        if len(rows) >= limit or exhausted:
            break
        width *= 2
    return rows


def _to_bar(row: tuple, tf: str, base: str, now: datetime) -> BarOut:
    bucket, open_, high, low, close, volume, anomalies = row
    # A stored bar is final; a resampled one is final once its bucket has closed.
    final = True if base == tf else bucket + DURATIONS[tf] <= now
    return BarOut(bucket, open_, high, low, close, volume, anomalies, final)


class PagePlan(NamedTuple):
    """What a bar page reads: the bucket range [lo, hi) of ``base`` rows, newest first when ``descending``."""

    symbol_id: int
    ticker: str
    now: datetime
    base: str
    lo: datetime | None
    hi: datetime
    descending: bool


def page_plan(
    *,
    ticker: str,
    tf: str,
    start: datetime | None,
    end: datetime | None,
    limit: int,
    cursor: str | None,
    symbol_id: int | None = None,
    base: str | None = None,
) -> PagePlan | BarPage:
    """bar_list's checks and range; an (empty) BarPage when there is nothing to read.

    A caller that passes ``base`` takes it as the source timeframe without asking the
    database (bar_page_text's guess, which it checks when the page comes back empty).
    """
    validate_timeframe(tf)
    aware("start", start)
    aware("end", end)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(ERR_LIMIT.format(max=MAX_LIMIT, value=limit), field="limit")
    if symbol_id is None:
        symbol_id, ticker = (symbol := symbol_get(ticker=ticker)).pk, symbol.ticker
    now = timezone.now()
    end = end or now + DURATIONS[tf]
    if cursor is not None:
        start = cursor_decode(cursor) + timedelta(microseconds=1)
    if start is not None and start >= end:
        if cursor is not None:
            return BarPage(ticker, tf, [], None)
        raise ValidationError(ERR_RANGE, field="start")
    if base is None:
        base = source_timeframe(symbol_id, tf)
    if base is None:
        return BarPage(ticker, tf, [], None)
    # Only whole buckets inside [start, end): align both edges up to bucket opens.
    hi = bucket_ceil(end, tf)
    lo = bucket_ceil(start, tf) if start is not None else None
    return PagePlan(symbol_id, ticker, now, base, lo, hi, lo is None)


def bar_list(
    *,
    ticker: str,
    tf: str,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    exclude_anomalies: bool = False,
) -> BarPage:
    """Bars of a symbol with start <= ts < end, ascending.

    With neither start nor cursor, the latest ``limit`` bars before ``end`` (a chart's
    first load); otherwise a keyset page forward from start (or the cursor), with the
    cursor of the next page. Timeframes not stored are resampled from the finest
    stored base (see marketdata.timeframes).
    """
    plan = page_plan(ticker=ticker, tf=tf, start=start, end=end, limit=limit, cursor=cursor)
    if isinstance(plan, BarPage):
        return plan
    symbol_id, ticker, now, base, lo, hi, descending = plan
    rows = _bars_window(
        symbol_id=symbol_id, base=base, tf=tf, lo=lo, hi=hi, limit=limit + 1,
        exclude=exclude_anomalies, descending=descending,
    )  # fmt: skip
    if descending:
        rows = rows[:limit][::-1]
        next_cursor = None
    else:
        has_more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = cursor_encode(rows[-1][0]) if has_more and rows else None
    return BarPage(ticker, tf, [_to_bar(r, tf, base, now) for r in rows], next_cursor)


def latest_bars(*, tickers: Sequence[str], tf: str) -> dict[str, BarOut | None]:
    """The most recent bar of each ticker (None where it has none); unknown tickers raise."""
    validate_timeframe(tf)
    found = {s.ticker: s for s in Symbol.objects.filter(ticker__in=list(tickers))}
    missing = [t for t in tickers if t not in found]
    if missing:
        raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=missing[0]), field="symbols")
    out: dict[str, BarOut | None] = {}
    for ticker in tickers:
        page = bar_list(ticker=ticker, tf=tf, limit=1)
        out[ticker] = page.bars[-1] if page.bars else None
    return out


# What the ingester's deriver builds on: stored bars of the streams a batch shows first.

LOAD_CHUNK = 500  # (symbol, range)s per query of bar_ranges_stored
LOAD_SQL = """
SELECT r.k, b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.publisher_id
FROM unnest(%s::bigint[], %s::timestamptz[], %s::timestamptz[], %s::int[]) AS r(symbol_id, lo, hi, k)
JOIN marketdata_bar b ON b.symbol_id = r.symbol_id AND b.timeframe = %s AND b.ts >= r.lo AND b.ts < r.hi
"""


def bar_range_stored(*, symbol_id: int, base: str, start: datetime, end: datetime) -> list[OHLCV]:
    """Stored ``base`` bars of a symbol in [start, end)."""
    return bar_ranges_stored(base=base, wanted=[(symbol_id, start, end)])[0]


def bar_ranges_stored(*, base: str, wanted: Sequence[tuple[int, datetime, datetime]]) -> list[list[OHLCV]]:
    """Stored ``base`` bars of each (symbol_id, start, end), in [start, end): one query per LOAD_CHUNK.

    From the primary (raw SQL on ``default`` is never routed to a replica): the bars must
    include the batch just committed there, which a lagging replica may not have yet.
    """
    assert base in STORED_TIMEFRAMES
    out: list[list[OHLCV]] = [[] for _ in wanted]
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        for at in range(0, len(wanted), LOAD_CHUNK):
            chunk = wanted[at : at + LOAD_CHUNK]
            ids, los, his = (list(column) for column in zip(*chunk, strict=True))
            cursor.execute(LOAD_SQL, [ids, los, his, list(range(at, at + len(chunk))), base])
            for k, *values in cursor.fetchall():
                out[k].append(OHLCV(*values))
    return out
