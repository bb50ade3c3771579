"""Derived and forming bars equal resampling the base bars, however the batches are cut."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketdata.selectors import bars as bar_selectors
from marketdata.services.bars_trades import BarIn
from marketdata.timeframes import OHLCV, resample
from streaming.derive import Deriver, targets

T0 = datetime(2024, 3, 10, 5, 58, tzinfo=UTC)  # near a 4h edge and the US DST change
P = 1_000_000_000


def _bars(raw: list[tuple[int, int, int]]) -> list[BarIn]:
    out = {}
    for offset, close, volume in raw:
        ts = T0 + timedelta(seconds=offset)
        out[ts] = BarIn(1, "1s", ts, 2, close * P, (close + 2) * P, (close - 1) * P, close * P, volume)
    return [out[ts] for ts in sorted(out)]


@settings(max_examples=60, deadline=None)
@given(
    raw=st.lists(
        st.tuples(st.integers(0, 4 * 3600), st.integers(2, 500), st.integers(0, 100)), min_size=1, max_size=80
    ),
    cuts=st.lists(st.integers(1, 79), max_size=6),
    ahead=st.integers(0, 3),
)
def test_latest_state_per_bucket_equals_resampling_everything(raw, cuts, ahead):
    """``ahead``: how many batches the writer has committed beyond the one being derived
    (the ingester's publisher thread runs behind its writer)."""
    bars = _bars(raw)
    stored: list[BarIn] = []

    def load(symbol_id, base, start, end):
        return [OHLCV(b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.publisher_id)
                for b in stored if start <= b.ts < end]  # fmt: skip

    deriver = Deriver(load=load)
    latest: dict[tuple[str, datetime], tuple[OHLCV, bool]] = {}
    edges = [0, *sorted({c for c in cuts if c < len(bars)}), len(bars)]
    batches = [bars[lo:hi] for lo, hi in pairwise(edges)]
    for i, batch in enumerate(batches):
        stored[:] = [b for committed in batches[: i + 1 + ahead] for b in committed]  # committed before derivation
        for d in deriver.add(batch):
            latest[(d.tf, d.bar.ts)] = (d.bar, d.final)

    members = [OHLCV(b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.publisher_id) for b in bars]
    for tf in targets("1s"):
        expected = resample(members, tf)
        got = sorted((ts, bar) for (t, ts), (bar, _) in latest.items() if t == tf)
        assert [bar for _, bar in got] == expected, tf
        finals = [latest[(tf, b.ts)][1] for b in expected]
        assert finals == [True] * (len(expected) - 1) + [False], tf  # only the last bucket is still forming


@settings(max_examples=150, deadline=None)
@given(
    raw=st.lists(
        st.tuples(
            st.integers(1, 3),  # symbol
            st.sampled_from(["1s", "1s", "1s", "1m", "1h"]),  # mostly one base, sometimes a coarser or finer one
            st.integers(0, 3 * 3600),  # seconds after T0, in any order
            st.integers(1, 2),  # publisher
            st.integers(2, 500),  # close
            st.sampled_from([0, 1, 100, 10**6]),  # volume
            st.sampled_from([0, 0, 1, 2]),  # anomaly bits
        ),
        max_size=120,
    ),
    cuts=st.lists(st.integers(1, 119), max_size=5),
    one_base=st.booleans(),
    in_order=st.booleans(),
)
def test_bars_as_columns_derive_what_rows_derive(raw, cuts, one_base, in_order):
    from marketdata.columns import BarColumns, columns_of, micros

    bars = [
        BarIn(symbol, tf, T0 + timedelta(seconds=offset), publisher, close * P, (close + 2) * P, (close - 1) * P,
              close * P, volume, anomalies)
        for symbol, tf, offset, publisher, close, volume, anomalies in raw
    ]  # fmt: skip
    if one_base:  # the common case: every bar of the base timeframe (the columns' own path)
        bars = [b._replace(timeframe="1s") for b in bars]
    if in_order:  # as a feed sends them: each batch goes on from the one before
        bars.sort(key=lambda b: (b.ts, b.publisher_id))
    stored: list[BarIn] = []

    def load(symbol_id, base, start, end):
        return [
            OHLCV(b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.publisher_id)
            for b in stored
            if b.symbol_id == symbol_id and b.timeframe == base and start <= b.ts < end
        ]

    def load_many(base, wanted):  # as load, for many streams at once (their first sight in a batch)
        return [load(symbol_id, base, start, end) for symbol_id, start, end in wanted]

    rows, columns = Deriver(load=load), Deriver(load=load, load_many=load_many)
    edges = [0, *sorted({c for c in cuts if c < len(bars)}), len(bars)]
    for lo, hi in pairwise(edges):
        stored.extend(bars[lo:hi])
        expected = [(d.symbol_id, d.tf, micros(d.bar.ts), *d.bar[1:7], d.final) for d in rows.add(bars[lo:hi])]
        derived = columns.add_columns(columns_of(BarColumns, bars[lo:hi]))
        rows_of = list(zip(*(a.tolist() for a in derived[1:]), strict=True))
        got, at = [], 0
        for symbol_id, tf, count in derived.streams:
            mine = rows_of[at : at + count]
            at += count
            got += [(symbol_id, tf, *values) for values in mine]
            assert [values[0] for values in mine] == sorted(values[0] for values in mine)  # in time order
        assert at == len(rows_of)
        assert sorted(got) == sorted(expected)
    assert columns.finest == rows.finest
    assert {key: columns.state(*key) for key in columns.forming} == {key: rows.state(*key) for key in rows.forming}


def test_streams_seen_first_in_a_batch_load_their_stored_bars_in_one_call_per_timeframe():
    from marketdata.columns import BarColumns, columns_of

    singles: list[tuple] = []
    many: list[tuple[str, int]] = []
    stored = [
        BarIn(symbol, "1m", T0 + timedelta(minutes=m), 2, 10 * P, 11 * P, 9 * P, 10 * P, 5)
        for symbol in range(1, 51)
        for m in range(3)
    ]

    def matching(symbol_id, start, end):
        found = [b for b in stored if b.symbol_id == symbol_id and start <= b.ts < end]
        return [OHLCV(b.ts, *b[4:9], b.anomalies, b.publisher_id) for b in found]

    def load(symbol_id, base, start, end):
        singles.append((symbol_id, start))
        return matching(symbol_id, start, end)

    def load_many(base, wanted):
        many.append((base, len(wanted)))
        return [matching(*w) for w in wanted]

    deriver = Deriver(load=load, load_many=load_many)
    derived = deriver.add_columns(columns_of(BarColumns, stored))

    assert many == [("1m", 50)] * len(targets("1m"))  # one call per derived timeframe, every symbol in it
    assert not singles
    assert len(derived.streams) == 50 * len(targets("1m"))
    plain = Deriver(load=load)  # a stream at a time: the same bars and states
    expected = plain.add_columns(columns_of(BarColumns, stored))
    assert len(singles) == 50 * len(targets("1m"))
    assert derived.streams == expected.streams
    assert all((getattr(derived, f) == getattr(expected, f)).all() for f in derived._fields[1:])
    assert {k: deriver.state(*k) for k in deriver.forming} == {k: plain.state(*k) for k in plain.forming}


@pytest.mark.django_db
def test_bar_ranges_stored_reads_each_range_of_each_symbol(monkeypatch):
    from marketdata.models import Symbol
    from marketdata.services.bars_trades import bars_upsert

    monkeypatch.setattr(bar_selectors, "LOAD_CHUNK", 2)  # three queries for five ranges
    a, b = (Symbol.objects.create(ticker=t, dataset="XNAS.ITCH") for t in ("AAA", "BBB"))
    bars = [
        BarIn(symbol.pk, tf, T0 + timedelta(minutes=m), publisher, (10 + m) * P, (11 + m) * P, (9 + m) * P,
              (10 + m) * P, 100 + m)
        for symbol in (a, b) for tf in ("1m", "1h") for m in range(5) for publisher in (1, 2)
    ]  # fmt: skip
    bars_upsert(bars=bars)
    at = lambda m: T0 + timedelta(minutes=m)  # noqa: E731
    wanted = [
        (a.pk, at(0), at(2)),
        (b.pk, at(1), at(4)),
        (a.pk, at(3), at(10)),
        (b.pk, at(7), at(9)),
        (a.pk, at(0), at(1)),
    ]

    got = bar_selectors.bar_ranges_stored(base="1m", wanted=wanted)

    def expected(symbol_id, start, end):
        return sorted(
            OHLCV(x.ts, x.open, x.high, x.low, x.close, x.volume, x.anomalies, x.publisher_id)
            for x in bars if x.symbol_id == symbol_id and x.timeframe == "1m" and start <= x.ts < end
        )  # fmt: skip

    assert [sorted(bars_of) for bars_of in got] == [expected(*w) for w in wanted]
    assert [len(bars_of) for bars_of in got] == [4, 6, 4, 0, 2]
    assert sorted(bar_selectors.bar_range_stored(symbol_id=a.pk, base="1m", start=at(0), end=at(2))) == sorted(got[0])
