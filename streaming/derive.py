"""Coarser timeframes and forming bars, derived from finer bars as they are written.

For every symbol, each served timeframe coarser than the finest stored one it receives
(1s -> 1m 5m ... 1d, or 1m -> 5m ... 1d) is kept as the bucket being formed, folded
with ``marketdata.timeframes.resample``, the rule REST uses. A bucket is published with
``final: false`` while it forms and with ``final: true`` once a later bucket begins;
within one batch only the latest state of each stream is published.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from operator import itemgetter
from typing import NamedTuple

import numpy as np

from marketdata.columns import BarColumns, micros, utc
from marketdata.services.bars_trades import BarIn
from marketdata.timeframes import (
    DURATIONS,
    OHLCV,
    ORIGIN,
    SERVED_TIMEFRAMES,
    bucket_start,
    combine,
    resample,
)

Loader = Callable[[int, str, datetime, datetime], list[OHLCV]]
# Stored bars of a base timeframe for many (symbol_id, start, end) at once, in their order.
ManyLoader = Callable[[str, Sequence[tuple[int, datetime, datetime]]], list[list[OHLCV]]]
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


FIELDS = ("ts", "open", "high", "low", "close", "volume", "anomalies")  # a derived bar's values, in order
Raw = tuple[int, int, int, int, int, int, int, int]  # a bucket being formed: start, values, last member (us)


class DerivedBars(NamedTuple):
    """Derived bars of a batch as arrays (times in microseconds), stream after stream: ``streams``
    names each stream's (symbol_id, timeframe) and how many of the rows, in order, are its."""

    streams: list[tuple[int, str, int]]
    ts: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    anomalies: np.ndarray
    final: np.ndarray


def _as_pieces(starts: list[int], values: list[tuple[int, ...]], first: list[int], last: list[int]) -> list[_Piece]:
    """Buckets (starts, their OHLCV values, first and last member times) as pieces, for ``_merge``."""
    return [
        _new(_Piece, (_new(OHLCV, (utc(start), *v, 0)), utc(f), utc(la)))
        for start, v, f, la in zip(starts, values, first, last, strict=True)
    ]


def _forming_of(raw: Raw) -> _Forming:
    return _new(_Forming, (_new(OHLCV, (utc(raw[0]), *raw[1:7], 0)), utc(raw[7])))


def _raw_of(state: _Forming | Raw) -> Raw:
    if not isinstance(state, _Forming):
        return state
    bar, last = state
    return (micros(bar.ts), bar.open, bar.high, bar.low, bar.close, bar.volume, bar.anomalies, micros(last))


_BAR_ORDER = itemgetter(2, 3)  # BarIn (ts, publisher_id): the order "first" and "last" follow


