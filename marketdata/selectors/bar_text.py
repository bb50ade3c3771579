"""A bar page as JSON text: written by PostgreSQL for a stored timeframe, through bar_list for a resampled one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from django.db import connection

from ..timeframes import ANOMALY_NAMES, ORIGIN, STORED_TIMEFRAMES
from ..wire import bar_json
from .bars import BarPage, bar_list, page_plan, source_timeframe
from .paging import DEFAULT_LIMIT, cursor_encode


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
    plan = page_plan(
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
        source = source_timeframe(symbol_id, tf)
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
