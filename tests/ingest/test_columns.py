"""Trades as columns: the same trades, counts, state, rows stored and messages as one by one."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import databento_dbn as dbn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import pipeline as pipeline_module
from ingest.pipeline import Pipeline
from ingest.publisher import TradeMessages, trades_out
from ingest.records import Normaliser
from ingest.sources.replay import run_replay
from ingest.stats import Stats
from ingest.symbology import Resolver
from marketdata.columns import BarColumns, TradeColumns, bar_spans, columns_of, concat, utc
from marketdata.errors import ValidationError
from marketdata.models import Symbol, Trade
from marketdata.services.bars_trades import UNDEF_PRICE, BarIn, TradeIn, trades_insert
from marketdata.wire import bar_datas, bar_json, time_text, time_texts, trade_json

from .dbnfile import NS, P, metadata
from .test_replay import SAMPLE_FILES, _expected, _stored

T0 = 1704205800 * NS  # 2024-01-02T14:30:00Z
SIDE_OFFSET = 29  # the side byte of a trade record (TRADE_RECORD)
SWITCH = T0 + 30 * NS  # instrument 3 maps to CCC before, DDD from here


def _resolver() -> Resolver:
    """Instruments 1 and 2 map for good, 3 changes symbol at SWITCH, 4 maps from SWITCH on, 9 never."""
    resolver = Resolver(dataset="XNAS.ITCH", allowed=frozenset({"AAA", "CCC", "DDD", "EEE"}))
    symbols = {
        t: Symbol(pk=n, ticker=t, dataset="XNAS.ITCH") for n, t in enumerate(["AAA", "BBB", "CCC", "DDD", "EEE"], 1)
    }
    resolver._add(1, 0, 2**63 - 1, symbols["AAA"])
    resolver._add(2, 0, 2**63 - 1, symbols["BBB"])  # not in --symbols: filtered
    resolver._add(3, 0, SWITCH, symbols["CCC"])
    resolver._add(3, SWITCH, 2**63 - 1, symbols["DDD"])
    resolver._add(4, SWITCH, 2**63 - 1, symbols["EEE"])
    return resolver


def _decoded(raw: list[bytes]) -> list[object]:
    decoder = dbn.DBNDecoder()
    records = decoder.write_and_decode(metadata(symbols={}, schema=dbn.Schema.TRADES) + b"".join(raw))
    return list(records[1:])


trade_specs = st.lists(
    st.tuples(
        st.sampled_from([1, 1, 1, 2, 3, 3, 4, 9]),  # instrument
        st.integers(0, 60),  # seconds after T0 (often equal: ordinals)
        st.sampled_from([0, 0, 500_000_123]),  # nanoseconds within the second
        st.sampled_from([100 * P, 100 * P + 1, -5 * P, UNDEF_PRICE]),
        st.integers(1, 2),  # publisher
        st.integers(0, 3),  # sequence (small: repeats)
        st.sampled_from([b"A", b"B", b"N", b"X"]),
        st.integers(0, 255),  # flags
    ),
    max_size=300,
)


def _trade_bytes(spec: tuple) -> bytes:
    instrument, second, nanos, price, publisher, sequence, side, flags = spec
    ts = T0 + second * NS + nanos
    record = dbn.TradeMsg(
        publisher_id=publisher, instrument_id=instrument, ts_event=ts, price=price, size=second + 1,
        action=dbn.Action.TRADE, side=dbn.Side.NONE, depth=0, ts_recv=ts + 1_500, ts_in_delta=0, sequence=sequence,
        flags=flags,
    )  # fmt: skip
    raw = bytearray(bytes(record))
    raw[SIDE_OFFSET] = side[0]
    return bytes(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=trade_specs, cuts=st.lists(st.integers(0, 300), max_size=4), shift=st.sampled_from([0, 3 * 60 * NS]))
def test_a_run_as_columns_equals_the_records_one_by_one(specs, cuts, shift):
    one, many = _both_ways(_decoded([_trade_bytes(spec) for spec in specs]), cuts, shift, "trade_columns", TradeIn)
    assert many.last_trade == one.last_trade


def _both_ways(
    records: list[object], cuts: list[int], shift: int, method: str, row: type
) -> tuple[Normaliser, Normaliser]:
    """Normalise ``records`` one by one and as columns (in runs cut at ``cuts``: the state carries over
    from run to run); assert the same rows and counts; return both normalisers."""
    one = Normaliser(_resolver(), Stats())
    many = Normaliser(_resolver(), Stats())
    one.shift_ns = many.shift_ns = shift
    expected = [r for r in map(one, records) if r is not None]
    parts = []
    bounds = [0, *sorted(min(c, len(records)) for c in cuts), len(records)]
    for lo, hi in itertools.pairwise(bounds):
        columns = getattr(many, method)(records[lo:hi])
        assert columns is not None
        parts.append(columns)
    got = concat(parts)
    assert [row(*got.row(i)) for i in range(len(got))] == expected
    assert (many.stats.records, many.stats.skipped, many.stats.warnings) == (
        one.stats.records, one.stats.skipped, one.stats.warnings,
    )  # fmt: skip
    return one, many


bar_specs = st.lists(
    st.tuples(
        st.sampled_from([1, 1, 1, 2, 3, 3, 4, 9]),  # instrument
        st.sampled_from([32, 33, 33, 33, 34, 35, 36]),  # rtype: 1s 1m 1h 1d bars, and one not stored
        st.integers(0, 60),  # minutes after T0 (repeats, and times going back)
        st.integers(1, 2),  # publisher
        st.sampled_from([(100, 101, 99, 100), (100, 99, 101, 100), (UNDEF_PRICE, 1, 1, 1), (-5, -4, -6, -5)]),
        st.sampled_from([0, 10, 11, 12, 500, 10**12]),  # volume: halts, a norm, spikes
    ),
    max_size=300,
)


def _bar_bytes(spec: tuple) -> bytes:
    instrument, rtype, minute, publisher, (o, h, low, c), volume = spec
    scale = 1 if o == UNDEF_PRICE else P
    return bytes(
        dbn.OHLCVMsg(rtype=rtype, publisher_id=publisher, instrument_id=instrument, ts_event=T0 + minute * 60 * NS,
                     open=o * scale, high=h * P, low=low * P, close=c * P, volume=volume)
    )  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=bar_specs, cuts=st.lists(st.integers(0, 300), max_size=4), shift=st.sampled_from([0, 3 * 60 * NS]))
def test_a_run_of_bars_as_columns_equals_the_records_one_by_one(specs, cuts, shift):
    one, many = _both_ways(_decoded([_bar_bytes(spec) for spec in specs]), cuts, shift, "bar_columns", BarIn)
    assert many.last_bar_ts == one.last_bar_ts
    assert many.anomalies.norms == one.anomalies.norms


def test_records_of_another_layout_are_left_to_the_one_by_one_path():
    normaliser = Normaliser(_resolver(), Stats())
    bars = _decoded(
        [bytes(dbn.OHLCVMsg(rtype=int(dbn.RType.OHLCV_1M), publisher_id=1, instrument_id=1, ts_event=T0,
                            open=P, high=P, low=P, close=P, volume=1))]
    )  # fmt: skip
    assert normaliser.trade_columns(bars) is None  # type: ignore[arg-type]
    far = _decoded([_trade_bytes((1, 0, 0, P, 1, 0, b"A", 0))[:8] + (2**62).to_bytes(8, "little") + b"\0" * 32])
    assert normaliser.trade_columns(far) is None  # type: ignore[arg-type]
    assert normaliser.stats.records == 0


@given(st.integers(-2_208_988_800_000_000, 7_258_118_400_000_000))  # 1900 .. 2200
def test_time_texts_equal_time_text(micros):
    values = np.array([micros, micros - micros % 1_000_000], dtype=np.int64)
    ts = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    assert time_texts(values) == [time_text(ts), time_text(ts.replace(microsecond=0))]


def test_trade_messages_from_columns_are_trade_json():
    rows = [
        TradeIn(1, datetime(2024, 1, 2, 14, 30, 5, 120000, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC), 1, 1, 0,
                189_120_000_000, 5, "B"),
        TradeIn(2, datetime(2024, 1, 2, 14, 30, 6, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC), 1, 2, 0, -3 * P, 1,
                "N"),
        TradeIn(1, datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC), 1, 3, 0,
                7, 2, "A"),
    ]  # fmt: skip
    groups = TradeMessages({1: "AAA", 2: "BBB"})([trades_out(columns_of(TradeColumns, rows))])
    assert groups == {
        ("trades:AAA", "trade"): [trade_json(r.ts_event, r.price, r.size, r.side) for r in (rows[0], rows[2])],
        ("trades:BBB", "trade"): [trade_json(rows[1].ts_event, rows[1].price, rows[1].size, rows[1].side)],
    }


@pytest.mark.django_db
def test_columns_are_stored_exactly_as_rows_are():
    symbol = Symbol.objects.create(ticker="AAPL", dataset="XNAS.ITCH")
    times = [
        datetime(2024, 1, 2, 14, 30, 5, 123456, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before binary COPY's time zero
        datetime(1969, 7, 20, 20, 17, 40, tzinfo=UTC),  # before the Unix epoch
    ]
    rows = [
        TradeIn(symbol.pk, ts, ts + timedelta(microseconds=7), 65535, 2**40, 32767, -(2**62), 2**40, side, 255)
        for ts, side in zip(times, "ABN", strict=True)
    ]
    result = trades_insert(trades=columns_of(TradeColumns, rows))
    assert (result.received, result.inserted) == (3, 3)
    stored = [
        TradeIn(t.symbol_id, t.ts_event, t.ts_recv, t.publisher_id, t.sequence, t.ordinal, t.price, t.size, t.side,
                t.flags)
        for t in Trade.objects.order_by("ts_event")
    ]  # fmt: skip
    assert stored == sorted(rows, key=lambda r: r.ts_event)
    assert trades_insert(trades=rows).inserted == 0  # the same trades as rows: already stored


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"price": UNDEF_PRICE}, r"^price is Databento's undefined price"),
        ({"side": "X"}, r"^side must be one of"),
        ({"ordinal": 32768}, r"^ordinal=32768 is out of range for its column, a signed 16-bit integer$"),
        ({"publisher_id": 2**31}, r"^publisher_id=2147483648 is out of range for its column, a signed 32-bit"),
    ],
)
def test_a_bad_trade_in_columns_raises_what_rows_raise_and_stores_nothing(change, message):
    symbol = Symbol.objects.create(ticker="AAPL", dataset="XNAS.ITCH")
    ts = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    rows = [TradeIn(symbol.pk, ts + timedelta(seconds=i), ts, 1, i, 0, P, 1, "B") for i in range(3)]
    rows[1] = rows[1]._replace(**change)
    with pytest.raises(ValidationError, match=message):
        trades_insert(trades=rows)
    with pytest.raises(ValidationError, match=message):
        trades_insert(trades=columns_of(TradeColumns, rows))
    assert not Trade.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_sample_replays_the_same_through_columns(path: Path, monkeypatch):
    monkeypatch.setattr(pipeline_module, "COLUMNS_MIN", 1)  # the samples' runs of trades are short
    expected = _expected(path)
    run_replay(paths=[path], speed=None, loop=False, symbols=None, publish=False, install_signals=False)
    assert _stored() == expected


@pytest.mark.django_db(transaction=True)
def test_a_pipeline_keeps_the_order_of_columns_rows_and_symbology_between_them():
    pipeline = Pipeline(dataset="XNAS.ITCH", source="test", symbols=None, publish=False, batch_trades=50)
    pipeline.resolver.add_mapping(ticker="AAPL", instrument_id=7, start_ns=0, end_ns=T0 + 100 * NS)

    def trade(second: int, instrument: int = 7, sequence: int = 0) -> dbn.TradeMsg:
        return dbn.TradeMsg(
            publisher_id=1, instrument_id=instrument, ts_event=T0 + second * NS, price=P, size=1,
            action=dbn.Action.TRADE, side=dbn.Side.BID, depth=0, ts_recv=T0 + second * NS, ts_in_delta=0,
            sequence=sequence, flags=0,
        )  # fmt: skip

    remap = dbn.SymbolMappingMsg(
        publisher_id=0, instrument_id=8, ts_event=T0 + 100 * NS, stype_in=dbn.SType.RAW_SYMBOL,
        stype_in_symbol="MSFT", stype_out=dbn.SType.RAW_SYMBOL, stype_out_symbol="MSFT", start_ts=T0 + 100 * NS,
        end_ts=T0 + 400 * NS,
    )  # fmt: skip
    records = [trade(s) for s in range(100)] + [remap]  # a run of columns, then symbology
    records += [trade(s, 8) for s in range(100, 110)] + [trade(110, 8)] * 3  # a short run: one by one
    records += [trade(s, 8, sequence=s) for s in range(111, 300)]  # columns again
    pipeline.feed_many(records)
    stats = pipeline.close()

    tickers = dict(Symbol.objects.values_list("pk", "ticker"))
    stored = [(tickers[t.symbol_id], t.ts_event, t.ordinal) for t in Trade.objects.order_by("ts_event", "ordinal")]
    second = lambda s: datetime.fromtimestamp(T0 // NS + s, UTC)  # noqa: E731
    assert stored == (
        [("AAPL", second(s), 0) for s in range(100)]
        + [("MSFT", second(s), 0) for s in range(100, 110)]
        + [("MSFT", second(110), o) for o in range(3)]
        + [("MSFT", second(s), 0) for s in range(111, 300)]
    )
    assert stats.written == 302
    assert not stats.skipped


@given(
    st.lists(
        st.tuples(
            st.integers(-2_208_988_800_000_000, 7_258_118_400_000_000),
            st.integers(-(10**12), 10**12),
            st.integers(0, 10**6),
            st.sampled_from([0, 1, 2, 3]),
        ),
        max_size=40,
    ),
    st.booleans(),
)
def test_bar_texts_made_per_batch_equal_bar_json(bars, final):
    ts = np.array([b[0] - b[0] % 60_000_000 for b in bars], dtype=np.int64)  # minutes repeat across bars
    prices = np.array([b[1] for b in bars], dtype=np.int64)
    volume = np.array([b[2] for b in bars], dtype=np.int64)
    anomalies = np.array([b[3] for b in bars], dtype=np.int64)
    expected = [
        bar_json(utc(t), p, p + 1, p - 1, p, v, a, final)
        for t, p, v, a in zip(ts.tolist(), prices.tolist(), volume.tolist(), anomalies.tolist(), strict=True)
    ]
    assert bar_datas(ts, prices, prices + 1, prices - 1, prices, volume, anomalies, final) == expected


def test_spans_and_ordinals_hold_for_any_symbol_id():
    big = 2**50 + 3  # packed keys use dense numbers, never the ids themselves
    t0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    bars = [BarIn(big, "1m", t0 + timedelta(minutes=i), 1, P, P, P, P, 1) for i in range(3)]
    bars.append(BarIn(7, "1m", t0, 1, P, P, P, P, 1))
    assert bar_spans(columns_of(BarColumns, bars)) == {
        (big, "1m"): (t0, t0 + timedelta(minutes=2)),
        (7, "1m"): (t0, t0),
    }

    normaliser = Normaliser(_resolver(), Stats())
    ids = np.array([big, big, 7], dtype=np.int64)
    publishers = np.array([1, 1, 1], dtype=np.int64)
    ordinals = normaliser._ordinals(ids, publishers, np.array([5, 5, 5]), np.array([9, 9, 9]))
    assert ordinals.tolist() == [0, 1, 0]
    assert normaliser.last_trade == {(big, 1): (5, 9, 1), (7, 1): (5, 9, 0)}
