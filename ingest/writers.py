"""The writers: WRITERS threads, each with its own database session, writing numbered batches in commit order.

Each batch is one transaction per table it writes (bars, trades and quotes COPY-based:
marketdata.services.bars_trades and .quotes; status changes: .status); batch i runs its
statements while batch i-1 commits, and commits after it (CommitOrder), so what
is stored is always a prefix of the batches and they reach the after-commit thread in
order. While PostgreSQL is unreachable a writer retries the batch it holds
(retry.retry_until_success): the queue fills and the source waits; nothing is dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from django.db import connections
from django.utils import timezone

from marketdata.columns import BarColumns, QuoteColumns, TradeColumns, concat, utc
from marketdata.services.bars_trades import (
    WriteResult,
    bars_checked,
    bars_upsert,
    trades_checked,
    trades_insert,
)
from marketdata.services.quotes import quotes_insert
from marketdata.services.status import StatusIn, status_changes_insert
from ops import metrics, tracing

from .publisher_hosts import PUT_WAIT_S
from .retry import retry_until_success
from .stats import Stats

if TYPE_CHECKING:
    from .after_commit import AfterCommit
    from .failure import RunFailure

# Batch writers, each with its own database session: batch i runs its statements while
# batch i-1 commits, and commits after it (CommitOrder).
WRITERS = 2
# A batch ready to commit waits this long for the batch before it to commit, then rolls
# back and is written again once that one has (OutOfTurnError).
ORDER_WAIT_S = 2.0
ORDER_POLL_S = 0.5  # a writer waiting its turn looks for a failed run this often
T = TypeVar("T")
# A batch's parts by kind, each in its order: columns, and runs of rows between them (quotes
# come as columns only, status changes as rows only). Written in this order, a transaction each.
KINDS = ("bars", "trades", "quotes", "statuses")
Batch = dict[str, list[Any]]


class OutOfTurnError(Exception):
    """A batch waited ORDER_WAIT_S at its commit for the batch before it: rolled back, to be written after it."""


class WriterStoppedError(Exception):
    """Another part of the run failed while this batch waited its turn: it is rolled back, not committed."""


class CommitOrder:
    """The commit order of batches 0, 1, 2, ... that WRITERS threads write, each in its own session.

    Batch i starts its statements once batch i-1 has run its own (``start``), and commits
    only after batch i-1 has committed and been handed on (``gate``, called just before
    its commit; ``done``). So a batch's COPY overlaps the commit of the batch before it
    and the writers' own Python work, while what is stored is always a prefix of the
    batches (an ingester that dies leaves no hole for a resume to skip), and batches reach
    the after-commit thread, and the publisher, in order.

    Rows are never locked both ways: batch i only waits on rows of batch i-1 (the same key
    in both: its COPY waits for that commit, is refused, and the batch takes the staged
    upsert, which then sees batch i-1's rows). Should batch i-1 have to run its statements
    again (a retried write) against rows batch i holds uncommitted, batch i's wait at its
    gate ends after ORDER_WAIT_S: it rolls back and is written again once batch i-1 is done.
    """

    def __init__(self, failed: Callable[[], BaseException | None]) -> None:
        self._cond = threading.Condition()
        self._statements = -1  # every batch up to this one has run its statements
        self._done = -1  # every batch up to this one has committed and been handed on
        self._failed = failed

    def start(self, i: int) -> None:
        """Wait until batch i-1 has run its statements."""
        self._wait(lambda: self._statements >= i - 1, None)

    def gate(self, i: int) -> Callable[[], None]:
        """Batch i's before_commit: its statements are done; wait (ORDER_WAIT_S at most) for batch i-1's commit."""

        def before_commit() -> None:
            with self._cond:
                self._statements = max(self._statements, i)
                self._cond.notify_all()
            if not self._wait(lambda: self._done >= i - 1, ORDER_WAIT_S):
                raise OutOfTurnError(f"batch {i - 1} had not committed after {ORDER_WAIT_S} s")

        return before_commit

    def wait_done(self, i: int) -> None:
        """Wait until batch i has committed and been handed on (at once for i < 0)."""
        self._wait(lambda: self._done >= i, None)

    def done(self, i: int) -> None:
        """Batch i has committed and been handed on (after batch i-1: see wait_done)."""
        with self._cond:
            self._statements = max(self._statements, i)
            self._done = i
            self._cond.notify_all()

    def wake(self) -> None:
        """The run failed: every waiting writer gives up (WriterStoppedError)."""
        with self._cond:
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not ready():
                failure = self._failed()
                if failure is not None:
                    raise WriterStoppedError("the ingest run failed meanwhile") from failure
                left = ORDER_POLL_S if deadline is None else min(ORDER_POLL_S, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


class Writers:
    """The writer threads and the batches handed to them, numbered in commit order."""

    def __init__(
        self,
        *,
        dataset: str,
        stats: Stats,
        run: RunFailure,
        after_commit: AfterCommit,
        warn: Callable[[str], None],
        closing: Callable[[], bool],
    ) -> None:
        self.dataset, self.stats, self.run, self.after_commit = dataset, stats, run, after_commit
        self.warn, self.closing = warn, closing
        self.order = CommitOrder(lambda: run.failure)
        self._batches: queue.Queue[tuple[int, Batch] | None] = queue.Queue(maxsize=1)
        self.dispatched = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"ingest-writer-{n}", daemon=True) for n in range(WRITERS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, batch: Batch) -> None:
        """Hand a batch (its parts by KINDS) to the next free writer (waits while both are busy and one is waiting)."""
        if not any(batch.values()):
            return
        job = (self.dispatched, batch)
        while True:
            self.run.check()
            try:
                self._batches.put(job, timeout=PUT_WAIT_S)
                break
            except queue.Full:
                continue
        self.dispatched += 1

    def wait_committed(self) -> None:
        """Wait until every batch submitted has committed and been handed on."""
        self.order.wait_done(self.dispatched - 1)

    def stop(self) -> None:
        """End the writers: each takes one None once the batches before it are taken."""
        for _ in self._threads:
            try:
                self._batches.put(None, timeout=PUT_WAIT_S * 4)
            except queue.Full:  # writers that failed take nothing more; they end on their own
                break
        for thread in self._threads:
            thread.join(timeout=PUT_WAIT_S * 4)

    def _loop(self) -> None:
        """A writer: writes the batches it takes, each in its own transaction(s), in CommitOrder."""
        try:
            while (job := self._batches.get()) is not None:
                self._write_batch(*job)
        except WriterStoppedError:
            pass  # the failure that stopped the run is recorded already; this batch is rolled back
        except BaseException as exc:
            failed(self.run, exc)
        finally:
            connections.close_all()

    @tracing.traced(
        "ingest.batch",
        lambda self, i, batch: {
            "dataset": self.dataset,
            "batch": i,
            **{kind: sum(len(part) for part in batch.get(kind, ())) for kind in KINDS},
        },
    )
    def _write_batch(self, i: int, batch: Batch) -> None:
        order = self.order
        changed: set[int] = set()
        # Per symbol whose bars alone changed: the earliest bar time per timeframe, so the
        # bump spares cached pages wholly before it (a new bar leaves a chart's history cached).
        since: dict[int, dict[str, datetime]] = {}
        publish_bars: BarColumns | None = None
        publish_trades: TradeColumns | None = None
        bars, trades = batch.get("bars", []), batch.get("trades", [])
        quotes: list[QuoteColumns] = batch.get("quotes", [])
        statuses: list[StatusIn] = [row for part in batch.get("statuses", []) for row in part]
        # Rows are made columns here (checked: a bad row raises its ValidationError); columns
        # are checked once, by bars_upsert / trades_insert / quotes_insert.
        bar_columns = concat([p if type(p) is BarColumns else bars_checked(p) for p in bars]) if bars else None
        trade_columns = (
            concat([p if type(p) is TradeColumns else trades_checked(p) for p in trades]) if trades else None
        )
        quote_columns = concat(quotes) if quotes else None
        # One transaction per kind, in KINDS order; (name, write(before_commit), rows).
        writes: list[tuple[str, Callable[[Callable[[], None] | None], WriteResult], int]] = []
        if bar_columns is not None and len(bar_columns):
            bcols = bar_columns
            writes.append(("bars", lambda gate: bars_upsert(bars=bcols, before_commit=gate), len(bcols)))
        if trade_columns is not None and len(trade_columns):
            tcols = trade_columns
            writes.append(("trades", lambda gate: trades_insert(trades=tcols, before_commit=gate), len(tcols)))
        if quote_columns is not None and len(quote_columns):
            qcols = quote_columns
            writes.append(("quotes", lambda gate: quotes_insert(quotes=qcols, before_commit=gate), len(qcols)))
        if statuses:
            writes.append(
                ("statuses", lambda gate: status_changes_insert(changes=statuses, before_commit=gate), len(statuses))
            )
        order.start(i)
        # Several transactions: the batch begins after the one before is done, and the next batch
        # may begin once its last has run its statements (only the last goes through the gate).
        if len(writes) > 1:
            order.wait_done(i - 1)
        results: list[WriteResult] = []
        for k, (name, write, count) in enumerate(writes):
            result, retried = self._write(i, name, write, count, gated=k == len(writes) - 1)
            results.append(result)
            if name == "bars" and (result.inserted + result.updated or retried):
                for (symbol_id, tf), (first, _) in result.spans.items():
                    since.setdefault(symbol_id, {})[tf] = first
                publish_bars = bar_columns
            elif name == "trades" and (result.inserted or retried):
                assert trade_columns is not None
                changed.update(np.unique(trade_columns.symbol_id).tolist())
                publish_trades = trade_columns
            # Quotes and status changes: no cached answer reads them yet, and they are not
            # published yet (ingest/publisher.py publishes bars and trades).
        for symbol_id in changed:
            since.pop(symbol_id, None)  # its trades changed too: everything of it is invalidated
        changed.update(since)
        order.wait_done(i - 1)  # (at once after a gate; a batch with nothing to write waits here)
        for result in results:
            self.stats.written += result.inserted + result.updated
            self.stats.duplicates += result.unchanged
        self.after_commit.put((changed, since, publish_bars, publish_trades, tracing.current_context()))
        newest = [int(c.ts.max()) for c in (bar_columns,) if c is not None and len(c)]
        newest += [int(c.ts_event.max()) for c in (trade_columns,) if c is not None and len(c)]
        newest += [int(c.ts_recv.max()) for c in (quote_columns,) if c is not None and len(c)]
        last = utc(max(newest)) if newest else None
        if statuses:
            latest_status = max(change.ts_recv for change in statuses)
            last = latest_status if last is None else max(last, latest_status)
        if last is not None and (self.stats.last_ts is None or last > self.stats.last_ts):
            self.stats.last_ts = last
            metrics.INGEST_LAG.labels(self.dataset).set((timezone.now() - last).total_seconds())
            metrics.INGEST_LAST_RECORD.labels(self.dataset).set(last.timestamp())
        order.done(i)

    def _write(
        self,
        i: int,
        table: str,
        write: Callable[[Callable[[], None] | None], WriteResult],
        count: int,
        *,
        gated: bool = True,
    ) -> tuple[WriteResult, bool]:
        """Run one write of batch i (its own transaction, committed in CommitOrder); True when it was retried.

        ``write(before_commit)`` runs the transaction; ``gated``, through batch i's gate (else
        the batch before is done already). Out of turn (the batch before took too long to
        commit), it is rolled back and run again once that batch is done.
        """
        started = time.perf_counter()
        try:
            result, retried = self._retry(table, lambda: write(self.order.gate(i) if gated else None))
        except OutOfTurnError:
            self.warn("commit_out_of_turn")
            self.order.wait_done(i - 1)
            result, retried = self._retry(table, lambda: write(None))
        metrics.INGEST_BATCH_SECONDS.labels(table).observe(time.perf_counter() - started)
        metrics.INGEST_RECORDS.labels(table).inc(count)
        return result, retried

    def _retry(self, what: str, call: Callable[[], T]) -> tuple[T, bool]:
        """``call()`` until PostgreSQL lets it succeed (see retry.retry_until_success); True when it was retried."""
        return retry_until_success(what, call, closing=self.closing, warn=self.warn)


def failed(run: RunFailure, exc: BaseException) -> None:
    """A writer's (or the batcher's) failure: the run's, if it is the first."""
    run.fail(exc, "ingest writer failed")
