"""ingest live: the real databento.Live client against a local gateway speaking Databento's live protocol."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import databento_dbn as dbn
import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection

from ingest import pipeline, writers
from ingest.pipeline import FeedLock
from ingest.records import BAR_RTYPES
from ingest.sources import live_records
from ingest.sources.live import LiveAuthError, parse_gateway, reconnect_backoff, run_live
from ingest.stats import Stats
from marketdata.errors import ValidationError
from marketdata.models import Bar, FeedStatus, InstrumentMapping, Quote, StatusChange, Symbol, Trade
from ops import metrics

from .databento_live import LiveGateway, Plan, cram_response, parse_line

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("publish_host")]  # (conftest.py)

NS = 1_000_000_000
P = 1_000_000_000
KEY = "db-" + "A" * 24 + "good1"
OTHER_KEY = "db-" + "B" * 24 + "good1"  # same bucket id, another key
SYMBOLS = {"AAPL": 7, "MSFT": 8}
WAIT_S = 20.0


def minute_floor(ns: int) -> int:
    return ns - ns % (60 * NS)


def bars(count: int, *, ago_s: int = 3 * 3600, rtype: dbn.RType = dbn.RType.OHLCV_1M) -> list[dbn.OHLCVMsg]:
    """Bars for AAPL and MSFT (1m unless told), ``count`` of them each, starting ``ago_s`` before now."""
    t0 = minute_floor(time.time_ns() - ago_s * NS)
    step = {dbn.RType.OHLCV_1S: 1, dbn.RType.OHLCV_1M: 60}[rtype] * NS
    out = []
    for i in range(count):
        for n, iid in enumerate(SYMBOLS.values()):
            close = 100 + n * 50 + i % 7
            out.append(
                dbn.OHLCVMsg(
                    rtype=int(rtype), publisher_id=2, instrument_id=iid, ts_event=t0 + i * step,
                    open=close * P, high=(close + 1) * P, low=(close - 1) * P, close=close * P, volume=100 + i,
                )
            )  # fmt: skip
    return out


def trades(count: int) -> list[dbn.TradeMsg]:
    """Trades of AAPL and MSFT; every tenth print repeats the one before it byte for byte (two prints
    sharing time and sequence: the store keeps both, with ordinals 0 and 1)."""
    ts = time.time_ns() - 2 * 3600 * NS
    out: list[dbn.TradeMsg] = []
    for i in range(count):
        if i % 10 == 9:
            out.append(out[-1])
            continue
        ts += 1_000_000 + i * 1000
        out.append(
            dbn.TradeMsg(
                publisher_id=2, instrument_id=list(SYMBOLS.values())[i % 2], ts_event=ts, price=(100 + i % 5) * P,
                size=1 + i % 3, action=dbn.Action.TRADE, side=dbn.Side.BID, depth=0, ts_recv=ts + 5_000, flags=0,
                ts_in_delta=0, sequence=1000 + i,
            )
        )  # fmt: skip
    return out


def us(ts: datetime) -> int:
    return int(ts.timestamp()) * 1_000_000 + ts.microsecond


def expected_bars(records: list[Any]) -> set[tuple]:
    tickers = {v: k for k, v in SYMBOLS.items()}
    return {
        (
            tickers[r.instrument_id],
            BAR_RTYPES[int(r.rtype)],
            r.ts_event // 1000,
            r.publisher_id,
            r.open,
            r.high,
            r.low,
            r.close,
            r.volume,
        )
        for r in records
    }


def stored_bars() -> set[tuple]:
    tickers = dict(Symbol.objects.values_list("pk", "ticker"))
    return {
        (tickers[b.symbol_id], b.timeframe, us(b.ts), b.publisher_id, b.open, b.high, b.low, b.close, b.volume)
        for b in Bar.objects.all()
    }


def expected_trades(records: list[Any]) -> list[tuple]:
    tickers = {v: k for k, v in SYMBOLS.items()}
    out, last = [], None
    for r in records:
        ordinal = last[2] + 1 if last and last[:2] == (r.ts_event, r.sequence) else 0
        last = (r.ts_event, r.sequence, ordinal)
        out.append((tickers[r.instrument_id], r.ts_event // 1000, r.sequence, ordinal, r.price, r.size))
    return sorted(out)


def stored_trades() -> list[tuple]:
    tickers = dict(Symbol.objects.values_list("pk", "ticker"))
    return sorted(
        (tickers[t.symbol_id], us(t.ts_event), t.sequence, t.ordinal, t.price, t.size) for t in Trade.objects.all()
    )


class Ingester:
    """run_live on a thread of its own (as the command runs it), with bounded waits."""

    def __init__(self, *, stopping: threading.Event | None = None, **kwargs: Any) -> None:
        self.stopping = stopping or threading.Event()
        self.kwargs = {"dataset": "XNAS.ITCH", "schema": "ohlcv-1m", "symbols": list(SYMBOLS), "key": KEY,
                       "publish": True, "backoff_max": 0.05, "watchdog_s": 10.0, **kwargs}  # fmt: skip
        self.result: Stats | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ingest-live-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = run_live(stopping=self.stopping, **self.kwargs)
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()

    def __enter__(self) -> Ingester:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():  # a failed test: never leave a run behind
            self.stopping.set()
            self.thread.join(WAIT_S)

    def stop(self, timeout: float = WAIT_S) -> Stats:
        self.stopping.set()
        return self.join(timeout)

    def join(self, timeout: float = WAIT_S) -> Stats:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stopping.set()
            self.thread.join(WAIT_S)
            pytest.fail(f"run_live did not return within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def wait_for(predicate, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    assert predicate(), "condition not met in time"


def start_of(records: list[Any]) -> datetime:
    """The first record's time as an aware datetime (floored to the microsecond, as --start is)."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=records[0].ts_event // 1000)


