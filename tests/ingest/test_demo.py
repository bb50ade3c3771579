# mypy: disable-error-code="union-attr,attr-defined,arg-type"
# (DBNStore yields a union of every DBN record type; these tests know each file's schema.)
"""The demo feed (ingest.demo, manage.py demo_data): realistic DBN files that the ingester stores."""

from __future__ import annotations

import io
import statistics
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import databento
import databento_dbn as dbn
import pytest
from django.core.management import CommandError, call_command

from ingest import demo
from ingest.anomalies import AnomalyDetector
from marketdata.models import Bar, Symbol, Trade
from marketdata.timeframes import ANOMALY_HALT_ZERO_VOLUME, ANOMALY_VOLUME_SPIKE

# A Wednesday; its five history days (Mar 5-11, 2025) span the US switch to daylight time on Mar 9.
NOW = datetime(2025, 3, 12, 15, 0, tzinfo=UTC)
HISTORY_DAYS = [date(2025, 3, 5), date(2025, 3, 6), date(2025, 3, 7), date(2025, 3, 10), date(2025, 3, 11)]
NS = 1_000_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ny(ts_ns: int) -> datetime:
    return datetime.fromtimestamp(ts_ns / NS, tz=UTC).astimezone(demo.NEW_YORK)


def _minute_of_session(ts_ns: int) -> int:
    local = _ny(ts_ns)
    return (local.hour * 60 + local.minute) - (9 * 60 + 30)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("demo")
    written = demo.write_demo(out=out, now=NOW)
    return {f.path.name: f.path for f in written}


@pytest.fixture(scope="module")
def history(files: dict[str, Path]) -> databento.DBNStore:
    return databento.DBNStore.from_file(files[demo.HISTORY_FILE])


@pytest.fixture(scope="module")
def bars(history: databento.DBNStore) -> list[dbn.OHLCVMsg]:
    return list(history)


@pytest.fixture(scope="module")
def live(files: dict[str, Path]) -> databento.DBNStore:
    return databento.DBNStore.from_file(files[demo.LIVE_FILE])


@pytest.fixture(scope="module")
def live_records(live: databento.DBNStore) -> list[object]:
    return list(live)


def test_files_are_dbn_v3_zstd_and_decode(history: databento.DBNStore, live: databento.DBNStore) -> None:
    for store in (history, live):
        assert store.compression == databento.Compression.ZSTD
        assert store.metadata.version == 3
        assert store.dataset == "XNAS.ITCH"
        assert store.metadata.stype_in == dbn.SType.RAW_SYMBOL
        assert store.metadata.stype_out == dbn.SType.INSTRUMENT_ID
    assert history.schema == dbn.Schema.OHLCV_1M
    assert live.schema is None  # a mixed-schema file
    assert history.metadata.start == demo.session_open_ns(day=HISTORY_DAYS[0])


@pytest.mark.filterwarnings("ignore:The inplace keyword:DeprecationWarning")  # databento's to_df on pandas 3
def test_symbols_and_mappings(history: databento.DBNStore, live: databento.DBNStore, bars: list[dbn.OHLCVMsg]) -> None:
    for store in (history, live):
        symbols = store.symbols
        assert len(symbols) >= 20
        assert "BRK.B" in symbols
        mappings = store.metadata.mappings
        assert set(mappings) == set(symbols)
        ids = [int(intervals[0]["symbol"]) for intervals in mappings.values()]
        assert len(set(ids)) == len(ids)  # a distinct instrument_id per symbol
    days = history.metadata.mappings
    assert all(i[0]["start_date"] == HISTORY_DAYS[0] for i in days.values())
    assert all(i[0]["end_date"] == HISTORY_DAYS[-1] + timedelta(days=1) for i in days.values())
    mapped = {int(i[0]["symbol"]) for i in days.values()}
    assert {b.instrument_id for b in bars} == mapped
    # Databento's own symbology resolves every record to its ticker.
    frame = history.to_df(pretty_ts=False, map_symbols=True)
    assert frame["symbol"].notna().all()
    assert set(frame["symbol"]) == set(history.symbols)


