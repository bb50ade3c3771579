"""Timeframes: which are stored, which are served, and the one resampling rule.

Buckets are aligned the way TimescaleDB's ``time_bucket`` aligns them by default: on
an origin of 2000-01-03T00:00:00Z (a Monday). The SQL path uses ``date_bin`` with the
same origin, so REST (SQL) and WebSocket (this module, in Python) cut identical buckets.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import NamedTuple

from .errors import ValidationError

ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)

STORED_TIMEFRAMES = ("1s", "1m", "1h", "1d")
SERVED_TIMEFRAMES = ("1s", "1m", "5m", "15m", "30m", "1h", "4h", "1d")

DURATIONS = {
    "1s": timedelta(seconds=1),
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "15m": timedelta(minutes=15),
    "30m": timedelta(minutes=30),
    "1h": timedelta(hours=1),
    "4h": timedelta(hours=4),
    "1d": timedelta(days=1),
}

SCHEMA_TIMEFRAMES = {
    "ohlcv-1s": "1s",
    "ohlcv-1m": "1m",
    "ohlcv-1h": "1h",
    "ohlcv-1d": "1d",
}
# Top of book: each quote schema's code as stored (Quote.schema). tbbo's records are MBP-1
# records (a trade with the book before it), so a quote's schema comes from its feed.
QUOTE_SCHEMAS = {"mbp-1": 1, "tbbo": 2, "bbo-1s": 3, "bbo-1m": 4, "cbbo-1s": 5, "cbbo-1m": 6}
STATUS_SCHEMA = "status"
# What retention keeps per (dataset, schema); status changes are few and always kept.
RETAINED_SCHEMAS = (*SCHEMA_TIMEFRAMES, "trades", *QUOTE_SCHEMAS)
STORED_SCHEMAS = (*RETAINED_SCHEMAS, STATUS_SCHEMA)
SCHEMAS = STORED_SCHEMAS  # what the ingester takes

# Anomaly flags, a bit each, kept on the bar.
ANOMALY_HALT_ZERO_VOLUME = 1
ANOMALY_VOLUME_SPIKE = 2
ANOMALY_NAMES = {
    ANOMALY_HALT_ZERO_VOLUME: "halt_zero_volume",
    ANOMALY_VOLUME_SPIKE: "volume_spike",
}

ERR_TIMEFRAME = "unknown timeframe {value!r}: expected one of " + " ".join(SERVED_TIMEFRAMES)


def anomaly_names(flags: int) -> list[str]:
    """Name the anomaly bits set in ``flags``."""
    return [name for bit, name in ANOMALY_NAMES.items() if flags & bit]


def validate_timeframe(value: str, *, field: str = "tf") -> str:
    """Return ``value`` if it is a served timeframe, else raise naming the field."""
    if value not in DURATIONS:
        raise ValidationError(ERR_TIMEFRAME.format(value=value), field=field)
    return value


def source_candidates(tf: str) -> list[str]:
    """Stored timeframes a served one can be built from, preferred first.

    The timeframe itself when it is stored, then the bases that divide it, coarsest first:
    1d from 1m where no 1d is stored, 5m from 1m rather than 1s. A feed that adds 1s bars
    to a symbol with years of 1m history must not shrink its 5m chart to the 1s span, and
    the coarser base costs fewer rows per bucket.
    """
    duration = DURATIONS[tf]
    exact = [tf] if tf in STORED_TIMEFRAMES else []
    finer = [
        base
        for base in reversed(STORED_TIMEFRAMES)
        if base != tf and DURATIONS[base] < duration and duration % DURATIONS[base] == timedelta(0)
    ]
    return exact + finer


@lru_cache(maxsize=4096)  # a batch holds many symbols' bars of the same few minutes (bounded small: see wire)
def bucket_start(ts: datetime, tf: str) -> datetime:
    """Open time of the ``tf`` bucket holding ``ts`` (``date_bin`` with ORIGIN)."""
    stride = DURATIONS[tf]
    return ts - (ts - ORIGIN) % stride


def bucket_ceil(ts: datetime, tf: str) -> datetime:
    """First bucket open at or after ``ts``."""
    start = bucket_start(ts, tf)
    return start if start == ts else start + DURATIONS[tf]


class OHLCV(NamedTuple):
    """One bar: open time, fixed-point prices (1e-9), volume, anomaly bits.

    A NamedTuple, not a dataclass: the ingester makes a few per record, and a frozen
    dataclass costs several times more to construct.
    """

    ts: datetime
    open: int
    high: int
    low: int
    close: int
    volume: int
    anomalies: int = 0
    publisher_id: int = 0


def combine(a: OHLCV, b: OHLCV, ts: datetime) -> OHLCV:
    """Merge two consecutive pieces of one bucket (``a`` before ``b``): the one aggregation rule."""
    # Positional and without NamedTuple's Python __new__: the ingester calls this per piece.
    return _new_ohlcv(
        OHLCV,
        (
            ts,
            a.open,
            a.high if a.high >= b.high else b.high,
            a.low if a.low <= b.low else b.low,
            b.close,
            a.volume + b.volume,
            a.anomalies | b.anomalies,
            0,
        ),
    )


_new_ohlcv = tuple.__new__


def resample(bars: Iterable[OHLCV], tf: str, *, exclude_anomalies: bool = False) -> list[OHLCV]:
    """Aggregate bars into ``tf`` buckets: first open, max high, min low, last close, sum volume.

    Bars may come in any order and from several publishers; "first" and "last" follow
    (ts, publisher_id), the order the SQL path uses. Anomaly bits are OR-ed; with
    ``exclude_anomalies`` flagged bars are dropped before aggregation.
    """
    out: list[OHLCV] = []
    for bar in sorted(bars, key=lambda b: (b.ts, b.publisher_id)):
        if exclude_anomalies and bar.anomalies:
            continue
        start = bucket_start(bar.ts, tf)
        if out and out[-1].ts == start:
            out[-1] = combine(out[-1], bar, start)
        else:
            out.append(OHLCV(start, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.anomalies))
    return out
