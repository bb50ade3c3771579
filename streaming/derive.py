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
from functools import cache, partial
from operator import itemgetter
from typing import NamedTuple

import numpy as np

from marketdata.columns import BarColumns, groups, micros, utc
from marketdata.services import BarIn
from marketdata.timeframes import (
    DURATIONS,
    OHLCV,
    ORIGIN,
    SERVED_TIMEFRAMES,
    STORED_TIMEFRAMES,
    bucket_start,
    combine,
    resample,
)

Loader = Callable[[int, str, datetime, datetime], list[OHLCV]]
_ORDER = {tf: i for i, tf in enumerate(SERVED_TIMEFRAMES)}
# NamedTuples made positionally without their Python-level __new__ (this runs per piece).
_new = tuple.__new__
_MICROSECOND = timedelta(microseconds=1)  # the store's resolution: [start, upto] as a half-open range
_ORIGIN_US = micros(ORIGIN)


@cache  # a handful of stored timeframes
def targets(base: str) -> tuple[str, ...]:
    """Served timeframes that are built from ``base``."""
    step = DURATIONS[base]
    return tuple(tf for tf in SERVED_TIMEFRAMES if DURATIONS[tf] > step and DURATIONS[tf] % step == timedelta(0))


class Derived(NamedTuple):
    """A derived bar to publish on ``bars:<tf>:<symbol>``."""

    symbol_id: int
    tf: str
    bar: OHLCV
    final: bool


class _Piece(NamedTuple):
    """Part of one bucket built from this batch: its aggregate and the span of member times."""

    bar: OHLCV
    first_ts: datetime
    last_ts: datetime


class _Forming(NamedTuple):
    bar: OHLCV
    last_ts: datetime


def _pieces(items: list[_Piece], tf: str) -> list[_Piece]:
    """Fold consecutive items into one piece per ``tf`` bucket (items in time order)."""
    out: list[_Piece] = []
    for item in items:
        start = bucket_start(item.bar.ts, tf)
        if out and out[-1].bar.ts == start:
            last = out[-1]
            out[-1] = _new(_Piece, (combine(last.bar, item.bar, start), last.first_ts, item.last_ts))
        else:
            b = item.bar
            bar = _new(OHLCV, (start, b.open, b.high, b.low, b.close, b.volume, b.anomalies, 0))
            out.append(_new(_Piece, (bar, item.first_ts, item.last_ts)))
    return out


def _first_pieces(bars: list[BarIn], tf: str) -> list[_Piece]:
    """The first level from base bars in time order: ``combine`` unrolled into locals.

    This runs once per ingested bar, so it avoids building an object per bar; the
    property test in tests/streaming/test_derive.py holds it equal to ``resample``.
    """
    out: list[_Piece] = []
    start: datetime | None = None
    o = h = low = c = v = a = 0
    first = last = None
    for b in bars:
        s = bucket_start(b.ts, tf)
        if s != start:
            if start is not None:
                out.append(_new(_Piece, (_new(OHLCV, (start, o, h, low, c, v, a, 0)), first, last)))
            start, o, h, low, c, v, a, first = s, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.ts
        else:
            if b.high > h:
                h = b.high
            if b.low < low:
                low = b.low
            c = b.close
            v += b.volume
            a |= b.anomalies
        last = b.ts
    if start is not None:
        out.append(_new(_Piece, (_new(OHLCV, (start, o, h, low, c, v, a, 0)), first, last)))
    return out


def _first_pieces_columns(bars: BarColumns, members: np.ndarray, tf: str) -> list[_Piece]:
    """``_first_pieces`` of the bars at ``members`` (in time order), made by array operations."""
    ts = bars.ts[members]
    stride = DURATIONS[tf] // _MICROSECOND
    starts = ts - (ts - _ORIGIN_US) % stride
    firsts = np.concatenate(([0], np.flatnonzero(np.diff(starts)) + 1))
    lasts = np.concatenate((firsts[1:] - 1, [len(ts) - 1]))
    at_firsts = members[firsts]
    values = zip(
        starts[firsts].tolist(),
        bars.open[at_firsts].tolist(),
        np.maximum.reduceat(bars.high[members], firsts).tolist(),
        np.minimum.reduceat(bars.low[members], firsts).tolist(),
        bars.close[members[lasts]].tolist(),
        np.add.reduceat(bars.volume[members], firsts).tolist(),
        np.bitwise_or.reduceat(bars.anomalies[members], firsts).tolist(),
        ts[firsts].tolist(),
        ts[lasts].tolist(),
        strict=True,
    )
    return [
        _new(_Piece, (_new(OHLCV, (utc(start), o, h, low, c, v, a, 0)), utc(first), utc(last)))
        for start, o, h, low, c, v, a, first, last in values
    ]


_BAR_ORDER = itemgetter(2, 3)  # BarIn (ts, publisher_id): the order "first" and "last" follow