# -- the protocol as the real client speaks it -------------------------------------------------


def test_records_stream_through_the_real_client_and_are_stored_exactly():
    records = bars(30)
    with (
        LiveGateway(keys=[KEY], symbols=SYMBOLS, records=records, heartbeat_s=0.2) as gateway,
        Ingester(start=start_of(records), gateway=gateway.address) as ingester,
    ):
        wait_for(lambda: Bar.objects.count() == len(records))
        stats = ingester.stop()
        conn = gateway.connections[0]
        assert conn.done.wait(5)

    assert stored_bars() == expected_bars(records)
    assert stats.written == len(records)
    assert stats.duplicates == 0
    assert not stats.errors
    assert len(gateway.connections) == 1
    assert conn.ended == "client"  # the ingester closed it on stop
    # What the client said, as the gateway read it.
    auth = conn.auth
    assert auth["auth"] != KEY
    assert KEY not in conn.lines[0]
    assert auth["dataset"] == "XNAS.ITCH"
    assert (auth["encoding"], auth["ts_out"], auth["compression"]) == ("dbn", "0", "none")
    assert auth["heartbeat_interval_s"] == "5"
    assert auth["client"].startswith("Databento/")
    [sub] = conn.subscriptions
    assert (sub.schema, sub.stype_in, sub.symbols, sub.start) == (
        "ohlcv-1m",
        "raw_symbol",
        ["AAPL", "MSFT"],
        records[0].ts_event,
    )
    start = records[0].ts_event
    assert sub.raw == f"schema=ohlcv-1m|stype_in=raw_symbol|symbols=AAPL,MSFT|start={start}|snapshot=0|id=0|is_last=1"
    assert conn.lines[1:] == [sub.raw, "start_session=0"]
    # The live symbol mappings made the symbols and their instrument ids.
    assert set(InstrumentMapping.objects.values_list("symbol__ticker", "instrument_id")) == set(SYMBOLS.items())
    assert FeedStatus.objects.get(dataset="XNAS.ITCH", schema="ohlcv-1m").source == "live"


