"""Deriving and publishing committed batches: in a thread of the ingester, or in a process of its own.

``PublishWork`` turns each committed batch into messages (every written bar and trade, and
the derived and forming bars of coarser timeframes) and publishes them, in commit order.
It runs in one of two hosts with the same interface (``submit``, ``stop``, ``join``):

- ``ThreadHost``: a thread of the ingest process. Tests use it by default
  (``INGEST_PUBLISH_PROCESS`` is off in test settings): no process start per run.
- ``ProcessHost``: a child process (multiprocessing, spawn), the default of the
  ``ingest`` command. Deriving, JSON and publishing took 60% of the ingester's Python
  time per bar, and three threads of one process share one interpreter lock: in a
  process of its own that work runs beside normalising and writing, on the other core.
  Batches reach it pickled through a bounded queue (as columns, marketdata/columns.py:
  arrays pickle as their bytes; a trade only with what its message needs), so a slow
  Redis still holds up the writer, then the source: back-pressure end to end. The run's source
  starts once the child is ready, and a child behind publishes the batches queued
  behind the one it took as one.

The child ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group): the
parent decides when to stop, and the child drains every batch submitted before it stops.
It stops on its own if the parent dies. Its warnings (a retried publish) and its failure
are reported back to the parent, which counts them and fails the run as it would for its
own thread.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog
from django.db import connections

from marketdata.columns import BarColumns, TradeColumns, concat, groups
from marketdata.wire import bar_datas, time_texts, trade_data
from ops import metrics
from streaming.derive import Deriver, load_stored, load_stored_many
from streaming.publish import Publisher
from streaming.streams import bars_stream, trades_stream

from .publisher_child import child_main, ignore_stop_signals
from .retry import retry_until_success

log = structlog.get_logger(__name__)

# Committed batches waiting to be published. The writer commits batch N+1 while batch N is
# derived and published; when publishing stalls (Redis down) this fills and the writer
# waits, then the queue of rows, then the source.
PUBLISH_QUEUE_BATCHES = 8
PUT_WAIT_S = 0.5  # a blocked submit looks at the host's health this often
PARENT_CHECK_S = 1.0  # the child looks for its parent this often while idle
READY_TIMEOUT_S = 120.0  # a run waits this long at most for its publisher process to start
# Settings the child takes from its parent as they are at run time (a test database's
# name, a test's overrides), not as its settings module would make them.
INHERITED_SETTINGS = ("DATABASES", "REDIS_URL", "CHANNELS_PREFIX", "STREAM_SEQ_EPOCH")
STOP = "stop"  # after the last job: the host drains what came before, then ends

Groups = dict[tuple[str, str], list[str]]  # (stream, kind) -> data texts in order, as publish_groups takes them
# What trades' messages need, as columns (marketdata/columns.py): symbol ids, ts_event in
# Unix microseconds, prices, sizes, sides. The writer sends these, not the whole trades:
# arrays pickle as their bytes, and no JSON is made in the process that writes.
TradeOut = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Job = tuple[list[BarColumns], list[TradeOut], dict[int, str]]  # bars and trades in parts, tickers not sent before
# Behind (a replay at full speed, a catch-up after an outage), the publisher takes the
# batches queued behind the one it got and publishes them as one, up to about this many
# records: a stream's costs per publish (its entry in the transaction, its derived and forming
# bars) are paid once for all of them. Live, the queue is empty and each batch goes alone.
MERGE_RECORDS = 10_000
LINGER_S = 0.02  # how long a publisher behind waits for more batches to publish as one (with_backlog)


class PublisherFailedError(RuntimeError):
    """The publisher (thread or process) stopped on an error; the run fails with it."""


class PublishWork:
    """Derives and publishes committed batches, in commit order; one per run, host-confined."""

    def __init__(self, run_id: str, *, closing: Callable[[], bool], warn: Callable[[str], None]) -> None:
        self.run_id = run_id  # with a batch number, names each publish so a retry is not repeated
        self.closing = closing
        self.warn = warn
        self.deriver = Deriver(load=load_stored, load_many=load_stored_many)
        self.publisher = Publisher()
        self.tickers: dict[int, str] = {}
        self.trade_messages = TradeMessages(self.tickers)
        self._published = 0
        # Stream names and kinds by (timeframe, symbol id): made once, not per message.
        self._bar_streams: dict[tuple[str, int], tuple[str, str]] = {}

    def handle(self, bars: list[BarColumns], trades: list[TradeOut], tickers: dict[int, str]) -> None:
        """Publish one committed batch (retrying while Redis or PostgreSQL is down)."""
        self.tickers.update(tickers)
        groups: Groups = {}
        if bars:
            groups = retry_until_success(
                "derive", lambda: self.bar_messages(bars), closing=self.closing, warn=self.warn
            )[0]
        if trades:
            groups.update(self.trade_messages(trades))  # trade streams and bar streams never share a name
        if groups:
            self._published += 1
            batch_id = f"{self.run_id}:{self._published}"
            publish = self.publisher.publish_groups
            retry_until_success(
                "publish", lambda: publish(groups, batch_id=batch_id), closing=self.closing, warn=self.warn
            )

    def bar_messages(self, parts: list[BarColumns]) -> dict[tuple[str, str], list[str]]:
        """Every written bar (final), then the derived and forming bars of coarser timeframes.

        Grouped as Publisher.publish_groups takes them: (stream, "bar") -> data texts in
        order; no object per message (a Message each was a fifth of the publisher's time).
        The written bars' texts are made per batch (wire.bar_datas), and put in their
        streams' groups a stream at a time.
        """
        groups: dict[tuple[str, str], list[str]] = {}
        streams = self._bar_streams
        for cols in parts:
            written = np.array(
                bar_datas(cols.ts, cols.open, cols.high, cols.low, cols.close, cols.volume, cols.anomalies, True),
                dtype=object,
            )
            for (symbol_id, tf), where in stream_groups(cols.symbol_id, cols.timeframe):
                key = streams.get((tf, symbol_id)) or self._bar_stream(tf, symbol_id)
                groups.setdefault(key, []).extend(written[where].tolist())
        derived = self.deriver.add_columns(concat(parts))
        texts = bar_datas(*derived[1:])
        at = 0
        for symbol_id, tf, count in derived.streams:
            key = streams.get((tf, symbol_id)) or self._bar_stream(tf, symbol_id)
            groups.setdefault(key, []).extend(texts[at : at + count])
            at += count
        return groups

    def _bar_stream(self, tf: str, symbol_id: int) -> tuple[str, str]:
        key = self._bar_streams[(tf, symbol_id)] = (bars_stream(tf, self.tickers[symbol_id]), "bar")
        return key

    def close(self) -> None:
        self.publisher.close()


def stream_groups(symbol_ids: np.ndarray, timeframes: np.ndarray) -> list[tuple[tuple[int, str], np.ndarray]]:
    """Each (symbol id, timeframe) of bars with the indices of its bars, in order."""
    ids, symbol_index = np.unique(symbol_ids, return_inverse=True)
    tfs, tf_index = np.unique(timeframes, return_inverse=True)
    id_list, names = ids.tolist(), tfs.astype("U2").tolist()
    width = len(names)
    return [
        ((id_list[key // width], names[key % width]), where)
        for key, where in groups(symbol_index.astype(np.int64) * width + tf_index)
    ]


def trades_out(trades: TradeColumns) -> TradeOut:
    """What the publisher needs of written trades."""
    return (trades.symbol_id, trades.ts_event, trades.price, trades.size, trades.side)


class TradeMessages:
    """Written trades as publish groups: (``trades:<SYM>``, "trade") -> data texts, in order."""

    def __init__(self, tickers: dict[int, str]) -> None:
        self.tickers = tickers  # symbol id -> ticker
        self._streams: dict[int, tuple[str, str]] = {}

    def __call__(self, parts: list[TradeOut]) -> Groups:
        groups: Groups = {}
        streams = self._streams
        for symbol_ids, times, prices, sizes, sides in parts:
            texts = time_texts(times)  # at once: the times of trades rarely repeat
            rows = zip(
                symbol_ids.tolist(), texts, prices.tolist(), sizes.tolist(), sides.astype("U1").tolist(), strict=True
            )
            for symbol_id, ts, price, size, side in rows:
                key = streams.get(symbol_id)
                if key is None:
                    key = streams[symbol_id] = (trades_stream(self.tickers[symbol_id]), "trade")
                datas = groups.get(key)
                if datas is None:
                    datas = groups[key] = []
                datas.append(trade_data(ts, price, size, side))
        return groups


def with_backlog(job: Job, jobs: Any, linger_s: float = 0.0) -> tuple[Job, bool]:
    """``job`` and the jobs queued behind it as one, up to MERGE_RECORDS; True if STOP came after them.

    ``jobs`` is the host's queue (``queue.Queue`` or ``multiprocessing.Queue``). Its size
    says what is queued, not an empty ``get_nowait``: a process queue's jobs reach the
    child's pipe through a feeder thread, and a pipe holds less than one batch, so the next
    job is almost never readable yet when the child asks. Bars keep their commit order
    (the deriver needs each stream's in time order) and each trade stream its messages in
    order: the same messages, fewer publishes.

    With ``linger_s`` (the host passes LINGER_S when jobs came in while it published the
    last: it is behind a fast source), it also waits that long at most for jobs still to
    come. A publish costs mostly per stream (each batch of 50 symbols' 1m bars touches 350
    streams), so gathering more batches into one is what lets the publisher keep up.
    """
    bars, trades, tickers = job
    count = sum(len(part) for part in bars) + sum(len(part[0]) for part in trades)
    merged = False
    deadline = time.monotonic() + linger_s
    while count < MERGE_RECORDS:
        wait = PARENT_CHECK_S if jobs.qsize() > 0 else deadline - time.monotonic()
        if wait <= 0:
            break
        try:  # queued, so it comes at once (it may still be on its way through the pipe)
            more = jobs.get(timeout=wait)
        except queue.Empty:  # none came in time, or a parent that died mid-send: the caller's loop notices
            break
        if more == STOP:
            return (bars, trades, tickers), True
        if not merged:  # the first job's containers may still be the writer's (ThreadHost)
            bars, trades, tickers = list(bars), list(trades), dict(tickers)
            merged = True
        more_bars, more_trades, more_tickers = more
        bars.extend(more_bars)
        trades.extend(more_trades)
        tickers.update(more_tickers)
        count += sum(len(part) for part in more_bars) + sum(len(part[0]) for part in more_trades)
    return (bars, trades, tickers), False


class PublisherHost:
    """What the run sees of its publisher, thread or process: ``submit`` jobs, ``closing``, ``join``."""

    STOP = STOP

    def alive(self) -> bool:
        raise NotImplementedError

    def put(self, item: Any, timeout: float) -> bool:
        raise NotImplementedError

    def closing(self) -> None:
        """The run is closing: retries give up sooner."""

    def join(self) -> None:
        raise NotImplementedError

    def submit(self, item: Any, failure: Callable[[], BaseException | None]) -> None:
        """Hand the publisher a job (or STOP), waiting while it is behind; raise if it stopped meanwhile."""
        while not self.put(item, PUT_WAIT_S):
            metrics.INGEST_BACKPRESSURE.inc()
            if not self.alive():
                self.settle()  # its own report (the cause) becomes the run's failure first
                raise RuntimeError("ingest publisher stopped") from failure()

    def settle(self) -> None:
        """Wait (briefly) until a stopped publisher has reported why it stopped."""


class ThreadHost(PublisherHost):
    """PublishWork in a thread of the ingest process."""

    def __init__(
        self,
        run_id: str,
        *,
        closing: Callable[[], bool],
        warn: Callable[[str], None],
        failed: Callable[[BaseException], object],
    ) -> None:
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=PUBLISH_QUEUE_BATCHES)
        self._run_id, self._closing, self._warn, self._failed = run_id, closing, warn, failed
        self._thread = threading.Thread(target=self._loop, name="ingest-publisher", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        work = PublishWork(self._run_id, closing=self._closing, warn=self._warn)
        behind = False
        try:
            while True:
                job = self._jobs.get()
                if job == STOP:
                    return
                job, stop = with_backlog(job, self._jobs, LINGER_S if behind else 0.0)
                work.handle(*job)
                if stop:
                    return
                behind = self._jobs.qsize() > 0  # batches came in meanwhile
        except BaseException as exc:  # the source and the writer must learn of it
            log.exception("ingest publisher failed")
            self._failed(exc)
        finally:
            work.close()
            connections.close_all()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def put(self, item: Any, timeout: float) -> bool:
        try:
            self._jobs.put(item, timeout=timeout)
            return True
        except queue.Full:
            return False

    def closing(self) -> None:
        """The run is closing (the thread reads the pipeline's own flag)."""

    def join(self) -> None:
        self._thread.join()


class ProcessHost(PublisherHost):
    """PublishWork in a child process; the same contract as ThreadHost."""

    def __init__(
        self,
        run_id: str,
        *,
        closing: Callable[[], bool],
        warn: Callable[[str], None],
        failed: Callable[[BaseException], object],
    ) -> None:
        from django.conf import settings

        ctx = multiprocessing.get_context("spawn")  # never fork a process that has threads and a pool
        self._jobs: Any = ctx.Queue(maxsize=PUBLISH_QUEUE_BATCHES)
        self._reports: Any = ctx.Queue()
        self._closing_event = ctx.Event()
        self._ready = threading.Event()  # the child reported that it can publish
        self._warn, self._failed = warn, failed
        # (A test's overridden settings hold no SETTINGS_MODULE: the environment names it.)
        settings_module = os.environ.get("DJANGO_SETTINGS_MODULE") or settings.SETTINGS_MODULE
        inherited = {name: getattr(settings, name) for name in INHERITED_SETTINGS}
        inherited["DATABASES"] = {alias: dict(connections[alias].settings_dict) for alias in settings.DATABASES}
        self._process = ctx.Process(
            target=child_main,
            args=(run_id, self._jobs, self._reports, self._closing_event, settings_module, inherited),
            name="ingest-publisher",
            daemon=True,
        )
        # Started with SIGINT and SIGTERM ignored (a Ctrl-C during its start would kill it
        # before it can ignore them itself); spawn keeps ignored signals across exec.
        previous = ignore_stop_signals()
        try:
            self._process.start()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._listener = threading.Thread(target=self._listen, name="ingest-publisher-reports", daemon=True)
        self._listener.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Return once the child can publish (its Django is set up: about a second and a half).

        The run's source starts after this: what the writer commits meanwhile would queue
        up and go out in one burst when the child came up, a second late, and a gateway
        fanning that burst out lags for as long again (bench/latency.py: p99 1.2 s).
        A child that dies first fails the run through the listener, as it would later.
        """
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(PARENT_CHECK_S / 10):
            if not self._process.is_alive() or time.monotonic() > deadline:
                return

    def _listen(self) -> None:
        """Count the child's warnings; turn its failure, or its death, into the run's failure."""
        try:
            self._listen_until_done()
        finally:
            connections.close_all()  # the failure is recorded in feed status from this thread

    def _listen_until_done(self) -> None:
        while True:
            try:
                kind, *rest = self._reports.get(timeout=PARENT_CHECK_S)
            except queue.Empty:
                if self._process.is_alive():
                    continue
                try:  # it exited: what it said last may still be on its way
                    kind, *rest = self._reports.get(timeout=PARENT_CHECK_S)
                except queue.Empty:
                    if self._process.exitcode != 0:
                        self._failed(PublisherFailedError(f"publisher process exited with {self._process.exitcode}"))
                    return
            if kind == "ready":
                self._ready.set()
                continue
            if kind == "done":
                return
            self._report(kind, rest)
            if kind == "failed":
                return

    def _report(self, kind: str, rest: list[Any]) -> None:
        if kind == "warning":
            self._warn(rest[0])
        elif kind == "failed":
            self._failed(PublisherFailedError(f"publisher process failed: {rest[0]}: {rest[1]}"))

    def alive(self) -> bool:
        return self._process.is_alive()

    def put(self, item: Any, timeout: float) -> bool:
        try:  # bars and trades cross as columns: arrays pickle as their bytes
            self._jobs.put(item, timeout=timeout)
            return True
        except queue.Full:
            return False

    def closing(self) -> None:
        self._closing_event.set()

    def settle(self) -> None:
        self._listener.join(timeout=PARENT_CHECK_S * 3)  # it reports a death within two checks

    def join(self) -> None:
        self._process.join()
        self._listener.join()
        if self._process.exitcode != 0:
            # Nobody reads the jobs any more: do not wait at exit for queued ones to be sent.
            self._jobs.cancel_join_thread()
        self._jobs.close()
        self._reports.close()
