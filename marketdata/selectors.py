"""Reads from the market-data store. Views and consumers call these, nothing else."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any, NamedTuple

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import Max, Q
from django.utils import timezone

from .errors import ERR_NAIVE_DATETIME, ERR_UNKNOWN_SYMBOL, UnknownSymbolError, ValidationError
from .models import Bar, FeedStatus, Symbol, Trade
from .storage import BAR_TABLE, CAGG, timescaledb_enabled
from .timeframes import (
    ANOMALY_NAMES,
    DURATIONS,
    OHLCV,
    ORIGIN,
    SCHEMA_TIMEFRAMES,
    STORED_TIMEFRAMES,
    bucket_ceil,
    bucket_start,
    source_candidates,
    validate_timeframe,
)
from .timeparse import TIME_MAX, TIME_MIN
from .wire import bar_json

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000
# How far a read first looks for `limit` buckets, in multiples of limit * timeframe; the
# window doubles until the page is full or the requested range is exhausted.
WINDOW_FACTOR = 2
MAX_WINDOW_STEPS = 12

ERR_LIMIT = "limit must be an integer between 1 and {max}, got {value!r}"
ERR_CURSOR = "cursor is not one this service issued"
ERR_RANGE = "start must be before end"


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


def symbol_get(*, ticker: str) -> Symbol:
    """Return the symbol with this ticker or raise UnknownSymbolError."""
    try:
        return Symbol.objects.get(ticker=ticker)
    except Symbol.DoesNotExist:
        raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=ticker), field="symbol") from None


def _aware(field: str, value: datetime | None) -> datetime | None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValidationError(ERR_NAIVE_DATETIME.format(field=field, value=value), field=field)
    return value


def cursor_encode(ts: datetime) -> str:
    """Opaque cursor: the open time of the last bar served, in microseconds."""
    micros = (ts - ORIGIN) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"v1:{micros}".encode()).decode().rstrip("=")


def cursor_text(cursor: str) -> str:
    """The text inside an opaque cursor; ValueError unless it is strict unpadded base64url of UTF-8."""
    # urlsafe_b64decode skips characters outside the alphabet: "AAPL" and "AA\x01PL" would be one cursor.
    if not _CURSOR_RE.fullmatch(cursor):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not base64url of UTF-8") from None


_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]*")
_BAR_CURSOR_RE = re.compile(r"v1:(-?[0-9]{1,20})")
# The open times a cursor may carry: those of the times a client may give (marketdata.timeparse).
_MICROS_MIN = (TIME_MIN - ORIGIN) // timedelta(microseconds=1)
_MICROS_MAX = (TIME_MAX - ORIGIN) // timedelta(microseconds=1)


def _cursor_ts(micros: str) -> datetime:
    value = int(micros)
    if not _MICROS_MIN <= value <= _MICROS_MAX:
        raise ValueError("out of range")
    return ORIGIN + timedelta(microseconds=value)


def cursor_decode(cursor: str) -> datetime:
    """Inverse of cursor_encode; a foreign cursor is a ValidationError on ``cursor``."""
    try:
        match = _BAR_CURSOR_RE.fullmatch(cursor_text(cursor))
        if match is None:
            raise ValueError("not a bar cursor")
        return _cursor_ts(match[1])
    except ValueError:
        raise ValidationError(ERR_CURSOR, field="cursor") from None


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


def _source_timeframe(symbol_id: int, tf: str) -> str | None:
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


class _PagePlan(NamedTuple):
    """What a bar page reads: the bucket range [lo, hi) of ``base`` rows, newest first when ``descending``."""

    symbol_id: int
    ticker: str
    now: datetime
    base: str
    lo: datetime | None
    hi: datetime
    descending: bool


def _page_plan(
    *,
    ticker: str,
    tf: str,
    start: datetime | None,
    end: datetime | None,
    limit: int,
    cursor: str | None,
    symbol_id: int | None = None,
    base: str | None = None,
) -> _PagePlan | BarPage:
    """bar_list's checks and range; an (empty) BarPage when there is nothing to read.

    A caller that passes ``base`` takes it as the source timeframe without asking the
    database (bar_page_text's guess, which it checks when the page comes back empty).
    """
    validate_timeframe(tf)
    _aware("start", start)
    _aware("end", end)
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
        base = _source_timeframe(symbol_id, tf)
    if base is None:
        return BarPage(ticker, tf, [], None)
    # Only whole buckets inside [start, end): align both edges up to bucket opens.
    hi = bucket_ceil(end, tf)
    lo = bucket_ceil(start, tf) if start is not None else None
    return _PagePlan(symbol_id, ticker, now, base, lo, hi, lo is None)


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
    plan = _page_plan(ticker=ticker, tf=tf, start=start, end=end, limit=limit, cursor=cursor)
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


@dataclass(frozen=True, slots=True)
class BarPageText:
    """A page of bars as JSON text: ``bars`` is the bar objects joined by commas (marketdata.wire.bar_json's text)."""

    symbol: str
    tf: str
    base: str | None
    bars: str
    count: int
    all_final: bool
    next_cursor: str | None


def _price_sql(column: str) -> str:
    # Exact: bigint times a numeric of scale 9 is a numeric of scale 9; trim_scale drops trailing zeros.
    return f"trim_scale({column} * 0.000000001)::text"


def _anomalies_sql(column: str) -> str:
    # As wire.bar_json: no key when 0, else the names of the known bits set (maybe none).
    names = ", ".join(f"""CASE WHEN {column} & {bit} <> 0 THEN '"{name}"' END""" for bit, name in ANOMALY_NAMES.items())
    return f"""CASE WHEN {column} = 0 THEN '' ELSE ',"anomalies":[' || concat_ws(',', {names}) || ']' END"""


# The page's bars as wire.bar_json writes them, built by PostgreSQL: a 1,000-bar page cost
# ~8 ms of Python (a datetime, a BarOut and an f-string per bar) and holds the GIL. Bars of
# one ts from several publishers are consolidated as _AGG_SELECT does (open of the lowest
# publisher, close of the highest), but with plain aggregates and an index probe only for
# such a ts: the ordered array_agg sorted every group, 1.9 of the statement's 4.5 ms. The time
# is one to_char with the microseconds, dropped when they are all zero (as ts_text does): an
# extract and a second to_char cost ~0.2 ms a page.
_PAGE_TEXT_SQL = """
SELECT count(*), string_agg(j, ',' ORDER BY b) FILTER (WHERE n <= %(limit)s),
       max(b) FILTER (WHERE n <= %(limit)s)
FROM (
  SELECT b, row_number() OVER (ORDER BY b {direction}) AS n,
         '{{"ts":"' || replace(to_char(b AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), '.000000', '')
         || 'Z","open":' || {open} || ',"high":' || {high} || ',"low":' || {low} || ',"close":' || {close}
         || ',"volume":' || v::text || ',"final":true' || {anomalies} || '}}' AS j
  FROM (
    SELECT b, h, l, v, a,
           CASE WHEN k = 1 THEN o ELSE (
             SELECT open FROM marketdata_bar x
             WHERE x.symbol_id = %(symbol_id)s AND x.timeframe = %(base)s AND x.ts = g.b {anomaly_filter_x}
             ORDER BY x.publisher_id LIMIT 1) END AS o,
           CASE WHEN k = 1 THEN c ELSE (
             SELECT close FROM marketdata_bar x
             WHERE x.symbol_id = %(symbol_id)s AND x.timeframe = %(base)s AND x.ts = g.b {anomaly_filter_x}
             ORDER BY x.publisher_id DESC LIMIT 1) END AS c
    FROM (
      SELECT ts AS b, count(*) AS k, min(open) AS o, max(high) AS h, min(low) AS l, min(close) AS c,
             sum(volume)::bigint AS v, bit_or(anomalies)::int AS a
      FROM marketdata_bar
      WHERE symbol_id = %(symbol_id)s AND timeframe = %(base)s AND ts >= %(lo)s AND ts < %(hi)s {anomaly_filter}
      GROUP BY ts ORDER BY ts {direction} LIMIT %(limit)s + 1
    ) g
  ) p
) x
"""


def bar_page_text(
    *,
    ticker: str,
    tf: str,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    exclude_anomalies: bool = False,
    symbol_id: int | None = None,
) -> BarPageText:
    """bar_list's page as JSON text, the same bytes that joining wire.bar_json of its bars gives.

    Stored timeframes are written by PostgreSQL in one statement; resampled ones go
    through bar_list (their bars may be forming, and their reads grow a window). A caller
    that knows the ticker's ``symbol_id`` (a look-up it keeps) saves the symbol query.
    """
    # A stored timeframe is its own source whenever the symbol has a bar of it (source_candidates
    # puts it first), which a page with a bar proves: the look-up of the symbol's stored
    # timeframes (a second statement and round trip) is only needed when the page is empty.
    guess = tf if tf in STORED_TIMEFRAMES else None
    plan = _page_plan(
        ticker=ticker, tf=tf, start=start, end=end, limit=limit, cursor=cursor, symbol_id=symbol_id, base=guess
    )
    if isinstance(plan, BarPage):
        return BarPageText(plan.symbol, tf, None, "", 0, True, plan.next_cursor)
    symbol_id, ticker, _, base, lo, hi, descending = plan
    if base != tf:
        return _resampled_text(ticker=ticker, tf=tf, base=base, start=start, end=end, limit=limit, cursor=cursor,
                               exclude_anomalies=exclude_anomalies)  # fmt: skip
    sql = _page_text_sql(descending, exclude_anomalies)
    lo = lo or ORIGIN - timedelta(days=365 * 100)
    params: dict[str, Any] = {"symbol_id": symbol_id, "base": base, "lo": lo, "hi": hi, "limit": limit}
    with connection.cursor() as cur:
        cur.execute(sql, params)
        count, text, last = cur.fetchone()
    if not count and guess is not None:
        # Empty: either no bars in the range, or no bars of tf at all (then a finer base serves it).
        source = _source_timeframe(symbol_id, tf)
        if source is None:
            return BarPageText(ticker, tf, None, "", 0, True, None)
        if source != tf:
            return _resampled_text(ticker=ticker, tf=tf, base=source, start=start, end=end, limit=limit, cursor=cursor,
                                   exclude_anomalies=exclude_anomalies)  # fmt: skip
    next_cursor = cursor_encode(last) if not descending and count > limit else None
    return BarPageText(ticker, tf, base, text or "", min(count, limit), True, next_cursor)


def _resampled_text(
    *,
    ticker: str,
    tf: str,
    base: str,
    start: datetime | None,
    end: datetime | None,
    limit: int,
    cursor: str | None,
    exclude_anomalies: bool,
) -> BarPageText:
    """A resampled page through bar_list (its bars may be forming, and its reads grow a window)."""
    page = bar_list(ticker=ticker, tf=tf, start=start, end=end, limit=limit, cursor=cursor,
                    exclude_anomalies=exclude_anomalies)  # fmt: skip
    text = ",".join(bar_json(b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.final) for b in page.bars)
    return BarPageText(page.symbol, tf, base, text, len(page.bars), all(b.final for b in page.bars), page.next_cursor)


@lru_cache(maxsize=4)
def _page_text_sql(descending: bool, exclude: bool) -> str:
    return _PAGE_TEXT_SQL.format(
        direction="DESC" if descending else "ASC",
        anomaly_filter="AND anomalies = 0" if exclude else "",
        anomaly_filter_x="AND x.anomalies = 0" if exclude else "",
        open=_price_sql("o"), high=_price_sql("h"), low=_price_sql("l"), close=_price_sql("c"),
        anomalies=_anomalies_sql("a"),
    )  # fmt: skip


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


@dataclass(frozen=True, slots=True)
class DailySummary:
    """One symbol's day: OHLCV over the day's 1m bars."""

    symbol_id: int
    day: datetime
    bar: OHLCV


DAILY_SQL_PLAIN = f"""
SELECT symbol_id, date_bin(INTERVAL '1 day', ts, %(origin)s) AS day,
       (array_agg(open ORDER BY ts, publisher_id))[1], max(high), min(low),
       (array_agg(close ORDER BY ts DESC, publisher_id DESC))[1], sum(volume)::bigint, bit_or(anomalies)::int
FROM {BAR_TABLE}
WHERE timeframe = '1m' AND symbol_id = ANY(%(ids)s) AND ts >= %(lo)s AND ts < %(hi)s
GROUP BY symbol_id, day ORDER BY symbol_id, day
"""
DAILY_SQL_TIMESCALE = f"""
SELECT symbol_id, day, open, high, low, close, volume::bigint, anomalies::int
FROM {CAGG}
WHERE symbol_id = ANY(%(ids)s) AND day >= %(lo)s AND day < %(hi)s
ORDER BY symbol_id, day
"""


def daily_summary(*, symbol_ids: Sequence[int], start: datetime, end: datetime) -> list[DailySummary]:
    """Daily OHLCV from 1m bars for days in [start, end): the continuous aggregate on TimescaleDB, a query elsewhere."""
    _aware("start", start)
    _aware("end", end)
    sql = DAILY_SQL_TIMESCALE if timescaledb_enabled() else DAILY_SQL_PLAIN
    params: dict[str, Any] = {
        "ids": list(symbol_ids),
        "lo": bucket_ceil(start, "1d"),
        "hi": bucket_ceil(end, "1d"),
        "origin": ORIGIN,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return [
        DailySummary(sid, day, OHLCV(ts=day, open=o, high=h, low=low, close=c, volume=v, anomalies=a or 0))
        for sid, day, o, h, low, c, v, a in rows
    ]


# TRADES

ERR_TRADE_CURSOR = "cursor is not a trades cursor this service issued"
_TRADE_CURSOR_RE = re.compile(r"t1:(-?[0-9]{1,20}):(-?[0-9]{1,20}):(-?[0-9]{1,20}):(-?[0-9]{1,20})")


@dataclass(frozen=True, slots=True)
class TradeOut:
    """A served trade; (ts_event, publisher_id, sequence, ordinal) is its place in the order."""

    ts_event: datetime
    publisher_id: int
    sequence: int
    ordinal: int
    price: int
    size: int
    side: str


@dataclass(frozen=True, slots=True)
class TradePage:
    """One page of trades and the cursor of the next page (None when there is none)."""

    symbol: str
    trades: list[TradeOut]
    next_cursor: str | None


TradeKey = tuple[datetime, int, int, int]


def trade_cursor_encode(trade: TradeOut) -> str:
    """Opaque cursor: the full key of the last trade served (prints may share a microsecond)."""
    micros = (trade.ts_event - ORIGIN) // timedelta(microseconds=1)
    raw = f"t1:{micros}:{trade.publisher_id}:{trade.sequence}:{trade.ordinal}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def trade_cursor_decode(cursor: str) -> TradeKey:
    """Inverse of trade_cursor_encode; anything else is a ValidationError on ``cursor``."""
    try:
        match = _TRADE_CURSOR_RE.fullmatch(cursor_text(cursor))
        if match is None:
            raise ValueError("not a trades cursor")
        key = _cursor_ts(match[1]), int(match[2]), int(match[3]), int(match[4])
    except ValueError:
        raise ValidationError(ERR_TRADE_CURSOR, field="cursor") from None
    # Each within its column (int, bigint, smallint): PostgreSQL refuses a key it cannot compare.
    if not (-(2**31) <= key[1] < 2**31 and -(2**63) <= key[2] < 2**63 and -(2**15) <= key[3] < 2**15):
        raise ValidationError(ERR_TRADE_CURSOR, field="cursor")
    return key


_TRADE_SELECT = """
SELECT ts_event, publisher_id, sequence, ordinal, price, size, side
FROM marketdata_trade
WHERE symbol_id = %(symbol_id)s {where}
ORDER BY ts_event {direction}, publisher_id {direction}, sequence {direction}, ordinal {direction}
LIMIT %(limit)s
"""


def trade_list(
    *,
    ticker: str,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> TradePage:
    """Trades of a symbol with start <= ts_event < end, ascending by their key.

    With neither start nor cursor, the latest ``limit`` trades before ``end``; otherwise
    a keyset page forward from start (or after the cursor's trade), with the next cursor.
    """
    _aware("start", start)
    _aware("end", end)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise ValidationError(ERR_LIMIT.format(max=MAX_LIMIT, value=limit), field="limit")
    after = trade_cursor_decode(cursor) if cursor is not None else None
    if after is None and start is not None and end is not None and start >= end:
        raise ValidationError(ERR_RANGE, field="start")
    symbol = symbol_get(ticker=ticker)
    where: list[str] = []
    params: dict[str, Any] = {"symbol_id": symbol.pk, "limit": limit + 1}
    if after is not None:
        # A row comparison on the primary key's own columns: an index range, not a filter.
        where.append(
            "(symbol_id, ts_event, publisher_id, sequence, ordinal)"
            " > (%(symbol_id)s, %(a_ts)s, %(a_pub)s, %(a_seq)s, %(a_ord)s)"
        )
        params.update(a_ts=after[0], a_pub=after[1], a_seq=after[2], a_ord=after[3])
    if start is not None:
        where.append("ts_event >= %(start)s")
        params["start"] = start
    if end is not None:
        where.append("ts_event < %(end)s")
        params["end"] = end
    descending = start is None and after is None
    sql = _TRADE_SELECT.format(where="".join(f" AND {w}" for w in where), direction="DESC" if descending else "ASC")
    with connection.cursor() as db:
        db.execute(sql, params)
        rows = [TradeOut(*row) for row in db.fetchall()]
    if descending:
        return TradePage(symbol.ticker, rows[:limit][::-1], None)
    has_more = len(rows) > limit
    rows = rows[:limit]
    return TradePage(symbol.ticker, rows, trade_cursor_encode(rows[-1]) if has_more and rows else None)


# LEADERBOARD

LEADERBOARD_METRICS = ("volume", "change_pct")
LEADERBOARD_DEFAULT_LIMIT = 10
LEADERBOARD_MAX_LIMIT = 1_000
ERR_METRIC = "unknown metric {value!r}: expected one of " + " ".join(LEADERBOARD_METRICS)


@dataclass(frozen=True, slots=True)
class LeaderboardRow:
    """A symbol's latest ``tf`` bar, the close before it, and its change in percent."""

    rank: int
    ticker: str
    dataset: str
    bar: BarOut
    prev_close: int | None
    change_pct: Decimal | None


# Per active symbol: the first source timeframe holding its bars (the rule bar_list
# follows), the bucket of its latest bar, that bucket aggregated by the one rule, and
# the last close before the bucket (the previous bar's close). One statement, a few
# primary-key probes per symbol.
_LEADERBOARD_SQL = f"""
WITH src AS (
    SELECT s.id, s.ticker, s.dataset, c.base, date_bin(%(stride)s, c.last_ts, %(origin)s) AS bucket
    FROM marketdata_symbol s
    CROSS JOIN LATERAL (
        SELECT cand.base, m.last_ts
        FROM unnest(%(candidates)s::text[]) WITH ORDINALITY AS cand(base, n)
        CROSS JOIN LATERAL (
            SELECT max(b.ts) AS last_ts FROM {BAR_TABLE} b WHERE b.symbol_id = s.id AND b.timeframe = cand.base
        ) m
        WHERE m.last_ts IS NOT NULL
        ORDER BY cand.n LIMIT 1
    ) c
    WHERE {{symbol_filter}}
), board AS (
    SELECT src.id, src.ticker, src.dataset, src.base, src.bucket, agg.open, agg.high, agg.low, agg.close, agg.volume,
           agg.anomalies, prev.close AS prev_close,
           round((agg.close - prev.close)::numeric * 100 / NULLIF(prev.close, 0), 4) AS change_pct
    FROM src
    CROSS JOIN LATERAL (
        SELECT (array_agg(b.open ORDER BY b.ts, b.publisher_id))[1] AS open, max(b.high) AS high,
               min(b.low) AS low, (array_agg(b.close ORDER BY b.ts DESC, b.publisher_id DESC))[1] AS close,
               sum(b.volume)::bigint AS volume, bit_or(b.anomalies)::int AS anomalies
        FROM {BAR_TABLE} b
        WHERE b.symbol_id = src.id AND b.timeframe = src.base
          AND b.ts >= src.bucket AND b.ts < src.bucket + %(stride)s
    ) agg
    LEFT JOIN LATERAL (
        SELECT b.close FROM {BAR_TABLE} b
        WHERE b.symbol_id = src.id AND b.timeframe = src.base AND b.ts < src.bucket
        ORDER BY b.ts DESC, b.publisher_id DESC LIMIT 1
    ) prev ON true
)
SELECT {{columns}}ticker, dataset, base, bucket, open, high, low, close, volume, anomalies, prev_close, change_pct
FROM board {{rest}}
"""


def leaderboard(
    *,
    metric: str,
    tf: str = "1d",
    limit: int = LEADERBOARD_DEFAULT_LIMIT,
    datasets: set[str] | None = None,
) -> list[LeaderboardRow]:
    """Active symbols ranked by their latest ``tf`` bar's volume or change from the previous close.

    Each symbol's own latest bar counts (a symbol that has not traded today shows its last
    day; the row's ``ts`` says which). ``change_pct`` ranks only symbols with a previous
    close. ``datasets`` limits the symbols (None: every dataset).
    """
    if metric not in LEADERBOARD_METRICS:
        raise ValidationError(ERR_METRIC.format(value=metric), field="metric")
    validate_timeframe(tf)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= LEADERBOARD_MAX_LIMIT:
        raise ValidationError(ERR_LIMIT.format(max=LEADERBOARD_MAX_LIMIT, value=limit), field="limit")
    if datasets is not None and not datasets:
        return []
    sql = _LEADERBOARD_SQL.format(
        symbol_filter="s.active" + ("" if datasets is None else " AND s.dataset = ANY(%(datasets)s)"),
        columns="",
        rest=("WHERE change_pct IS NOT NULL " if metric == "change_pct" else "")
        + f"ORDER BY {metric} DESC, ticker LIMIT %(limit)s",
    )
    params: dict[str, Any] = {
        "stride": DURATIONS[tf],
        "origin": ORIGIN,
        "candidates": source_candidates(tf),
        "limit": limit,
        "datasets": sorted(datasets or ()),
    }
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    out: list[LeaderboardRow] = []
    for rank, (ticker, dataset, base, bucket, o, h, low, c, v, a, prev_close, change) in enumerate(rows, start=1):
        # As in bar_list: a stored bar is final, a resampled one once its bucket has closed.
        bar = BarOut(bucket, o, h, low, c, v, a or 0, base == tf or bucket + DURATIONS[tf] <= now)
        out.append(LeaderboardRow(rank, ticker, dataset, bar, prev_close, change))
    return out


@dataclass(frozen=True, slots=True)
class LeaderboardEntry:
    """What the leaderboard knows of one symbol for one timeframe: its latest bar, the close before, the change."""

    symbol_id: int
    base: str
    bucket: datetime
    open: int
    high: int
    low: int
    close: int
    volume: int
    anomalies: int
    prev_close: int | None
    change_pct: Decimal | None


def leaderboard_entries(*, symbol_ids: Sequence[int], tf: str) -> list[LeaderboardEntry]:
    """The leaderboard's rows of these symbols (active or not, any dataset), by the leaderboard's own statement."""
    validate_timeframe(tf)
    if not symbol_ids:
        return []
    sql = _LEADERBOARD_SQL.format(symbol_filter="s.id = ANY(%(ids)s)", columns="id, ", rest="")
    params: dict[str, Any] = {
        "stride": DURATIONS[tf], "origin": ORIGIN, "candidates": source_candidates(tf), "ids": list(symbol_ids)
    }  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return [
        LeaderboardEntry(sid, base, bucket, o, h, low, c, v, a or 0, prev, change)
        for sid, _ticker, _dataset, base, bucket, o, h, low, c, v, a, prev, change in rows
    ]


class SymbolRef(NamedTuple):
    """What serving a symbol's data needs to know of it: its id, ticker and dataset."""

    id: int
    ticker: str
    dataset: str


def symbol_ref(*, ticker: str) -> SymbolRef:
    """Like symbol_get, in one plain query (the hot path of every history request)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, ticker, dataset FROM marketdata_symbol WHERE ticker = %s", [ticker])
        row = cursor.fetchone()
    if row is None:
        raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=ticker), field="symbol")
    return SymbolRef(*row)


def symbol_refs(*, tickers: Collection[str]) -> dict[str, SymbolRef]:
    """The symbols of these tickers that exist, in one query (the others are absent)."""
    if not tickers:
        return {}
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, ticker, dataset FROM marketdata_symbol WHERE ticker = ANY(%s)", [list(tickers)])
        return {row[1]: SymbolRef(*row) for row in cursor.fetchall()}


def active_symbols(*, datasets: Collection[str] | None) -> list[SymbolRef]:
    """The active symbols of these datasets (None: all), by ticker in the database's collation."""
    rows = Symbol.objects.filter(active=True).order_by("ticker")
    if datasets is not None:
        rows = rows.filter(dataset__in=sorted(datasets))
    return [SymbolRef(*row) for row in rows.values_list("id", "ticker", "dataset")]


def symbol_list(
    *,
    datasets: Collection[str] | None,
    dataset: str | None = None,
    active: bool | None = None,
    search: str | None = None,
    after: str | None = None,
    limit: int,
) -> list[tuple[str, str, bool, str]]:
    """(ticker, dataset, active, description) of the symbols /v1/symbols lists, by ticker, after ``after``.

    ``datasets`` are those the caller may read (None: all); ``search`` matches the ticker or
    the description, ignoring case.
    """
    rows = Symbol.objects.order_by("ticker")
    if datasets is not None:
        rows = rows.filter(dataset__in=sorted(datasets))
    if dataset is not None:
        rows = rows.filter(dataset=dataset)
    if active is not None:
        rows = rows.filter(active=active)
    if search is not None:
        rows = rows.filter(Q(ticker__icontains=search) | Q(description__icontains=search))
    if after is not None:
        rows = rows.filter(ticker__gt=after)
    return list(rows.values_list("ticker", "dataset", "active", "description")[:limit])


def feed_ages() -> dict[str, str]:
    """Each live feed's age of last data, as a readiness check result: "ok" or why it is stale.

    Only feeds whose last writer was ``ingest live`` are judged: a finished replay or
    historical fetch is not expected to keep writing. READYZ_FEED_MAX_AGE_S = 0 turns
    the check off (markets close; set it to what a feed's quietest hour allows).
    """
    limit = settings.READYZ_FEED_MAX_AGE_S
    if not limit:
        return {}
    now = timezone.now()
    results = {}
    for feed in FeedStatus.objects.filter(source="live"):
        name = f"feed {feed.dataset} {feed.schema}"
        if feed.last_batch_at is None:
            results[name] = "no data yet"
            continue
        age = (now - feed.last_batch_at).total_seconds()
        results[name] = "ok" if age <= limit else f"no data for {age:.0f} s (limit {limit} s)"
    return results


# -- what the ingester reads: where a feed resumes, and stored bars its deriver builds on ----


def feed_stored_until(
    *, dataset: str, schema: str, symbols: Sequence[str], start: datetime, end: datetime
) -> datetime | None:
    """The earliest of the symbols' latest stored times of ``schema`` in [start, end), or None when any has none."""
    ids = list(Symbol.objects.filter(dataset=dataset, ticker__in=symbols).values_list("pk", flat=True))
    if len(ids) < len(set(symbols)):
        return None
    timeframe = SCHEMA_TIMEFRAMES.get(schema)
    if timeframe is not None:
        bars = Bar.objects.filter(symbol_id__in=ids, timeframe=timeframe, ts__gte=start, ts__lt=end)
        latest = [row["last"] for row in bars.values("symbol_id").annotate(last=Max("ts"))]
    else:
        trades = Trade.objects.filter(symbol_id__in=ids, ts_event__gte=start, ts_event__lt=end)
        latest = [row["last"] for row in trades.values("symbol_id").annotate(last=Max("ts_event"))]
    if len(latest) < len(ids):
        return None
    return min(latest)


def feed_last_stored(*, schema: str, symbols: Sequence[str]) -> datetime | None:
    """The latest stored time of ``schema`` for any of ``symbols``, or None when nothing is stored."""
    latest: datetime | None = None
    for symbol_id in Symbol.objects.filter(ticker__in=symbols).values_list("pk", flat=True):
        if schema == "trades":
            trades = Trade.objects.filter(symbol_id=symbol_id)
            last = trades.order_by("-ts_event").values_list("ts_event", flat=True).first()
        else:
            bars = Bar.objects.filter(symbol_id=symbol_id, timeframe=SCHEMA_TIMEFRAMES[schema])
            last = bars.order_by("-ts").values_list("ts", flat=True).first()
        if last is not None and (latest is None or last > latest):
            latest = last
    return latest


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