def test_quotes_and_status_stream_through_the_real_client_and_are_stored_exactly():
    t0 = time.time_ns() - 3600 * NS
    undef = 2**63 - 1
    quotes = [
        dbn.MBP1Msg(
            publisher_id=2, instrument_id=list(SYMBOLS.values())[i % 2], ts_event=t0 + i * NS, price=100 * P, size=1,
            action=dbn.Action.ADD, side=dbn.Side.BID, depth=0, ts_recv=t0 + i * NS + 900, sequence=100 + i,
            levels=dbn.BidAskPair(  # type: ignore[arg-type]
                bid_px=undef if i % 4 == 1 else (100 + i) * P, ask_px=(101 + i) * P, bid_sz=3, ask_sz=4, bid_ct=1,
                ask_ct=2,
            ),
        )
        for i in range(20)
    ]  # fmt: skip
    with (
        LiveGateway(keys=[KEY], symbols=SYMBOLS, records=quotes, heartbeat_s=0.2) as gateway,
        Ingester(schema="mbp-1", start=start_of(quotes), gateway=gateway.address) as ingester,
    ):
        wait_for(lambda: Quote.objects.count() == len(quotes))
        stats = ingester.stop()

    tickers = dict(Symbol.objects.values_list("pk", "ticker"))
    stored = sorted(
        (tickers[q.symbol_id], us(q.ts_recv), q.sequence, q.bid_px, q.bid_sz, q.ask_px, q.ask_sz, q.schema)
        for q in Quote.objects.all()
    )
    names = {v: k for k, v in SYMBOLS.items()}
    assert stored == sorted(
        (names[r.instrument_id], r.ts_recv // 1000, r.sequence,
         None if r.levels[0].bid_px == undef else r.levels[0].bid_px,
         None if r.levels[0].bid_px == undef else 3, r.levels[0].ask_px, 4, 1)
        for r in quotes
    )  # fmt: skip
    assert (stats.written, stats.duplicates, dict(stats.errors)) == (len(quotes), 0, {})

    changes = [
        dbn.StatusMsg(
            publisher_id=2, instrument_id=7, ts_event=t0 + i * NS, ts_recv=t0 + i * NS + 5, action=action,
            reason=dbn.StatusReason.NONE, trading_event=dbn.TradingEvent.NONE, is_trading=trading,
            is_quoting=dbn.TriState.NOT_AVAILABLE, is_short_sell_restricted=dbn.TriState.NOT_AVAILABLE,
        )
        for i, (action, trading) in enumerate(
            [(dbn.StatusAction.HALT, dbn.TriState.NO), (dbn.StatusAction.TRADING, dbn.TriState.YES)]
        )
    ]  # fmt: skip
    with (
        LiveGateway(keys=[KEY], symbols=SYMBOLS, records=changes, heartbeat_s=0.2) as gateway,
        Ingester(schema="status", start=start_of(changes), gateway=gateway.address) as ingester,
    ):
        wait_for(lambda: StatusChange.objects.count() == 2)
        ingester.stop()

    assert list(StatusChange.objects.order_by("ts_recv").values_list("action", "is_trading", "is_quoting")) == [
        (8, False, None), (7, True, None),
    ]  # fmt: skip
    assert FeedStatus.objects.get(dataset="XNAS.ITCH", schema="status").source == "live"


def test_cram_response_is_sha256_of_challenge_and_key_then_bucket_id():
    from databento.common import cram

    assert cram_response("abc", KEY) == cram.get_challenge_response("abc", KEY)
    assert cram_response("abc", KEY).endswith("-good1")
    assert parse_line(b"success=1|session_id=5\n") == {"success": "1", "session_id": "5"}


# -- drops, gap fill, watchdog ---------------------------------------------------------------------