def test_prices_on_tick_grid_and_bars_consistent(bars: list[dbn.OHLCVMsg], live_records: list[object]) -> None:
    assert bars
    for record in [*bars, *live_records]:
        if isinstance(record, dbn.TradeMsg):
            assert record.price % demo.TICK == 0
            assert record.price > 0
            continue
        assert isinstance(record, dbn.OHLCVMsg)
        for price in (record.open, record.high, record.low, record.close):
            assert price % demo.TICK == 0, record
            assert price > 0
        assert record.high >= max(record.open, record.close) >= min(record.open, record.close) >= record.low


def test_weekdays_regular_hours_and_dst(bars: list[dbn.OHLCVMsg]) -> None:
    per_day: dict[tuple[int, date], int] = defaultdict(int)
    for bar in bars:
        local = _ny(bar.ts_event)
        assert local.weekday() < 5, f"bar on a weekend: {local}"
        assert time(9, 30) <= local.time() < time(16, 0), local
        per_day[(bar.instrument_id, local.date())] += 1
    assert sorted({d for _, d in per_day}) == HISTORY_DAYS  # the five weekdays before the live day
    assert set(per_day.values()) == {demo.SESSION_MINUTES}  # full sessions, one bar a minute
    opens = {_ny(b.ts_event).date(): b.ts_event for b in reversed(bars)}
    # 09:30 New York is 14:30 UTC before the switch to daylight time and 13:30 UTC after it.
    assert datetime.fromtimestamp(opens[date(2025, 3, 7)] / NS, tz=UTC).time() == time(14, 30)
    assert datetime.fromtimestamp(opens[date(2025, 3, 10)] / NS, tz=UTC).time() == time(13, 30)
    assert [b.ts_event for b in bars] == sorted(b.ts_event for b in bars)


def test_exactly_one_halt(bars: list[dbn.OHLCVMsg]) -> None:
    zero = [b for b in bars if b.volume == 0]
    assert len(zero) == demo.HALT_BARS
    assert len({(b.instrument_id, _ny(b.ts_event).date()) for b in zero}) == 1
    times = [b.ts_event for b in zero]
    assert times == list(range(times[0], times[0] + demo.HALT_BARS * demo.MINUTE_NS, demo.MINUTE_NS))  # one run
    same = [b for b in bars if b.instrument_id == zero[0].instrument_id]
    before = same[same.index(zero[0]) - 1]
    for bar in zero:  # a halt prints nothing: the price stays at the last trade
        assert bar.open == bar.high == bar.low == bar.close == before.close


def test_exactly_one_spike_and_the_ingester_flags_only_the_planted_bars(bars: list[dbn.OHLCVMsg]) -> None:
    detector = AnomalyDetector()
    flagged = [(detector.flags(b.instrument_id, "1m", b.volume), b) for b in bars]
    spikes = [b for flags, b in flagged if flags == ANOMALY_VOLUME_SPIKE]
    halts = [b for flags, b in flagged if flags == ANOMALY_HALT_ZERO_VOLUME]
    assert len(spikes) == 1
    assert len(halts) == demo.HALT_BARS
    spike = spikes[0]
    neighbours = [
        b.volume
        for b in bars
        if b.instrument_id == spike.instrument_id and 0 < abs(b.ts_event - spike.ts_event) <= 15 * demo.MINUTE_NS
    ]
    assert spike.volume >= 20 * statistics.median(neighbours)


def test_u_shaped_intraday_volume(bars: list[dbn.OHLCVMsg]) -> None:
    by_minute: dict[int, list[int]] = defaultdict(list)
    for bar in bars:
        by_minute[_minute_of_session(bar.ts_event)].append(bar.volume)
    edges = [v for m in [*range(30), *range(360, 390)] for v in by_minute[m]]
    midday = [v for m in range(150, 240) for v in by_minute[m]]  # 12:00-13:30
    assert statistics.mean(edges) > 2 * statistics.mean(midday)


