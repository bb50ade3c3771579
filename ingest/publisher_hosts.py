"""The publisher's hosts: ``PublishWork`` (ingest/publisher.py) in a thread of the ingester, or in a process.

Both have one interface (PublisherHost: ``submit`` a job or STOP, ``alive``, ``closing``, ``join``)
and run one job loop (publisher.serve):

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

from django.db import connections

from ops import metrics

from .publisher import PARENT_CHECK_S, STOP, PublishWork, log, serve
from .publisher_child import child_main, ignore_stop_signals

# Committed batches waiting to be published. The writer commits batch N+1 while batch N is
# derived and published; when publishing stalls (Redis down) this fills and the writer
# waits, then the queue of rows, then the source.
PUBLISH_QUEUE_BATCHES = 8
PUT_WAIT_S = 0.5  # a blocked submit looks at the host's health this often
READY_TIMEOUT_S = 120.0  # a run waits this long at most for its publisher process to start
# Settings the child takes from its parent as they are at run time (a test database's
# name, a test's overrides), not as its settings module would make them.
INHERITED_SETTINGS = ("DATABASES", "REDIS_URL", "CHANNELS_PREFIX", "STREAM_SEQ_EPOCH")


class PublisherFailedError(RuntimeError):
    """The publisher (thread or process) stopped on an error; the run fails with it."""


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
        try:
            serve(self._jobs, work)
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
