"""ingest replay: the shared Databento samples and written DBN files through the real pipeline."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import databento_dbn as dbn
import psycopg
import pytest
import redis
from django.conf import settings
from django.core.management import CommandError, call_command

from ingest.pipeline import FeedLock, IngestLockedError, advisory_key
from ingest.records import BAR_RTYPES, RAW_SIZES, RawRecords
from ingest.sources.replay import FileStart, file_records, run_replay
from ingest.stats import Stats
from marketdata.models import Bar, FeedStatus, Symbol, Trade
from tests.conftest import SAMPLES, dbn_records

from .dbnfile import NS, bar, metadata, write

pytestmark = pytest.mark.django_db(transaction=True)
T0 = 1704205800  # 2024-01-02T14:30:00Z

SAMPLE_FILES = sorted(p for p in SAMPLES.glob("*/*.dbn*") if any(s in p.name for s in ("ohlcv", "trades", "live")))


def _expected(path: Path) -> tuple[set[tuple], set[tuple]]:
    """Bars and trades as Databento's own reader decodes them: (ticker, ...) tuples."""
    records = dbn_records(path)
    store_ids: dict[int, str] = {}
    import databento

    meta = databento.DBNStore.from_file(path).metadata
    for ticker, intervals in meta.mappings.items():
        for interval in intervals:
            store_ids[int(interval["symbol"])] = ticker
    for r in records:
        if isinstance(r, dbn.SymbolMappingMsg):
            store_ids[r.instrument_id] = r.stype_in_symbol
    bars, trades = set(), set()
    for r in records:
        if isinstance(r, dbn.OHLCVMsg) and int(r.rtype) in BAR_RTYPES:
            bars.add((store_ids[r.instrument_id], BAR_RTYPES[int(r.rtype)], r.ts_event // 1000, r.publisher_id,
                      r.open, r.high, r.low, r.close, r.volume))  # fmt: skip
        elif isinstance(r, dbn.TradeMsg):
            trades.add((store_ids[r.instrument_id], r.ts_event // 1000, r.publisher_id, r.sequence, r.price, r.size))
    return bars, trades


def _stored() -> tuple[set[tuple], set[tuple]]:
    tickers = dict(Symbol.objects.values_list("pk", "ticker"))

    def us(ts: datetime) -> int:
        return int(ts.timestamp()) * 1_000_000 + ts.microsecond

    bars = {
        (tickers[b.symbol_id], b.timeframe, us(b.ts), b.publisher_id, b.open, b.high, b.low, b.close, b.volume)
        for b in Bar.objects.all()
    }
    trades = {
        (tickers[t.symbol_id], us(t.ts_event), t.publisher_id, t.sequence, t.price, t.size) for t in Trade.objects.all()
    }
    return bars, trades


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_sample_replays_to_what_databento_decodes(path):
    results = run_replay(paths=[path], speed=None, loop=False, symbols=None, publish=False, install_signals=False)
    expected_bars, expected_trades = _expected(path)

    assert _stored() == (expected_bars, expected_trades)
    assert expected_bars or expected_trades
    assert not any(stats.errors for stats in results.values())

    again = run_replay(paths=[path], speed=None, loop=False, symbols=None, publish=False, install_signals=False)
    assert _stored() == (expected_bars, expected_trades)
    assert sum(s.written for s in again.values()) == 0
    # (the live capture's MBP-1 records are quotes, stored once too: tests/ingest/test_quotes.py)
    quotes = sum(isinstance(r, dbn.MBP1Msg) for r in dbn_records(path))
    assert sum(s.duplicates for s in again.values()) == len(expected_bars) + len(expected_trades) + quotes


def test_dbn_versions_one_to_three_store_the_same_rows():
    stored = []
    for name in ("test_data.ohlcv-1m.v1.dbn.zst", "test_data.ohlcv-1m.v2.dbn.zst", "test_data.ohlcv-1m.v3.dbn.zst"):
        Bar.objects.all().delete()
        run_replay(paths=[SAMPLES / "dbn-repo" / name], speed=None, loop=False, symbols=None, publish=False,
                   install_signals=False)  # fmt: skip
        stored.append(_stored())
    assert stored[0] == stored[1] == stored[2]
    assert len(stored[0][0]) == 2


def test_opra_keeps_every_publishers_bar():
    run_replay(paths=[SAMPLES / "OPRA.PILLAR" / "test_data.ohlcv-1m.dbn.zst"], speed=None, loop=False, symbols=None,
               publish=False, install_signals=False)  # fmt: skip
    assert sorted(Bar.objects.values_list("publisher_id", flat=True)) == [22, 31, 33, 37]


def test_truncated_file_stores_every_whole_record_and_reports_the_cut(tmp_path):
    records = [bar(7, T0 + 60 * i, 100 + i) for i in range(10)]
    full = metadata(symbols={"AAPL": 7}) + b"".join(records)
    cut = tmp_path / "cut.dbn"
    cut.write_bytes(full[: len(full) - 20])  # the last record loses its tail

    results = run_replay(paths=[cut], speed=None, loop=False, symbols=None, publish=False, install_signals=False)

    assert Bar.objects.count() == 9
    stats = results["XNAS.ITCH"]
    assert stats.errors["truncated_file"] == 1
    assert "file ends inside a record (36 bytes after the last whole record)" in stats.last_error
    assert FeedStatus.objects.get(dataset="XNAS.ITCH").errors == 1


def test_corrupt_and_missing_files_are_reported_and_the_rest_goes_on(tmp_path):
    garbage = tmp_path / "garbage.dbn"
    garbage.write_bytes(b"not a dbn file at all" * 10)
    good = write(tmp_path / "good.dbn.zst", metadata(symbols={"AAPL": 7}), [bar(7, T0, 100)], zstd=True)

    results = run_replay(paths=[garbage, tmp_path / "nope.dbn", good], speed=None, loop=False, symbols=None,
                         publish=False, install_signals=False)  # fmt: skip

    assert Bar.objects.count() == 1
    unread = results["(unreadable files)"]
    assert unread.errors == {"corrupt_file": 1, "missing_file": 1}


def test_unknown_instrument_and_undefined_price_are_counted_not_stored(tmp_path):
    undefined = bytes(
        dbn.OHLCVMsg(rtype=int(dbn.RType.OHLCV_1M), publisher_id=2, instrument_id=7, ts_event=(T0 + 60) * 10**9,
                     open=dbn.UNDEF_PRICE, high=dbn.UNDEF_PRICE, low=dbn.UNDEF_PRICE, close=dbn.UNDEF_PRICE, volume=0)
    )  # fmt: skip
    path = write(tmp_path / "bad.dbn", metadata(symbols={"AAPL": 7}), [bar(7, T0, 100), undefined, bar(999, T0, 5)])

    stats = run_replay(paths=[path], speed=None, loop=False, symbols=None, publish=False, install_signals=False)[
        "XNAS.ITCH"
    ]

    assert Bar.objects.count() == 1
    assert stats.skipped == {"undefined_price": 1, "unknown_instrument": 1}


def test_symbols_filter(tmp_path):
    path = write(tmp_path / "two.dbn", metadata(symbols={"AAPL": 7, "MSFT": 8}), [bar(7, T0, 100), bar(8, T0, 300)])
    call_command("ingest", "replay", str(path), "--symbols", "MSFT", "--no-publish")
    assert list(Symbol.objects.values_list("ticker", flat=True)) == ["MSFT"]
    assert Bar.objects.count() == 1


def test_second_ingester_for_the_same_feed_refuses(tmp_path):
    path = write(tmp_path / "a.dbn", metadata(symbols={"AAPL": 7}), [bar(7, T0, 100)])
    key = advisory_key("XNAS.ITCH", "ohlcv-1m")
    with psycopg.connect(_dsn(), autocommit=True) as other:  # another machine's ingester, say
        other.execute("SELECT pg_advisory_lock(%s)", [key])
        with pytest.raises(CommandError, match=r"another ingester already runs for XNAS\.ITCH ohlcv-1m"):
            call_command("ingest", "replay", str(path), "--no-publish")
        assert not Bar.objects.exists()

    lock = FeedLock()
    # Free again once that session ended: the server lets go when its backend exits, a
    # moment after the client closed the connection.
    deadline = time.monotonic() + 10
    while True:
        try:
            lock.acquire("XNAS.ITCH", "ohlcv-1m")
            break
        except IngestLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        with psycopg.connect(_dsn(), autocommit=True) as other:
            row = other.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
        assert row == (False,)
    finally:
        lock.release()


def test_published_after_commit_with_consecutive_seq(tmp_path, redis_client, publish_host):
    path = write(tmp_path / "pub.dbn", metadata(symbols={"AAPL": 7}), [bar(7, T0 + 60 * i, 100 + i) for i in range(5)])
    pubsub = redis.Redis.from_url(settings.REDIS_URL).pubsub()
    from streaming.publish import channel_of, message_frames

    pubsub.subscribe(channel_of("bars:1m:AAPL"))
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    seen_in_db_at_receipt: list[int] = []
    frames: list[dict] = []

    def listen() -> None:
        import msgpack

        while len(frames) < 5:
            message = pubsub.get_message(timeout=5)
            if message is None:
                return
            if message["type"] != "message":
                continue
            for text in message_frames(msgpack.unpackb(message["data"])):
                frame = json.loads(text)
                with psycopg.connect(_dsn()) as conn:
                    ts = datetime.fromisoformat(frame["data"]["ts"])
                    row = conn.execute("SELECT count(*) FROM marketdata_bar WHERE ts = %s", [ts]).fetchone()
                    seen_in_db_at_receipt.append(row[0] if row else 0)
                frames.append(frame)

    listener = threading.Thread(target=listen)
    listener.start()
    run_replay(paths=[path], speed=None, loop=False, symbols=None, publish=True, install_signals=False)
    listener.join(timeout=10)
    pubsub.close()

    assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5]
    assert [f["data"]["close"] for f in frames] == [100, 101, 102, 103, 104]
    assert seen_in_db_at_receipt == [1] * 5  # each bar was committed before it was published
    assert [f["seq"] for f in buffer_frames(redis_client, "bars:1m:AAPL")] == [1, 2, 3, 4, 5]


def buffer_frames(client: redis.Redis, stream: str) -> list[dict]:
    """Every frame in a stream's replay buffer, in order."""
    from streaming.publish import frames_build

    frames: list[dict] = []
    entries: Any = client.xrange(f"md:buf:{stream}")
    for entry_id, fields in entries:
        last, n = int(entry_id.split(b"-")[0]), int(fields[b"n"])
        datas = fields[b"d"].decode().split("\n")
        frames += [json.loads(text) for text in frames_build(fields[b"k"].decode(), stream, last - n + 1, datas)]
    return frames


def _dsn() -> str:
    db = settings.DATABASES["default"]
    return f"host={db['HOST']} port={db['PORT']} user={db['USER']} dbname={db['NAME']}"


def test_forming_bars_derived_from_seconds(tmp_path, redis_client, publish_host):
    seconds = [bar(7, T0 + s, 100 + s, rtype=dbn.RType.OHLCV_1S, volume=1) for s in (0, 20, 59, 60)]
    path = write(tmp_path / "live.dbn", metadata(symbols={"AAPL": 7}, schema=None), seconds)
    run_replay(paths=[path], speed=None, loop=False, symbols=None, publish=True, install_signals=False)

    frames = buffer_frames(redis_client, "bars:1m:AAPL")
    last_by_ts: dict[str, dict] = {}
    for frame in frames:
        last_by_ts[frame["data"]["ts"]] = frame["data"]
    first_minute = last_by_ts["2024-01-02T14:30:00Z"]
    assert first_minute["final"] is True
    assert (first_minute["open"], first_minute["high"], first_minute["close"], first_minute["volume"]) == (
        100,
        160,
        159,
        3,
    )
    assert last_by_ts["2024-01-02T14:31:00Z"]["final"] is False
    five = [frame["data"] for frame in buffer_frames(redis_client, "bars:5m:AAPL")]
    assert five[-1]["ts"] == "2024-01-02T14:30:00Z"
    assert five[-1]["volume"] == 4
    assert five[-1]["final"] is False


def _lock_holder(key: int) -> int | None:
    with psycopg.connect(_dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND ((classid::bigint << 32) | objid::bigint) = %s",
            [key],
        ).fetchone()
    return row[0] if row else None


def _wait_for(predicate: Any, seconds: float = 10) -> Any:
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_a_feed_lock_whose_session_died_is_taken_again(monkeypatch, transactional_db):
    monkeypatch.setattr("ingest.feed_lock.LOCK_CHECK_S", 0.1)
    key = advisory_key("XNAS.ITCH", "ohlcv-1m")
    lock = FeedLock()
    lock.acquire("XNAS.ITCH", "ohlcv-1m")
    try:
        first = _wait_for(lambda: _lock_holder(key))
        with psycopg.connect(_dsn(), autocommit=True) as admin:  # as a PostgreSQL restart would
            admin.execute("SELECT pg_terminate_backend(%s)", [first])
        again = _wait_for(lambda: (pid := _lock_holder(key)) and pid != first and pid)
        assert again != first
        lock.check()  # nobody else took it: the run goes on
    finally:
        lock.release()


def test_a_feed_lock_taken_by_another_ingester_meanwhile_stops_the_run(monkeypatch, transactional_db):
    monkeypatch.setattr("ingest.feed_lock.LOCK_CHECK_S", 0.1)
    key = advisory_key("XNAS.ITCH", "ohlcv-1m")
    lock = FeedLock()
    lock.acquire("XNAS.ITCH", "ohlcv-1m")
    try:
        with psycopg.connect(_dsn(), autocommit=True) as other:
            with lock._guard:  # the keeper looks only once the other ingester holds the lock
                other.execute("SELECT pg_terminate_backend(%s)", [_wait_for(lambda: _lock_holder(key))])
                _wait_for(lambda: other.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone() == (True,))
            _wait_for(lambda: lock.lost is not None)
            with pytest.raises(IngestLockedError, match="another ingester holds it now"):
                lock.check()
    finally:
        lock.release()


def test_a_bar_batch_bumps_the_cache_version_naming_its_first_bar(tmp_path, redis_client):
    """Cached pages wholly before a batch's bars stay valid (the bump names where it starts)."""
    from marketdata.cache import versions

    path = write(tmp_path / "b.dbn", metadata(symbols={"AAPL": 7}), [bar(7, T0 + 60 * i, 100 + i) for i in range(5)])
    run_replay(paths=[path], speed=None, loop=False, symbols=None, publish=False, install_signals=False)

    symbol = Symbol.objects.get(ticker="AAPL")
    version = int(redis_client.get(versions.version_key(symbol.pk)))
    log = versions.changes_parse(redis_client.get(versions.changes_key(symbol.pk)))
    assert log is not None
    assert log.records[-1] == (version, {"1m": T0 * 1_000_000})  # T0 in seconds; the log holds microseconds


def _read(path: Path, *, raw: bool) -> tuple[list[bytes], list[str], Stats]:
    """The records file_records delivers (as bytes), the kinds of its items, and its stats."""
    stats = Stats()
    records: list[bytes] = []
    kinds: list[str] = []
    for item in file_records(path, stats, raw=raw):
        kinds.append(type(item).__name__)
        if isinstance(item, RawRecords):
            size = RAW_SIZES[item.kind]
            records += [item.data[at : at + size] for at in range(0, len(item.data), size)]
        elif not isinstance(item, FileStart):
            records += [bytes(r) for r in item]  # type: ignore[call-overload]
    return records, kinds, stats


@pytest.mark.parametrize("zstd", [False, True])
def test_a_file_of_one_layout_reads_as_its_bytes_and_another_record_hands_the_rest_to_the_decoder(tmp_path, zstd):
    bars = [bar(7, T0 + 60 * i, 100 + i) for i in range(300)]
    remap = bytes(
        dbn.SymbolMappingMsg(
            publisher_id=0, instrument_id=7, ts_event=(T0 + 300 * 60) * NS, stype_in=dbn.SType.RAW_SYMBOL,
            stype_in_symbol="AAPL", stype_out=dbn.SType.RAW_SYMBOL, stype_out_symbol="AAPL",
            start_ts=(T0 + 300 * 60) * NS, end_ts=(T0 + 400 * 60) * NS,
        )
    )  # fmt: skip
    later = [bar(7, T0 + 60 * (301 + i), 200 + i) for i in range(50)]
    suffix = ".dbn.zst" if zstd else ".dbn"
    uniform = write(tmp_path / f"uniform{suffix}", metadata(symbols={"AAPL": 7}), bars, zstd=zstd)
    mixed = write(tmp_path / f"mixed{suffix}", metadata(symbols={"AAPL": 7}), [*bars, remap, *later], zstd=zstd)

    records, kinds, stats = _read(uniform, raw=True)
    assert kinds[0] == "FileStart"
    assert set(kinds[1:]) == {"RawRecords"}
    assert records == _read(uniform, raw=False)[0] == bars
    assert not stats.errors

    records, kinds, stats = _read(mixed, raw=True)
    assert kinds.count("FileStart") == 1
    assert "RawRecords" in kinds
    assert "list" in kinds
    assert records == _read(mixed, raw=False)[0]  # every record once, in order
    assert len(records) == 351
    assert records[:300] == bars
    assert records[301:] == later
    assert not stats.errors


def test_bars_read_as_bytes_that_columns_cannot_hold_go_one_by_one(tmp_path):
    records = [bar(7, T0 + 60 * i, 100 + i) for i in range(3)]
    past_limit = bytearray(bar(7, T0 + 180, 103))
    past_limit[8:16] = (2**62 + 5).to_bytes(8, "little")  # ts_event past COLUMN_TS_LIMIT (and past a datetime)
    path = write(tmp_path / "far.dbn", metadata(symbols={"AAPL": 7}), [*records, bytes(past_limit)])

    results = run_replay(paths=[path], speed=None, loop=False, symbols=None, publish=False, install_signals=False)

    stats = results["XNAS.ITCH"]
    assert Bar.objects.count() == 3  # the run went one by one, as the decoder's records do
    assert stats.records == 4
    assert sum(stats.skipped.values()) + sum(stats.errors.values()) == 1
