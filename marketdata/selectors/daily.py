"""Daily summaries: the continuous aggregate on TimescaleDB, a query over 1m bars elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection

from ..storage import BAR_TABLE, CAGG, timescaledb_enabled
from ..timeframes import OHLCV, ORIGIN, bucket_ceil
from .paging import aware


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
    aware("start", start)
    aware("end", end)
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
