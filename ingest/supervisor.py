"""The owner of an ingest run's threads and publisher process: start order, first failure, stop order.

A run's stages, each in a module of its own, in the order a record takes them:

    source (the caller's thread) -> RecordQueue -> Batcher -> Writers (CommitOrder)
    -> AfterCommit (cache bump, leaderboards) -> publisher (thread or process)

They start from the end of that path (the publisher first: a run's source starts once its
publisher process can publish), and they stop from its beginning, each once what the
stage before handed it is done: source, batcher, writers, after-commit, leaderboard
refresher, publisher, feed status. A failure anywhere goes to ``fail``: the first one is
the run's (later ones are consequences), it is recorded in feed status, and every stage
that may be waiting on another (a source on a full queue, a writer at its commit turn) is
released, so the run ends and ``Pipeline.close`` raises it. ``stop_on_signals`` is where
SIGTERM and Ctrl-C become a drained stop: ``pipeline.run``, the one driver of every
source, enters it when asked to (``install_signals``; the ``ingest`` command asks).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from .failure import RunFailure

if TYPE_CHECKING:
    from marketdata.cache.leaderboards import LeaderboardRefresher

    from .after_commit import AfterCommit
    from .batcher import Batcher
    from .publisher_hosts import PublisherHost
    from .record_queue import RecordQueue
    from .writers import Writers

log = structlog.get_logger("ingest.pipeline")  # the run's log lines keep the logger they always had


class Supervisor(RunFailure):
    """Starts the stages, holds the run's first failure (RunFailure), and stops the stages in order."""

    def __init__(self, *, queue: RecordQueue, record_error: Callable[[BaseException], None]) -> None:
        super().__init__(record_error=record_error)
        self.queue = queue
        self.wakes.append(queue.clear)  # a source waiting on a full queue goes on
        self.publisher: PublisherHost | None = None
        self.after_commit: AfterCommit
        self.writers: Writers
        self.batcher: Batcher
        self.leaderboards: LeaderboardRefresher
        self.feed_status: Callable[[], None]

    def start(
        self,
        *,
        publisher: PublisherHost | None,
        after_commit: AfterCommit,
        writers: Writers,
        batcher: Batcher,
        leaderboards: LeaderboardRefresher,
        feed_status: Callable[[], None],
    ) -> None:
        """Start the stages from the end of the path (the publisher, given started) to its beginning."""
        self.publisher, self.after_commit, self.writers, self.batcher = publisher, after_commit, writers, batcher
        self.leaderboards, self.feed_status = leaderboards, feed_status
        self.wakes.append(writers.order.wake)  # writers waiting their commit turn give up
        after_commit.start()
        writers.start()
        batcher.start()

    # -- stop -----------------------------------------------------------------------------

    def drained(self) -> None:
        """The batcher handed on its last batch (the source and the batcher are done): stop the rest in order."""
        self.writers.wait_committed()  # every batch committed and handed on
        self.writers.stop()
        self.after_commit.drain()
        self.leaderboards.close()
        self.publisher_stop()
        self.feed_status()

    def abort(self) -> None:
        """The batcher failed: stop what is behind it (what is committed still goes through after-commit)."""
        self.writers.stop()
        self.after_commit.stop()
        self.publisher_stop()

    def publisher_stop(self) -> None:
        if self.publisher is not None and self.publisher.alive():
            self.publisher.submit(self.publisher.STOP, lambda: self.failure)

    def stop(self) -> None:
        """Stop the run from its source on (what is queued is still written); raise its failure, if any."""
        self.queue.close()
        if self.publisher is not None:
            self.publisher.closing()
        self.batcher.join()  # (the batcher stops the stages behind it: drained or abort)
        if self.publisher is not None:
            self.publisher.join()
        self.check()


@contextmanager
def stop_on_signals(stopping: threading.Event) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT (Ctrl-C) set ``stopping``: sources stop, queued records are written."""

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("stop requested", signal=signum)
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