@dataclass
class Deriver:
    """Per (symbol, timeframe) state of the bucket being formed."""

    load: Loader
    forming: dict[tuple[int, str], _Forming] = field(default_factory=dict)
    finest: dict[int, str] = field(default_factory=dict)

    def add(self, bars: Iterable[BarIn]) -> list[Derived]:
        """Fold a committed batch in; return what to publish: the latest state per stream and bucket.

        Each timeframe is built from the pieces of the one below it (1m from 1s, 5m from 1m,
        15m from 5m, ...): they all share one origin and each divides the next, and the
        aggregation is associative, so this equals resampling the base bars directly.
        """
        members: dict[int, list[BarIn]] = {}
        finest_of = self.finest
        for bar in bars:
            finest = finest_of.get(bar.symbol_id)
            if finest != bar.timeframe:
                if finest is not None and _ORDER[bar.timeframe] > _ORDER[finest]:
                    continue  # derived from the finest input only, so one rule feeds each stream
                finest_of[bar.symbol_id] = bar.timeframe
                members.pop(bar.symbol_id, None)
            members.setdefault(bar.symbol_id, []).append(bar)
        out: dict[tuple[int, str, datetime], Derived] = {}
        for symbol_id, base_bars in members.items():
            base_bars.sort(key=_BAR_ORDER)
            self._derive(symbol_id, finest_of[symbol_id], partial(_first_pieces, base_bars), out)
        return list(out.values())

    def add_columns(self, bars: BarColumns) -> list[Derived]:
        """``add`` of bars as columns: the same messages, the first level of each symbol's pieces
        made by array operations (``_first_pieces_columns``)."""
        out: dict[tuple[int, str, datetime], Derived] = {}
        tfs, tf_index = np.unique(bars.timeframe, return_inverse=True)
        codes = np.array([_ORDER.get(tf, -1) for tf in tfs.astype("U3").tolist()])[tf_index]
        by_symbol = sorted(groups(bars.symbol_id), key=lambda group: int(group[1][0]))  # first seen first, as add
        for symbol_id, where in by_symbol:
            finest = self.finest.get(symbol_id)
            mine = codes[where]
            code = int(mine[0])
            volume = bars.volume[where]
            wide = len(volume) and int(volume.max()) > (2**63 - 1) // len(volume)  # a sum past int64
            if wide or code < 0 or bool((mine != code).any()) or (finest is not None and _ORDER[finest] != code):
                # Timeframes mixed or changing: add's own rule, one bar at a time (rare).
                for d in self.add([BarIn(*bars.row(int(i))) for i in where]):
                    out[(d.symbol_id, d.tf, d.bar.ts)] = d
                continue
            base = SERVED_TIMEFRAMES[code]
            self.finest[symbol_id] = base
            members = where[np.lexsort((bars.publisher_id[where], bars.ts[where]))]  # by (ts, publisher), stable
            self._derive(symbol_id, base, partial(_first_pieces_columns, bars, members), out)
        return list(out.values())

    def _derive(self, symbol_id: int, base: str, first_pieces: Callable[[str], list[_Piece]], out: dict) -> None:
        """Merge each target timeframe's pieces: the first from the base bars, each next from the one before."""
        items: list[_Piece] = []
        for level, tf in enumerate(targets(base)):
            items = first_pieces(tf) if level == 0 else _pieces(items, tf)
            for piece in items:
                self._merge(symbol_id, base, tf, piece, out)

    def _merge(self, symbol_id: int, base: str, tf: str, piece: _Piece, out: dict) -> None:
        key = (symbol_id, tf)
        start = piece.bar.ts
        state = self.forming.get(key)
        if state is None or (start == state.bar.ts and piece.first_ts <= state.last_ts):
            # First sight of this stream, or a correction inside the bucket: rebuild it from the
            # store, which already holds this committed batch. Only up to what this batch and
            # the state reach: the publisher runs behind the writer, and bars of batches not
            # derived yet would make each of those batches look like a correction (a reload
            # per batch and stream: 37% of a replay's time before this bound).
            upto = piece.last_ts if state is None else max(piece.last_ts, state.last_ts)
            stored = self.load(symbol_id, base, start, min(start + DURATIONS[tf], upto + _MICROSECOND))
            bar = resample(stored, tf)[0] if stored else piece.bar
            state = _Forming(bar, max([piece.last_ts] + [m.ts for m in stored]))
        elif start > state.bar.ts:
            out[(symbol_id, tf, state.bar.ts)] = _new(Derived, (symbol_id, tf, state.bar, True))
            state = _new(_Forming, (piece.bar, piece.last_ts))
        elif start < state.bar.ts:
            return  # a late bar of a closed bucket: stored, and its final was already sent
        else:
            state = _new(_Forming, (combine(state.bar, piece.bar, start), piece.last_ts))
        self.forming[key] = state
        out[(symbol_id, tf, start)] = _new(Derived, (symbol_id, tf, state.bar, False))


def load_stored(symbol_id: int, base: str, start: datetime, end: datetime) -> list[OHLCV]:
    """Stored ``base`` bars of a symbol in [start, end)."""
    from marketdata.models import Bar

    assert base in STORED_TIMEFRAMES
    rows = Bar.objects.filter(symbol_id=symbol_id, timeframe=base, ts__gte=start, ts__lt=end).values_list(
        "ts", "open", "high", "low", "close", "volume", "anomalies", "publisher_id"
    )
    return [OHLCV(*row) for row in rows]
