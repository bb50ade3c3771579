"""The leaderboard: active symbols ranked by their latest bar's volume or change, and one symbol's rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import connection
from django.utils import timezone

from ..errors import ValidationError
from ..storage import BAR_TABLE
from ..timeframes import DURATIONS, ORIGIN, source_candidates, validate_timeframe
from .bars import BarOut
from .paging import ERR_LIMIT

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
