"""Two batch writers: a batch runs while the one before it commits, and commits only after it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import databento_dbn as dbn
import psycopg
import pytest
from django.conf import settings as django_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import writers as writers_module
from ingest.pipeline import Pipeline
from ingest.writers import CommitOrder
from marketdata.models import Bar, Trade

from .dbnfile import NS, P

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("publish_host")]  # (conftest.py)
T0 = 1704205800  # 2024-01-02T14:30:00Z
HOLD_S = 5.0  # at most, a held batch waits this long for what the test waits for


class Recorder:
    """Records each batch's start, commit and done; ``hold[i]`` runs in batch i's gate, before its commit."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.hold: dict[int, Callable[[], object]] = {}
        self.started: dict[int, threading.Event] = {}

    def started_event(self, i: int) -> threading.Event:
        return self.started.setdefault(i, threading.Event())

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        recorder = self

        class Recording(CommitOrder):
            def start(self, i: int) -> None:
                super().start(i)
                recorder.events.append(("start", i))
                recorder.started_event(i).set()

            def gate(self, i: int) -> Callable[[], None]:
                inner = super().gate(i)

                def before_commit() -> None:
                    inner()  # statements done; the batch before has committed
                    if i in recorder.hold:
                        recorder.hold[i]()
                    recorder.events.append(("commit", i))

                return before_commit

            def done(self, i: int) -> None:
                recorder.events.append(("done", i))
                super().done(i)

        monkeypatch.setattr(writers_module, "CommitOrder", Recording)

    def order(self, kind: str) -> list[int]:
        return [i for k, i in self.events if k == kind]


def _bar(second: int, close: int, instrument: int = 7) -> dbn.OHLCVMsg:
    return dbn.OHLCVMsg(
        rtype=int(dbn.RType.OHLCV_1S), publisher_id=2, instrument_id=instrument, ts_event=(T0 + second) * NS,
        open=close * P, high=(close + 1) * P, low=(close - 1) * P, close=close * P, volume=10 + second,
    )  # fmt: skip


def _pipeline(batch_bars: int = 10) -> Pipeline:
    # A long flush interval: every batch is exactly batch_bars bars (the last one excepted).
    pipeline = Pipeline(
        dataset="XNAS.ITCH", source="test", symbols=None, publish=True, batch_bars=batch_bars, flush_seconds=30
    )
    pipeline.resolver.add_mapping(ticker="AAPL", instrument_id=7, start_ns=0, end_ns=None)
    pipeline.resolver.add_mapping(ticker="MSFT", instrument_id=8, start_ns=0, end_ns=None)
    return pipeline


def _dsn() -> str:
    db = django_settings.DATABASES["default"]
    return f"host={db['HOST']} port={db['PORT']} user={db['USER']} dbname={db['NAME']}"


def _stored() -> list[tuple[datetime, int]]:
    return list(Bar.objects.order_by("ts").values_list("ts", "close"))


def _second(s: int) -> datetime:
    return datetime.fromtimestamp(T0 + s, UTC)


def test_a_batch_runs_its_copy_while_the_one_before_commits_and_commits_after_it(monkeypatch):
    recorder = Recorder()
    recorder.install(monkeypatch)
    # Batch 0 commits only once batch 1 has started its statements (or after HOLD_S, and the test fails).
    recorder.hold[0] = lambda: recorder.started_event(1).wait(HOLD_S)
    pipeline = _pipeline()
    for s in range(35):
        pipeline.feed(_bar(s, 100 + s))
    stats = pipeline.close()

    events = recorder.events
    assert events.index(("start", 1)) < events.index(("commit", 0))  # they overlapped
    assert events.index(("done", 0)) < events.index(("commit", 1))  # and committed in order
    assert recorder.order("commit") == recorder.order("done") == [0, 1, 2, 3]
    assert _stored() == [(_second(s), (100 + s) * P) for s in range(35)]
    assert stats.written == 35
    assert not stats.warnings


