"""Coarser timeframes and forming bars, derived from finer bars as they are written.

For every symbol, each served timeframe coarser than the finest stored one it receives
(1s -> 1m 5m ... 1d, or 1m -> 5m ... 1d) is kept as the bucket being formed, folded
with ``marketdata.timeframes.resample``, the rule REST uses. A bucket is published with
``final: false`` while it forms and with ``final: true`` once a later bucket begins;
within one batch only the latest state of each stream is published.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from itertools import groupby

from marketdata.services import BarIn
from marketdata.timeframes import DURATIONS, OHLCV, SERVED_TIMEFRAMES, STORED_TIMEFRAMES, bucket_start, resample

Loader = Callable[[int, str, datetime, datetime], list[OHLCV]]
_ORDER = {tf: i for i, tf in enumerate(SERVED_TIMEFRAMES)}


def targets(base: str) -> list[str]:
    """Served timeframes that are built from ``base``."""
    step = DURATIONS[base]
    return [tf for tf in SERVED_TIMEFRAMES if DURATIONS[tf] > step and DURATIONS[tf] % step == timedelta(0)]


def _bucket_of(member: OHLCV, tf: str) -> datetime:
    return bucket_start(member.ts, tf)


@dataclass(frozen=True, slots=True)
class Derived:
    """A derived bar to publish on ``bars:<tf>:<symbol>``."""

    symbol_id: int
    tf: str
    bar: OHLCV
    final: bool


@dataclass
class _Forming:
    bar: OHLCV
    last_ts: datetime


@dataclass
class Deriver:
    """Per (symbol, timeframe) state of the bucket being formed."""

    load: Loader
    forming: dict[tuple[int, str], _Forming] = field(default_factory=dict)
    finest: dict[int, str] = field(default_factory=dict)

    def add(self, bars: Iterable[BarIn]) -> list[Derived]:
        """Fold a committed batch in; return what to publish: the latest state per stream and bucket."""
        members: dict[tuple[int, str], list[OHLCV]] = {}
        bases: dict[int, str] = {}
        for bar in bars:
            finest = self.finest.get(bar.symbol_id)
            if finest is None or _ORDER[bar.timeframe] < _ORDER[finest]:
                self.finest[bar.symbol_id] = finest = bar.timeframe
            if bar.timeframe != finest:
                continue  # derived from the finest input only, so one rule feeds each stream
            bases[bar.symbol_id] = finest
            member = OHLCV(bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.anomalies, bar.publisher_id)
            for tf in targets(finest):
                members.setdefault((bar.symbol_id, tf), []).append(member)
        out: dict[tuple[int, str, datetime], Derived] = {}
        for (symbol_id, tf), group in members.items():
            for start, bucket in groupby(group, key=partial(_bucket_of, tf=tf)):
                self._fold(symbol_id, bases[symbol_id], tf, start, list(bucket), out)
        return list(out.values())

    def _fold(self, symbol_id: int, base: str, tf: str, start: datetime, bucket: list[OHLCV], out: dict) -> None:
        key = (symbol_id, tf)
        state = self.forming.get(key)
        newest = max(m.ts for m in bucket)
        if state is None or (start == state.bar.ts and min(m.ts for m in bucket) <= state.last_ts):
            # First sight of this stream, or a correction inside the bucket: rebuild it from the
            # store, which already holds this committed batch.
            stored = self.load(symbol_id, base, start, start + DURATIONS[tf])
            state = _Forming(resample(stored or bucket, tf)[0], max([newest] + [m.ts for m in stored]))
        elif start > state.bar.ts:
            out[(symbol_id, tf, state.bar.ts)] = Derived(symbol_id, tf, state.bar, final=True)
            state = _Forming(resample(bucket, tf)[0], newest)
        elif start < state.bar.ts:
            return  # a late bar of a closed bucket: stored, and its final was already sent
        else:
            state = _Forming(resample([state.bar, *bucket], tf)[0], newest)
        self.forming[key] = state
        out[(symbol_id, tf, state.bar.ts)] = Derived(symbol_id, tf, state.bar, final=False)


def load_stored(symbol_id: int, base: str, start: datetime, end: datetime) -> list[OHLCV]:
    """Stored ``base`` bars of a symbol in [start, end)."""
    from marketdata.models import Bar

    assert base in STORED_TIMEFRAMES
    rows = Bar.objects.filter(symbol_id=symbol_id, timeframe=base, ts__gte=start, ts__lt=end).values_list(
        "ts", "open", "high", "low", "close", "volume", "anomalies", "publisher_id"
    )
    return [OHLCV(*row) for row in rows]