@dataclass
class Deriver:
    """Per (symbol, timeframe) state of the bucket being formed."""

    load: Loader
    forming: dict[tuple[int, str], _Forming] = field(default_factory=dict)
    finest: dict[int, str] = field(default_factory=dict)
    # Streams seen for the first time in a batch load their bucket's stored bars with one
    # call (one query) per timeframe, not one each: a publisher's first batch of 5,000
    # symbols would otherwise make 30,000 queries before it publishes anything.
    load_many: ManyLoader | None = None

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
            base = finest_of[symbol_id]
            base_bars.sort(key=_BAR_ORDER)
            items: list[_Piece] = []
            for level, tf in enumerate(targets(base)):
                items = _first_pieces(base_bars, tf) if level == 0 else _pieces(items, tf)
                for piece in items:
                    self._merge(symbol_id, base, tf, piece, out)
        return list(out.values())

    def state(self, symbol_id: int, tf: str) -> Raw | None:
        """The bucket being formed of a stream, as plain numbers (however it is kept)."""
        state = self.forming.get((symbol_id, tf))
        return None if state is None else _raw_of(state)

    def add_columns(self, bars: BarColumns) -> DerivedBars:
        """``add`` of bars as columns: the same messages, as arrays, stream after stream.

        All symbols at once: the bars sorted by (symbol, ts, publisher), then for each target
        timeframe every symbol's buckets are folded from the base bars in one pass (the
        aggregation is associative, so this equals building each level from the one below).
        In the common case a stream goes on from the bucket being formed (its first bucket is
        that one, with no bar back in time, or a later one): the first bucket is merged with
        the state, every bucket but the last is final, and the state kept as plain numbers.
        Anything else (a stream's first sight, a correction, a late bar, a symbol whose
        timeframes are mixed or change within the batch) takes ``add``'s own rule.
        """
        parts: list[DerivedBars] = []
        n = len(bars)
        order = np.lexsort((bars.publisher_id, bars.ts, bars.symbol_id))
        sym = bars.symbol_id[order]
        sym_first = np.concatenate(([0], np.flatnonzero(np.diff(sym)) + 1)) if n else np.zeros(0, dtype=np.int64)
        counts = np.diff(np.append(sym_first, n))
        tfs, tf_index = np.unique(bars.timeframe, return_inverse=True)
        codes = np.array([_ORDER.get(tf, -1) for tf in tfs.astype("U3").tolist()], dtype=np.int64)[tf_index][order]
        lowest = np.minimum.reduceat(codes, sym_first) if n else codes
        highest = np.maximum.reduceat(codes, sym_first) if n else codes
        loudest = np.maximum.reduceat(bars.volume[order], sym_first) if n else codes
        symbols = sym[sym_first].tolist()
        fast = np.zeros(len(symbols), dtype=bool)
        slow: list[Derived] = []
        per_symbol = zip(symbols, lowest.tolist(), highest.tolist(), loudest.tolist(), counts.tolist(), strict=True)
        for k, (symbol_id, code, top, volume, count) in enumerate(per_symbol):
            finest = self.finest.get(symbol_id)
            if code >= 0 and code == top and volume <= 2**62 // count and finest in (None, SERVED_TIMEFRAMES[code]):
                fast[k] = True
                self.finest[symbol_id] = SERVED_TIMEFRAMES[code]
            else:  # timeframes mixed or changing (or sums past int64): add's own rule, bar by bar, in order
                rows = np.flatnonzero(bars.symbol_id == symbol_id)
                slow += self.add([BarIn(*bars.row(int(i))) for i in rows])
        symbol_of = np.repeat(np.arange(len(symbols)), counts)
        taken = np.flatnonzero(fast[symbol_of])
        if len(taken):
            rows = order[taken]
            owner = symbol_of[taken]
            values = [bars.ts[rows], bars.open[rows], bars.high[rows], bars.low[rows], bars.close[rows],
                      bars.volume[rows], bars.anomalies[rows]]  # fmt: skip
            base_codes = lowest[owner]
            for code in np.unique(base_codes).tolist():
                mine = base_codes == code
                base = SERVED_TIMEFRAMES[code]
                for tf in targets(base):
                    parts.append(self._fold(symbols, base, tf, owner[mine], [v[mine] for v in values], slow))
        if slow:
            parts += _bars_of(slow)
        return _joined(parts)

    def _fold(
        self, symbols: list[int], base: str, tf: str, owner: np.ndarray, values: list[np.ndarray], slow: list[Derived]
    ) -> DerivedBars:
        """One target timeframe for bars sorted by (owner, ts, publisher): ``values`` are their
        FIELDS, ``owner`` indexes ``symbols``. Streams not in the common case are merged piece
        by piece, their messages added to ``slow``."""
        ts, open_, high, low, close, volume, anomalies = values
        m = len(ts)
        starts = ts - (ts - _ORIGIN_US) % (DURATIONS[tf] // _MICROSECOND)
        begins = np.ones(m, dtype=bool)
        begins[1:] = (starts[1:] != starts[:-1]) | (owner[1:] != owner[:-1])
        firsts = np.flatnonzero(begins)
        lasts = np.append(firsts[1:] - 1, m - 1)
        b = [
            starts[firsts], open_[firsts], np.maximum.reduceat(high, firsts), np.minimum.reduceat(low, firsts),
            close[lasts], np.add.reduceat(volume, firsts), np.bitwise_or.reduceat(anomalies, firsts),
        ]  # fmt: skip
        first_ts, last_ts, b_owner = ts[firsts], ts[lasts], owner[firsts]
        k = len(firsts)
        opens = np.ones(k, dtype=bool)
        opens[1:] = b_owner[1:] != b_owner[:-1]
        g_first = np.flatnonzero(opens)
        g_last = np.append(g_first[1:] - 1, k - 1)
        g_symbols = [symbols[i] for i in b_owner[g_first].tolist()]
        states = [self.state(symbol_id, tf) for symbol_id in g_symbols]
        known = np.array([s is not None for s in states], dtype=bool)
        held = np.array([s or (0,) * 8 for s in states], dtype=np.int64).reshape(len(states), 8)
        begun, formed_to = held[:, 0], held[:, 7]
        start0 = b[0][g_first]
        odd = ~known | (start0 < begun) | ((start0 == begun) & (first_ts[g_first] <= formed_to))
        same = ~odd & (start0 == begun)
        later = ~odd & (start0 > begun)
        at = g_first[same]  # the batch goes on with the bucket being formed: merged with it
        b[1][at] = held[same, 1]
        b[2][at] = np.maximum(b[2][at], held[same, 2])
        b[3][at] = np.minimum(b[3][at], held[same, 3])
        b[5][at] += held[same, 5]
        b[6][at] |= held[same, 6]
        final = np.ones(k, dtype=bool)
        final[g_last] = False
        group = np.repeat(np.arange(len(g_first)), g_last - g_first + 1)
        preloaded = self._first_sights(base, tf, [g_symbols[g] for g in np.flatnonzero(~known).tolist()],
                                       b[0][g_first[~known]], last_ts[g_first[~known]])  # fmt: skip
        for g in np.flatnonzero(odd).tolist():  # the rule one piece at a time
            span = slice(int(g_first[g]), int(g_last[g]) + 1)
            out: dict[tuple[int, str, datetime], Derived] = {}
            bucket_values: list[tuple[int, ...]] = list(zip(*(v[span].tolist() for v in b[1:]), strict=True))
            pieces = _as_pieces(b[0][span].tolist(), bucket_values, first_ts[span].tolist(), last_ts[span].tolist())
            for piece in pieces:
                self._merge(g_symbols[g], base, tf, piece, out, preloaded)
            slow += out.values()
        for g, raw in zip(
            np.flatnonzero(~odd).tolist(),
            np.column_stack([v[g_last[~odd]] for v in b] + [last_ts[g_last[~odd]]]).tolist(),
            strict=True,
        ):
            self.forming[(g_symbols[g], tf)] = tuple(raw)  # type: ignore[assignment]
        # A later bucket begins: the one being formed goes out final, before the batch's.
        where = g_first[later]
        b = [np.insert(v, where, held[later, i]) for i, v in enumerate(b)]
        final = np.insert(final, where, True)
        group = np.insert(group, where, np.flatnonzero(later))
        keep = ~odd[group]
        streams = [
            (g_symbols[g], tf, int(size))
            for g, size in zip(
                np.flatnonzero(~odd).tolist(), (g_last - g_first + 1 + later)[~odd].tolist(), strict=True
            )
        ]
        ts, open_, high, low, close, volume, anomalies = (v[keep] for v in b)
        return DerivedBars(streams, ts, open_, high, low, close, volume, anomalies, final[keep])

    def _first_sights(
        self, base: str, tf: str, symbols: list[int], starts: np.ndarray, lasts: np.ndarray
    ) -> dict[tuple[int, datetime, datetime], list[OHLCV]]:
        """The stored bars ``_merge`` loads for streams seen for the first time (their first
        bucket starts at ``starts``, its part in this batch ends at ``lasts``), with one
        ``load_many``; keyed as _merge asks for them."""
        if self.load_many is None or len(symbols) < 2:
            return {}
        wanted = []
        for symbol_id, start_us, last_us in zip(symbols, starts.tolist(), lasts.tolist(), strict=True):
            start = utc(start_us)
            wanted.append((symbol_id, start, _load_end(start, tf, utc(last_us))))
        return dict(zip(wanted, self.load_many(base, wanted), strict=True))

    def _merge(
        self,
        symbol_id: int,
        base: str,
        tf: str,
        piece: _Piece,
        out: dict,
        preloaded: dict[tuple[int, datetime, datetime], list[OHLCV]] | None = None,
    ) -> None:
        key = (symbol_id, tf)
        start = piece.bar.ts
        state = self.forming.get(key)
        if type(state) is tuple:  # kept as plain numbers by add_columns
            state = _forming_of(state)  # type: ignore[arg-type]
        if state is None or (start == state.bar.ts and piece.first_ts <= state.last_ts):
            # First sight of this stream, or a correction inside the bucket: rebuild it from the
            # store, which already holds this committed batch. Only up to what this batch and
            # the state reach: the publisher runs behind the writer, and bars of batches not
            # derived yet would make each of those batches look like a correction (a reload
            # per batch and stream: 37% of a replay's time before this bound).
            upto = piece.last_ts if state is None else max(piece.last_ts, state.last_ts)
            end = _load_end(start, tf, upto)
            stored = (preloaded or {}).pop((symbol_id, start, end), None)
            if stored is None:
                stored = self.load(symbol_id, base, start, end)
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


def _load_end(start: datetime, tf: str, upto: datetime) -> datetime:
    """Where a bucket's reload from the store ends: its end, or just past ``upto`` if sooner."""
    return min(start + DURATIONS[tf], upto + _MICROSECOND)


def _bars_of(derived: list[Derived]) -> list[DerivedBars]:
    """Derived bars (objects) as DerivedBars, one stream after another in their order."""
    streams: dict[tuple[int, str], list[Derived]] = {}
    for d in derived:
        streams.setdefault((d.symbol_id, d.tf), []).append(d)
    ordered = [d for ds in streams.values() for d in ds]
    rows = [(micros(d.bar.ts), *d.bar[1:7]) for d in ordered]
    ts, open_, high, low, close, volume, anomalies = (np.array(v, dtype=np.int64) for v in zip(*rows, strict=True))
    final = np.array([d.final for d in ordered], dtype=bool)
    counts = [(symbol_id, tf, len(ds)) for (symbol_id, tf), ds in streams.items()]
    return [DerivedBars(counts, ts, open_, high, low, close, volume, anomalies, final)]


def _joined(parts: list[DerivedBars]) -> DerivedBars:
    """DerivedBars one after another, as one."""
    if not parts:
        nothing = np.zeros(0, dtype=np.int64)
        return DerivedBars([], nothing, nothing, nothing, nothing, nothing, nothing, nothing, nothing.astype(bool))
    ts, open_, high, low, close, volume, anomalies, final = (
        np.concatenate([getattr(p, name) for p in parts]) for name in (*FIELDS, "final")
    )
    return DerivedBars(
        [stream for part in parts for stream in part.streams], ts, open_, high, low, close, volume, anomalies, final
    )