def test_dropped_connection_reconnects_and_fills_the_gap_from_the_last_stored_bar():
    records = bars(60)
    plans = [Plan(drop_after=41, linger_s=0.5)]  # 41: the drop falls between AAPL's and MSFT's bar of a minute
    with (
        LiveGateway(keys=[KEY], symbols=SYMBOLS, records=records, plans=plans, heartbeat_s=0.2) as gateway,
        Ingester(start=start_of(records), gateway=gateway.address) as ingester,
    ):
        wait_for(lambda: Bar.objects.count() == len(records))
        stats = ingester.stop()

    first, second = gateway.connections[:2]
    assert first.ended == "dropped"
    assert len(first.sent) == 41
    # The second subscription asks for intraday replay from the last stored bar's time...
    last_stored = max(r.ts_event for r in first.sent)
    assert second.subscriptions[0].start == last_stored
    # ...and the records it resends that were already stored are dropped before the pipeline.
    resent = sum(1 for r in first.sent if r.ts_event >= last_stored)
    assert stats.skipped["replay_overlap"] == resent == 1
    assert stored_bars() == expected_bars(records)
    assert Bar.objects.count() == len(records)
    assert stats.written == len(records)
    assert stats.duplicates == 0
    assert stats.errors["connection_lost"] == 1
    assert stats.warnings["reconnects"] == 1
    assert FeedStatus.objects.get(dataset="XNAS.ITCH", schema="ohlcv-1m").errors >= 1


def test_dropped_trades_feed_is_complete_with_no_duplicate_print():
    records = trades(200)
    # 99: the drop comes right after a second print sharing the first's time and sequence.
    plans = [Plan(drop_after=100, linger_s=0.5), Plan(drop_after=60)]
    with (
        LiveGateway(keys=[KEY], symbols=SYMBOLS, records=records, plans=plans, heartbeat_s=0.2) as gateway,
        Ingester(schema="trades", start=start_of(records), gateway=gateway.address) as ingester,
    ):
        wait_for(lambda: Trade.objects.count() >= len(records) and len(gateway.connections) >= 3)
        time.sleep(0.2)  # a duplicate would be written by now
        stats = ingester.stop()

    assert len(gateway.connections) == 3
    assert [c.ended for c in gateway.connections[:2]] == ["dropped", "dropped"]
    # Stored times are microseconds: the replay starts at the last stored trade's microsecond.
    assert gateway.connections[1].subscriptions[0].start == gateway.connections[0].sent[-1].ts_event // 1000 * 1000
    assert stored_trades() == expected_trades(records)
    assert Trade.objects.count() == len(records)
    assert stats.errors["connection_lost"] == 2


def test_watchdog_reconnects_a_silent_connection():
    records = bars(40)
    plans = [Plan(stall_after=25)]  # then nothing at all, not even heartbeats, on an open socket
    with (
        LiveGateway(keys=[KEY], symbols=SYMBOLS, records=records, plans=plans, heartbeat_s=0.1) as gateway,
        Ingester(start=start_of(records), gateway=gateway.address, watchdog_s=0.6) as ingester,
    ):
        wait_for(lambda: Bar.objects.count() == len(records))
        stats = ingester.stop()
        assert gateway.connections[0].done.wait(5)

    first, second = gateway.connections[:2]
    assert len(first.sent) == 25
    assert first.ended == "client"
    assert second.subscriptions[0].start == max(r.ts_event for r in first.sent)
    assert stats.errors["watchdog_timeout"] == 1
    assert stored_bars() == expected_bars(records)


def test_reconnects_back_off_and_give_up_after_max_reconnects():
    with LiveGateway(keys=[KEY], symbols=SYMBOLS, records=[]) as gateway:
        address = gateway.address
    started = time.monotonic()  # nothing listens there any more: every connection is refused
    with Ingester(gateway=address, max_reconnects=3, backoff_max=0.05) as ingester:
        stats = ingester.join()

    assert time.monotonic() - started < 10
    assert stats.errors["connect_failed"] == 4
    assert stats.errors["reconnects_exhausted"] == 1
    assert stats.warnings["reconnects"] == 3
    assert "gave up after 3 reconnect attempts" in stats.last_error


