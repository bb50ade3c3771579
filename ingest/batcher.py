"""The batcher: one thread that drains the record queue into batches for the writers.

A batch is up to ``batch_bars`` bars / ``batch_trades`` trades, quotes or status changes
(each), or what came within ``flush_seconds`` of its first record; each goes to the
writers numbered, in order. Once
the queue is closed and drained, the batcher hands on its last batch and stops the
stages behind it (``drained``: Supervisor.drained); if it fails, it stops them too (``abort``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.db import connections

from marketdata.columns import BarColumns, QuoteColumns, TradeColumns
from marketdata.services.bars_trades import BarIn, TradeIn
from marketdata.services.status import StatusIn
from ops import metrics

from .record_queue import CLOSED, RecordQueue
from .stats import Stats
from .writers import KINDS, Batch, Writers, failed

if TYPE_CHECKING:
    from marketdata.cache.leaderboards import LeaderboardRefresher

    from .failure import RunFailure

FEED_STATUS_EVERY_S = 1.0
# The part of a batch each queued item (columns) or row goes to.
KIND_OF: dict[type, str] = {
    BarColumns: "bars", BarIn: "bars", TradeColumns: "trades", TradeIn: "trades",
    QuoteColumns: "quotes", StatusIn: "statuses",
}  # fmt: skip


class Batcher:
    """Gathers what is queued into batches and hands each to the writers, numbered."""

    def __init__(
        self,
        *,
        queue: RecordQueue,
        writers: Writers,
        run: RunFailure,
        batch_bars: int,
        batch_trades: int,
        flush_seconds: float,
        stats: Stats,
        feed_status: Callable[[], None],
        progress: Callable[[Stats, float], None] | None,
        started: float,
        drained: Callable[[], None],
        abort: Callable[[], None],
        leaderboards: LeaderboardRefresher,
    ) -> None:
        self.queue, self.writers, self.run = queue, writers, run
        self.batch_bars, self.batch_trades, self.flush_seconds = batch_bars, batch_trades, flush_seconds
        self.stats, self.feed_status, self.progress, self.started = stats, feed_status, progress, started
        # The supervisor's stop order, run from here once the last batch is handed on (or the batcher failed).
        self.drained, self.abort, self.leaderboards = drained, abort, leaderboards
        self._thread = threading.Thread(target=self._loop, name="ingest-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _loop(self) -> None:
        # Each kind in its order: columns, and runs of rows between them.
        batch: Batch = {kind: [] for kind in KINDS}
        counts = dict.fromkeys(KINDS, 0)
        limits = {kind: self.batch_bars if kind == "bars" else self.batch_trades for kind in KINDS}
        deadline: float | None = None
        last_status = 0.0
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                item = self.queue.get(timeout=timeout)
                if item is CLOSED:
                    self.writers.submit(batch)
                    self.drained()
                    return
                kind = KIND_OF.get(type(item))
                if kind is not None:
                    batch[kind].append(item)
                    counts[kind] += len(item)
                else:
                    for row in item or ():
                        kind = KIND_OF[type(row)]
                        parts: list[Any] = batch[kind]
                        if not parts or type(parts[-1]) is not list:
                            parts.append([])
                        parts[-1].append(row)
                        counts[kind] += 1
                if deadline is None and item is not None:
                    deadline = time.monotonic() + self.flush_seconds
                metrics.INGEST_QUEUE_DEPTH.set(self.queue.qsize())
                if item is None or any(counts[k] >= limits[k] for k in KINDS):
                    self.writers.submit(batch)
                    batch, counts, deadline = {kind: [] for kind in KINDS}, dict.fromkeys(KINDS, 0), None
                    now = time.monotonic()
                    if now - last_status >= FEED_STATUS_EVERY_S:
                        self.feed_status()
                        last_status = now
                        if self.progress:
                            self.progress(self.stats, now - self.started)
        except BaseException as exc:  # the source must learn of it; nothing else may swallow it
            failed(self.run, exc)
            self.abort()
        finally:
            self.leaderboards.close()  # (again after a clean stop: returns at once)
            connections.close_all()