def test_a_batch_that_waits_too_long_for_the_one_before_rolls_back_and_commits_after_it(monkeypatch):
    monkeypatch.setattr(writers_module, "ORDER_WAIT_S", 0.2)
    recorder = Recorder()
    recorder.install(monkeypatch)
    visible: list[int] = []

    def hold() -> None:
        time.sleep(1.0)  # batch 1 reaches its gate meanwhile, and gives up waiting
        with psycopg.connect(_dsn(), autocommit=True) as other:
            row = other.execute("SELECT count(*) FROM marketdata_bar").fetchone()
            visible.append(row[0] if row else -1)

    recorder.hold[0] = hold
    pipeline = _pipeline()
    for s in range(20):
        pipeline.feed(_bar(s, 100 + s))
    stats = pipeline.close()

    assert stats.warnings["commit_out_of_turn"] == 1
    assert visible == [0]  # batch 1 did not commit ahead of batch 0
    assert recorder.order("start") == [0, 1]
    assert recorder.order("commit") == [0]  # batch 1's first try never committed...
    assert recorder.order("done") == [0, 1]  # ...its second ran once batch 0 was done
    assert _stored() == [(_second(s), (100 + s) * P) for s in range(20)]
    assert stats.written == 20


def test_when_a_batch_fails_the_batch_after_it_is_rolled_back(monkeypatch):
    recorder = Recorder()
    recorder.install(monkeypatch)

    def fail() -> None:
        recorder.started_event(2).wait(HOLD_S)  # batch 2 is running its statements: it must not commit
        raise RuntimeError("the database refused batch 1")

    recorder.hold[1] = fail
    pipeline = _pipeline()

    def run() -> None:  # the source learns of the failure at a feed, or at the close
        for s in range(40):
            pipeline.feed(_bar(s, 100 + s))
        pipeline.close()

    with pytest.raises(RuntimeError, match="ingest writer failed"):
        run()

    assert recorder.started_event(2).is_set()
    assert recorder.order("commit") == recorder.order("done") == [0]
    # What is stored is a prefix of the feed: nothing after the failed batch (a resume finds no hole).
    assert _stored() == [(_second(s), (100 + s) * P) for s in range(10)]
    assert pipeline.stats.errors["RuntimeError"] == 1


# Against the thread host only: 25 examples, each a run, would each start a publisher
# process (1 s apiece); what it checks (what is stored) is the writers', whichever host publishes.
@pytest.mark.parametrize("publish_host", ["thread"], indirect=True)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from([7, 8]), st.integers(1, 500)),
        min_size=1,
        max_size=40,
    ),
    st.integers(1, 4),
)
def test_bars_repeated_across_overlapping_batches_end_as_the_last_one_sent(feed, batch_bars):
    """Corrections of one bar in consecutive batches: stored as if written one batch at a time."""
    Bar.objects.all().delete()
    pipeline = _pipeline(batch_bars)
    for second, instrument, close in feed:
        pipeline.feed(_bar(second, close, instrument))
    stats = pipeline.close()

    last: dict[tuple[int, int], int] = {}
    for second, instrument, close in feed:
        last[(instrument, second)] = close
    tickers = {7: "AAPL", 8: "MSFT"}
    stored = {(b.symbol.ticker, b.ts): b.close for b in Bar.objects.select_related("symbol")}
    assert stored == {(tickers[i], _second(s)): close * P for (i, s), close in last.items()}
    assert not stats.errors


def _trade(second: int, size: int) -> dbn.TradeMsg:
    return dbn.TradeMsg(
        publisher_id=2, instrument_id=7, ts_event=(T0 + second) * NS, price=100 * P, size=size,
        action=dbn.Action.TRADE, side=dbn.Side.BID, depth=0, ts_recv=(T0 + second) * NS, ts_in_delta=0,
        sequence=second, flags=0,
    )  # fmt: skip


def test_batches_of_bars_and_trades_commit_in_order(monkeypatch):
    """A batch of both is two transactions: it begins once the batch before is done, and only
    its second (the trades) has the gate that lets the next batch begin."""
    recorder = Recorder()
    recorder.install(monkeypatch)
    pipeline = Pipeline(
        dataset="XNAS.ITCH", source="test", symbols=None, publish=True, batch_bars=5, batch_trades=5, flush_seconds=30
    )
    pipeline.resolver.add_mapping(ticker="AAPL", instrument_id=7, start_ns=0, end_ns=None)
    for s in range(40):
        pipeline.feed(_bar(s, 100 + s) if s % 2 else _trade(s, 1 + s))
    stats = pipeline.close()

    batches = len(recorder.order("done"))
    assert batches >= 4  # about 9 records each (5 of one kind close it): each holds both
    assert recorder.order("done") == list(range(batches))
    assert recorder.order("commit") == list(range(batches))  # one gate each: the trades transaction's
    assert _stored() == [(_second(s), (100 + s) * P) for s in range(1, 40, 2)]
    assert sorted(Trade.objects.values_list("size", flat=True)) == [1 + s for s in range(0, 40, 2)]
    assert stats.written == 40