def test_backoff_is_exponential_jittered_and_capped():
    rng = random.Random(7)
    backoff = reconnect_backoff(30.0)
    for attempt in range(12):
        cap = min(30.0, 0.5 * 2**attempt)
        delays = [backoff.delay(attempt, rng=rng) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 1
    assert backoff.delay(100) <= 30.0


# -- stop, auth, limits -----------------------------------------------------------------------------


def test_stopping_returns_promptly_with_everything_received_stored(monkeypatch):
    records = bars(600, ago_s=12 * 3600)
    received = []
    stopped_at: list[float] = []
    stopping = threading.Event()
    original = live_records.Connection.on_record

    def on_record(self, record):
        if isinstance(record, dbn.OHLCVMsg):
            received.append(record)
            if len(received) == 150:
                stopped_at.append(time.monotonic())
                stopping.set()
        original(self, record)

    monkeypatch.setattr(live_records.Connection, "on_record", on_record)
    with LiveGateway(keys=[KEY], symbols=SYMBOLS, records=records, pace_s=0.002) as gateway:
        with Ingester(stopping=stopping, start=start_of(records), gateway=gateway.address) as ingester:
            stats = ingester.join()
        returned = time.monotonic()
        assert gateway.connections[0].done.wait(5)

    assert returned - stopped_at[0] < 3.0
    assert 150 <= len(received) < len(records)  # stopped mid-stream
    assert stored_bars() == expected_bars(received) == expected_bars(records[: len(received)])
    assert stats.written == len(received)
    assert gateway.connections[0].ended == "client"
    assert len(gateway.connections) == 1


def test_a_slow_database_holds_the_gateway_back_and_loses_nothing(monkeypatch):
    monkeypatch.setattr(live_records, "QUEUE_MAX", 50)
    # More than the pipeline holds (its queue, the batch it gathers, one waiting for a writer
    # and one in each writer), so the live callback must wait for room.
    held = pipeline.QUEUE_MAX + (writers.WRITERS + 2) * pipeline.BATCH_BARS
    per_symbol = (held + 4000) // len(SYMBOLS)
    records = bars(per_symbol, ago_s=per_symbol + 3600, rtype=dbn.RType.OHLCV_1S)
    connections: list[live_records.Connection] = []
    original = live_records.Connection.on_record

    def on_record(self, record):
        if not connections or connections[-1] is not self:
            connections.append(self)
        original(self, record)

    monkeypatch.setattr(live_records.Connection, "on_record", on_record)
    waits_before = metrics.INGEST_BACKPRESSURE._value.get()
    db = settings.DATABASES["default"]
    dsn = f"host={db['HOST']} port={db['PORT']} user={db['USER']} dbname={db['NAME']}"
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE marketdata_bar IN EXCLUSIVE MODE")  # the database "is slow"
        with (
            LiveGateway(keys=[KEY], symbols=SYMBOLS, records=records) as gateway,
            Ingester(schema="ohlcv-1s", start=start_of(records), gateway=gateway.address) as ingester,
        ):
            wait_for(lambda: bool(connections) and connections[0].waits > 0)  # the callback waits for room
            assert connections[0].inbox.qsize() <= 50  # bounded
            assert not Bar.objects.exists()
            blocker.rollback()  # the database recovers
            wait_for(lambda: Bar.objects.count() == len(records), 60)
            stats = ingester.stop()

    assert len(connections) == 1  # back-pressure is not a drop
    assert stored_bars() == expected_bars(records)
    assert stats.written == len(records)
    assert not stats.errors
    assert metrics.INGEST_BACKPRESSURE._value.get() > waits_before


def test_a_key_the_gateway_refuses_is_a_clear_error():
    with (
        LiveGateway(keys=[KEY], symbols=SYMBOLS, records=bars(3)) as gateway,
        Ingester(key=OTHER_KEY, gateway=gateway.address) as ingester,
        pytest.raises(LiveAuthError, match=r"rejected the API key .*Authentication failed\."),
    ):
        ingester.join()

    [conn] = gateway.connections  # not retried
    assert conn.ended == "auth_failed"
    assert not conn.authenticated
    assert not conn.subscriptions
    assert not Bar.objects.exists()
    lock = FeedLock()  # the run let go of its lock
    lock.acquire("XNAS.ITCH", "ohlcv-1m")
    lock.release()


def test_a_gap_older_than_the_intraday_window_is_reported_with_the_command_that_fills_it():
    records = bars(5)
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    with (
        LiveGateway(keys=[KEY], symbols=SYMBOLS, records=records, heartbeat_s=0.2) as gateway,
        Ingester(start=two_days_ago, gateway=gateway.address) as ingester,
    ):
        wait_for(lambda: Bar.objects.count() == len(records))
        stats = ingester.stop()

    assert stats.errors["gap_beyond_intraday_replay"] == 1
    assert "older than Databento's 24 h intraday replay" in stats.last_error
    assert "python manage.py ingest historical --dataset XNAS.ITCH --schema ohlcv-1m --symbols AAPL,MSFT" in (
        stats.last_error
    )
    start = gateway.connections[0].subscriptions[0].start
    edge = time.time_ns() - 24 * 3600 * NS
    assert start is not None
    assert edge < start < edge + 5 * 60 * NS
    assert FeedStatus.objects.get(dataset="XNAS.ITCH", schema="ohlcv-1m").last_error == stats.last_error


def test_bad_arguments_fail_before_any_connection():
    stopping = threading.Event()
    with pytest.raises(ValidationError, match="live ingests one of"):
        run_live(dataset="XNAS.ITCH", schema="mbo", symbols=["AAPL"], key=KEY, stopping=stopping)
    with pytest.raises(ValidationError, match="at least one symbol"):
        run_live(dataset="XNAS.ITCH", schema="trades", symbols=[], key=KEY, stopping=stopping)
    with pytest.raises(ValidationError, match="timezone-aware"):
        run_live(dataset="XNAS.ITCH", schema="trades", symbols=["A"], key=KEY, start=datetime(2024, 1, 2),
                 stopping=stopping)  # fmt: skip
    with pytest.raises(ValidationError, match="HOST:PORT"):
        run_live(dataset="XNAS.ITCH", schema="trades", symbols=["A"], key=KEY, gateway="h:0", stopping=stopping)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, (None, 13000)),
        ("", (None, 13000)),
        ("127.0.0.1:14000", ("127.0.0.1", 14000)),
        ("lsg.example.com", ("lsg.example.com", 13000)),
        ("[::1]:14000", ("::1", 14000)),
        ("[::1]", ("::1", 13000)),
    ],
)
def test_parse_gateway(value, expected):
    assert parse_gateway(value) == expected