def test_live_session_aggregates(live_records: list[object]) -> None:
    trades = [r for r in live_records if isinstance(r, dbn.TradeMsg)]
    seconds = [r for r in live_records if isinstance(r, dbn.OHLCVMsg) and r.rtype == dbn.RType.OHLCV_1S]
    minutes = [r for r in live_records if isinstance(r, dbn.OHLCVMsg) and r.rtype == dbn.RType.OHLCV_1M]
    assert len(trades) + len(seconds) + len(minutes) == len(live_records) < 300_000
    assert len(minutes) == 20 * demo.LIVE_MINUTES

    start = demo.session_open_ns(day=date(2025, 3, 12))
    assert all(start <= r.ts_event < start + demo.LIVE_MINUTES * demo.MINUTE_NS for r in seconds + minutes + trades)

    def ohlcv(prices: list[tuple[int, int, int, int, int]]) -> tuple[int, int, int, int, int]:
        return (
            prices[0][0],
            max(p[1] for p in prices),
            min(p[2] for p in prices),
            prices[-1][3],
            sum(p[4] for p in prices),
        )

    per_second: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = defaultdict(list)
    for t in sorted(trades, key=lambda t: (t.instrument_id, t.ts_event)):
        per_second[(t.instrument_id, t.ts_event // NS * NS)].append((t.price, t.price, t.price, t.price, t.size))
    assert {(b.instrument_id, b.ts_event) for b in seconds} == set(per_second)  # a 1s bar for each traded second
    per_minute: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = defaultdict(list)
    for b in sorted(seconds, key=lambda b: (b.instrument_id, b.ts_event)):
        assert (b.open, b.high, b.low, b.close, b.volume) == ohlcv(per_second[(b.instrument_id, b.ts_event)])
        minute = b.ts_event - b.ts_event % demo.MINUTE_NS
        per_minute[(b.instrument_id, minute)].append((b.open, b.high, b.low, b.close, b.volume))
    assert {(b.instrument_id, b.ts_event) for b in minutes} == set(per_minute)
    for b in minutes:
        assert (b.open, b.high, b.low, b.close, b.volume) == ohlcv(per_minute[(b.instrument_id, b.ts_event)])


def test_live_delivery_order(live_records: list[object]) -> None:
    """Trades by receive time; a 1s bar after its second's trades; a 1m bar right after its minute's 1s bars."""
    trade_recv = [r.ts_recv for r in live_records if isinstance(r, dbn.TradeMsg)]
    assert trade_recv == sorted(trade_recv)
    last_trade: dict[int, int] = {}
    seen_seconds: dict[int, int] = defaultdict(int)  # minute -> 1s bars delivered so far
    second_counts: dict[int, int] = defaultdict(int)
    for r in live_records:
        if isinstance(r, dbn.OHLCVMsg) and r.rtype == dbn.RType.OHLCV_1S:
            second_counts[r.ts_event - r.ts_event % demo.MINUTE_NS] += 1
    latest_second = 0
    for r in live_records:
        if isinstance(r, dbn.TradeMsg):
            assert r.ts_event >= last_trade.get(r.instrument_id, 0)  # each symbol's trades in time order
            last_trade[r.instrument_id] = r.ts_event
            assert r.ts_recv >= latest_second + NS  # no trade of a second whose bar is already out
        elif r.rtype == dbn.RType.OHLCV_1S:
            assert last_trade[r.instrument_id] < r.ts_event + NS
            latest_second = max(latest_second, r.ts_event)
            seen_seconds[r.ts_event - r.ts_event % demo.MINUTE_NS] += 1
        else:
            assert seen_seconds[r.ts_event] == second_counts[r.ts_event]  # every 1s bar of the minute is out
            assert latest_second < r.ts_event + demo.MINUTE_NS  # and none of a later minute


def test_live_session_trips_no_anomaly(live_records: list[object]) -> None:
    detector = AnomalyDetector()
    for r in live_records:
        if isinstance(r, dbn.OHLCVMsg):
            tf = "1s" if r.rtype == dbn.RType.OHLCV_1S else "1m"
            assert detector.flags(r.instrument_id, tf, r.volume) == 0, r


def test_same_seed_same_bytes(tmp_path: Path, files: dict[str, Path]) -> None:
    again = demo.write_demo(out=tmp_path / "again", now=NOW + timedelta(hours=2))  # same New York day
    for written in again:
        assert written.path.read_bytes() == files[written.path.name].read_bytes()
    other = demo.write_demo(out=tmp_path / "other", now=NOW, seed=7, symbols=20, days=1)
    assert other[0].path.read_bytes() != files[demo.HISTORY_FILE].read_bytes()


def test_calendar() -> None:
    assert demo.live_day(now=datetime(2025, 3, 15, 15, tzinfo=UTC)) == date(2025, 3, 14)  # Saturday -> Friday
    assert demo.live_day(now=datetime(2025, 3, 11, 2, tzinfo=UTC)) == date(2025, 3, 10)  # still Monday in New York
    assert demo.trading_days(before=date(2025, 3, 10), count=3) == [
        date(2025, 3, 5),
        date(2025, 3, 6),
        date(2025, 3, 7),
    ]


def test_command_writes_files_and_prints_counts(tmp_path: Path) -> None:
    out = io.StringIO()
    call_command("demo_data", "--symbols", "21", "--days", "1", "--out", str(tmp_path), "--seed", "3", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"{tmp_path / demo.HISTORY_FILE}: {21 * 390} records (ohlcv-1m {21 * 390})"
    assert lines[1].startswith(f"{tmp_path / demo.LIVE_FILE}: ")
    assert "trades" in lines[1]
    assert "ohlcv-1s" in lines[1]
    assert len(databento.DBNStore.from_file(tmp_path / demo.HISTORY_FILE).symbols) == 21
    with pytest.raises(CommandError, match="symbols must be between 1 and"):
        call_command("demo_data", "--symbols", "0", "--out", str(tmp_path))
    with pytest.raises(CommandError, match="days must be at least 1"):
        call_command("demo_data", "--days", "0", "--out", str(tmp_path))


@pytest.mark.django_db(transaction=True)
def test_replay_stores_history_with_anomaly_flags(tmp_path: Path) -> None:
    [history, _] = demo.write_demo(out=tmp_path, now=NOW, days=2)
    records = list(databento.DBNStore.from_file(history.path))
    tickers = {int(i[0]["symbol"]): t for t, i in databento.DBNStore.from_file(history.path).metadata.mappings.items()}

    call_command("ingest", "replay", str(history.path), "--no-publish", stdout=io.StringIO(), stderr=io.StringIO())

    assert Bar.objects.filter(timeframe="1m").count() == len(records) == history.counts["ohlcv-1m"]
    symbols = dict(Symbol.objects.values_list("pk", "ticker"))

    def stored(flag: int) -> set[tuple[str, int]]:
        rows = Bar.objects.filter(anomalies=flag).values_list("symbol_id", "ts")
        return {(symbols[sid], (ts - EPOCH) // timedelta(microseconds=1)) for sid, ts in rows}

    halt = {(tickers[r.instrument_id], r.ts_event // 1000) for r in records if r.volume == 0}
    assert len(halt) == demo.HALT_BARS
    assert stored(ANOMALY_HALT_ZERO_VOLUME) == halt
    previous: dict[int, int] = {}
    jumps = []  # (volume / the symbol's previous volume, record)
    for r in records:
        if previous.get(r.instrument_id):
            jumps.append((r.volume / previous[r.instrument_id], r))
        previous[r.instrument_id] = r.volume
    spike = max(jumps, key=lambda pair: pair[0])[1]
    assert stored(ANOMALY_VOLUME_SPIKE) == {(tickers[spike.instrument_id], spike.ts_event // 1000)}
    assert Bar.objects.exclude(anomalies=0).count() == demo.HALT_BARS + 1


@pytest.mark.django_db(transaction=True)
def test_replay_stores_the_live_session(tmp_path: Path) -> None:
    [_, live] = demo.write_demo(out=tmp_path, now=NOW, days=1)
    out = io.StringIO()

    call_command("ingest", "replay", str(live.path), "--no-publish", stdout=out, stderr=io.StringIO())

    assert Bar.objects.filter(timeframe="1s").count() == live.counts["ohlcv-1s"]
    assert Bar.objects.filter(timeframe="1m").count() == live.counts["ohlcv-1m"]
    assert Trade.objects.count() == live.counts["trades"]
    assert not Bar.objects.exclude(anomalies=0).exists()
    assert "skipped: none; errors: none; warnings: none" in out.getvalue()
