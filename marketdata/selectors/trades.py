"""Reads of trades: keyset pages by the trade's full key, with their cursors."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection

from ..errors import ValidationError
from ..timeframes import ORIGIN
from .paging import DEFAULT_LIMIT, ERR_LIMIT, ERR_RANGE, MAX_LIMIT, aware, cursor_text, cursor_ts
from .symbols import symbol_get

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
        key = cursor_ts(match[1]), int(match[2]), int(match[3]), int(match[4])
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
    aware("start", start)
    aware("end", end)
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
