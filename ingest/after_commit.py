"""After each commit, in commit order and in a thread of its own: the cache bump, then the hand-off to the publisher.

The writer goes on with the next batch's COPY meanwhile. The cache versions are bumped
at once (a cached page must not outlive the commit); leaderboards are refreshed by a
thread of their own once quiet; the publisher gets every committed batch, in order.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any

import structlog

from marketdata.cache.leaderboards import LeaderboardRefresher
from marketdata.cache.versions import versions_bump
from marketdata.columns import BarColumns, TradeColumns
from ops import metrics, tracing

from .publisher import trades_out
from .publisher_hosts import PUT_WAIT_S

if TYPE_CHECKING:
    from .failure import RunFailure
    from .publisher_hosts import PublisherHost
    from .symbology import Resolver

log = structlog.get_logger("ingest.pipeline")  # the run's log lines keep the logger they always had

# Committed batches waiting for their cache bump and hand-off to the publisher; beyond
# this the writer waits.
AFTER_COMMIT_BATCHES = 2
ERR_FAILED = "ingest after-commit work failed"


class AfterCommit:
    """The after-commit thread: each committed batch's cache bump and its hand-off to the publisher."""

    def __init__(
        self,
        *,
        run: RunFailure,
        resolver: Resolver,
        leaderboards: LeaderboardRefresher,
        publisher: PublisherHost | None,
    ) -> None:
        self.run, self.resolver, self.leaderboards, self.publisher = run, resolver, leaderboards, publisher
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=AFTER_COMMIT_BATCHES)
        self._failed: BaseException | None = None  # this stage's own failure: what is queued after it is dropped
        self._tickers_sent = 0  # how many of the resolver's tickers the publisher has been given
        self._thread = threading.Thread(target=self._loop, name="ingest-after-commit", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: tuple[Any, ...]) -> None:
        """Hand a committed batch to the after-commit thread (waits while it is behind)."""
        while True:
            if self._failed is not None:
                raise RuntimeError(ERR_FAILED) from self._failed
            try:
                self._queue.put(item, timeout=PUT_WAIT_S)
                return
            except queue.Full:
                metrics.INGEST_BACKPRESSURE.inc()

    def _loop(self) -> None:
        """Each committed batch in order: bump its symbols' cache versions, then hand it to the publisher."""
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._failed is not None:
                    continue  # the run is failing: what was queued is dropped
                changed, since, bars, trades, trace = item
                with tracing.continued(trace, "ingest.after_commit"):  # a child of the batch's span
                    versions_bump(symbol_ids=changed, changed=since)  # at once: the cache must not outlive the commit
                    # Refreshed in a thread of its own once quiet (readers recompute rows older than
                    # their symbol's version).
                    self.leaderboards.changed(changed)
                    if self.publisher is not None and (bars is not None or trades is not None):
                        self._publish(bars, trades)
            except BaseException as exc:
                log.exception(ERR_FAILED)
                self._failed = exc
                self.run.fail(exc)
            finally:
                self._queue.task_done()

    def _publish(self, bars: BarColumns | None, trades: TradeColumns | None) -> None:
        """Hand a committed batch to the publisher (waits while it is behind)."""
        assert self.publisher is not None
        tickers: dict[int, str] = {}
        if len(self.resolver.tickers) != self._tickers_sent:  # tickers are only ever added
            tickers = dict(self.resolver.tickers)
            self._tickers_sent = len(tickers)
        job = ([] if bars is None else [bars], [] if trades is None else [trades_out(trades)], tickers)
        self.publisher.submit(job, lambda: self.run.failure)

    def drain(self) -> None:
        """Wait until every committed batch is bumped and handed over; raise what failed, if anything."""
        self._queue.join()
        self.stop()
        if self._failed is not None:
            raise RuntimeError(ERR_FAILED) from self._failed

    def stop(self) -> None:
        try:
            self._queue.put(None, timeout=PUT_WAIT_S * 4)  # (a thread stuck past that is a daemon: it dies with us)
        except queue.Full:
            log.warning("after-commit thread still busy at stop")