@pytest.mark.parametrize("value", ["host:port", "host:70000", ":13000", "[::1]x"])
def test_parse_gateway_rejects(value):
    with pytest.raises(ValidationError):
        parse_gateway(value)


# -- the management command ---------------------------------------------------------------------


def test_command_restarted_without_start_resumes_from_the_last_stored_bar(monkeypatch):
    records = bars(30)
    monkeypatch.setenv("DATABENTO_API_KEY", KEY)
    with LiveGateway(keys=[KEY], symbols=SYMBOLS, records=records, heartbeat_s=0.2) as gateway:
        # A first run stored the first ten bars, then the process went away.
        with Ingester(start=start_of(records), gateway=gateway.address) as first:
            wait_for(lambda: Bar.objects.count() >= 10)
            first.stop()
        stored_before = Bar.objects.count()
        last_stored = max(Bar.objects.values_list("ts", flat=True))

        stopper = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
        stopper.start()
        try:
            call_command(
                "ingest", "live", "--dataset", "XNAS.ITCH", "--schema", "ohlcv-1m", "--symbols", ",".join(SYMBOLS),
                "--gateway", gateway.address, "--no-publish",
            )  # fmt: skip
        finally:
            stopper.cancel()
        restart = gateway.connections[-1].subscriptions[0]

    assert stored_before >= 10
    assert restart.start == us(last_stored) * 1000  # no --start: it asked for replay from what it had
    assert stored_bars() == expected_bars(records)
