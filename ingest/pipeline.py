"""Source -> bounded queue -> batch writer -> commit -> publish.

The source runs in the calling thread and only normalises and enqueues (rows, or columns
for runs of COLUMNS_MIN records: marketdata/columns.py); a full queue blocks it
(back-pressure: nothing is dropped while the database is slow). A batcher thread drains
the queue into batches of up to BATCH_BARS bars / BATCH_TRADES trades or FLUSH_SECONDS of
waiting and numbers them; WRITERS writer threads, each with its own database session,
write each with one COPY-based upsert transaction. A batch's COPY runs while the batch
before it commits, and it commits only after that one (CommitOrder): what is stored is
always a prefix of the batches. After the commit an after-commit thread bumps the
batch's cache versions and hands it to the publisher (a process, or a thread), which
derives and publishes batches in commit order, while the writers go on with the next.
SIGTERM and Ctrl-C stop the source; everything already queued is still written before
the run ends.

While PostgreSQL or Redis is unreachable (a restart, a failover) the writer retries the
batch it holds (the publisher, the publish), with a capped backoff: the queue fills, the
source waits (back-pressure), and nothing is dropped. A write whose commit may have
happened (the connection died around it) is published in full once it succeeds: a bar
sent twice replaces itself, a bar never sent would be lost to clients.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from itertools import groupby
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import databento_dbn as dbn
import numpy as np
import psycopg
import structlog
from django.conf import settings
from django.db import connection, connections
from django.utils import timezone

from marketdata.cache import LeaderboardRefresher, versions_bump
from marketdata.columns import BarColumns, Columns, TradeColumns, concat, utc
from marketdata.errors import MarketDataError
from marketdata.models import FeedStatus
from marketdata.services import BarIn, TradeIn, WriteResult, bars_checked, bars_upsert, trades_checked, trades_insert
from ops import metrics, tracing

from .publishing import PUT_WAIT_S, STOP, ProcessHost, ThreadHost, trades_out
from .records import Normaliser, RawRecords, Stats
from .retry import TRANSIENT, retry_until_success
from .sources.base import FeedStart, Mappings, Shift, SourceErrors
from .symbology import Resolver

if TYPE_CHECKING:
    from .sources.base import Source

log = structlog.get_logger(__name__)

BATCH_BARS = 1000
BATCH_TRADES = 5000
FLUSH_SECONDS = 0.05
QUEUE_MAX = 20_000
FEED_STATUS_EVERY_S = 1.0
# Committed batches waiting for their cache bump and hand-off to the publisher (the
# after-commit thread); beyond this the writer waits.
AFTER_COMMIT_BATCHES = 2
FEED_CHUNK = 256
# Batch writers, each with its own database session: batch i runs its statements while
# batch i-1 commits, and commits after it (CommitOrder).
WRITERS = 2
# A batch ready to commit waits this long for the batch before it to commit, then rolls
# back and is written again once that one has (OutOfTurnError).
ORDER_WAIT_S = 2.0
ORDER_POLL_S = 0.5  # a writer waiting its turn looks for a failed run this often
# A run of at least this many bar or trade records is normalised as columns (marketdata/columns.py);
# a shorter one (a live feed's record, a run cut by symbology records) one record at a time.
COLUMNS_MIN = 64
_STOP = object()
T = TypeVar("T")

ERR_LOCKED = (
    "another ingester already runs for {dataset} {schema} (PostgreSQL advisory lock held); "
    "stop it first or ingest another (dataset, schema)"
)


ERR_LOCK_LOST = (
    "lost the feed lock of {dataset} {schema} after its database session ended, and another ingester "
    "holds it now: stopping so that only one writes the feed"
)
LOCK_CHECK_S = 2.0  # how often the feed lock's session is checked (and, if lost, taken again)


class IngestLockedError(MarketDataError):
    """A second ingester for the same (dataset, schema)."""

    code = "locked"


def advisory_key(dataset: str, schema: str) -> int:
    """A stable 63-bit key for pg_advisory_lock from (dataset, schema)."""
    return zlib.crc32(f"ingest:{dataset}:{schema}".encode()) | (0x4D44 << 32)


class FeedLock:
    """Session-level advisory locks, held on a connection of their own for the whole run.

    A keeper thread looks at that session every LOCK_CHECK_S. When it has died (PostgreSQL
    restarted, a failover) the locks died with it, so it reconnects and takes them again;
    if another ingester took one meanwhile, ``check`` raises and the run stops: two
    ingesters must never write one feed.
    """

    def __init__(self) -> None:
        self.held: set[tuple[str, str]] = set()
        self.lost: IngestLockedError | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    @staticmethod
    def _connect() -> psycopg.Connection[Any]:
        params = {k: v for k, v in connection.get_connection_params().items() if k not in ("cursor_factory", "context")}
        return psycopg.connect(autocommit=True, connect_timeout=5, **params)

    @staticmethod
    def _try(conn: psycopg.Connection[Any], dataset: str, schema: str) -> bool:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", [advisory_key(dataset, schema)]).fetchone()
        return bool(row and row[0])

    def acquire(self, dataset: str, schema: str) -> None:
        if (dataset, schema) in self.held:
            return
        with self._guard:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            if not self._try(self._conn, dataset, schema):
                raise IngestLockedError(ERR_LOCKED.format(dataset=dataset, schema=schema))
            self.held.add((dataset, schema))
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="ingest-feed-lock", daemon=True)
            self._keeper.start()

    def check(self) -> None:
        """Raise IngestLockedError once a lock was lost to another ingester."""
        if self.lost is not None:
            raise self.lost

    def _keep(self) -> None:
        while not self._stop.wait(LOCK_CHECK_S):
            with self._guard:
                if self._alive():
                    continue
                try:
                    conn = self._connect()
                except psycopg.Error:
                    continue  # still down: the writer is waiting for it too; try again later
                if self._conn is not None:
                    self._conn.close()
                self._conn = conn
                for dataset, schema in sorted(self.held):
                    if not self._try(conn, dataset, schema):
                        self.lost = IngestLockedError(ERR_LOCK_LOST.format(dataset=dataset, schema=schema))
                        log.error("feed lock lost to another ingester", dataset=dataset, schema=schema)
                        return
                log.warning("feed locks taken again after their session was lost", feeds=sorted(self.held))

    def _alive(self) -> bool:
        try:
            assert self._conn is not None
            self._conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def release(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=LOCK_CHECK_S + 10)
        with self._guard:
            if self._conn is not None:
                try:
                    for dataset, schema in self.held:
                        self._conn.execute("SELECT pg_advisory_unlock(%s)", [advisory_key(dataset, schema)])
                except psycopg.Error:
                    # The session died (PostgreSQL restarted): its locks went with it.
                    log.warning("advisory lock session lost before release", feeds=sorted(self.held))
                self._conn.close()
                self._conn = None
        self.held.clear()


class RowQueue:
    """A queue bounded in rows whose items are lists of rows, so a source can hand over many at once."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._items: deque[Any] = deque()
        self._rows = 0
        self._closed = False
        self._cond = threading.Condition()

    def put(self, rows: Sized, timeout: float) -> bool:
        """Add ``rows``; wait while that would pass the bound (an empty queue takes any list). False on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._rows or self._rows + len(rows) <= self.max_rows, timeout):
                return False
            self._items.append(rows)
            self._rows += len(rows)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None) -> Any:
        """The next list of rows; None on timeout; _STOP once closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                return _STOP
            rows = self._items.popleft()
            self._rows -= len(rows)
            self._cond.notify_all()
            return rows

    def close(self) -> None:
        """No more puts: get drains what is queued, then returns _STOP."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def clear(self) -> None:
        """Drop everything queued (the writer failed) and release waiting producers."""
        with self._cond:
            self._items.clear()
            self._rows = 0
            self._cond.notify_all()

    def qsize(self) -> int:
        """Rows waiting."""
        return self._rows

    @property
    def closed(self) -> bool:
        return self._closed


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


class Pipeline:
    """One ingest run: feed it records with ``feed``; ``close`` flushes and stops."""

    def __init__(
        self,
        *,
        dataset: str,
        source: str,
        symbols: Iterable[str] | None = None,
        publish: bool = True,
        queue_max: int = QUEUE_MAX,
        batch_bars: int = BATCH_BARS,
        batch_trades: int = BATCH_TRADES,
        flush_seconds: float = FLUSH_SECONDS,
        progress: Callable[[Stats, float], None] | None = None,
    ) -> None:
        self.dataset = dataset
        self.source = source
        self.stats = Stats()
        self._warn_lock = threading.Lock()
        self.resolver = Resolver(dataset=dataset, allowed=frozenset(symbols) if symbols else None)
        self.resolver.load()
        self.normalise = Normaliser(self.resolver, self.stats)
        self.queue = RowQueue(queue_max)
        self.feed_chunk = max(1, min(FEED_CHUNK, queue_max // 4))
        self.batch_bars = batch_bars
        self.batch_trades = batch_trades
        self.flush_seconds = flush_seconds
        self.publish_enabled = publish
        self._leaderboards = LeaderboardRefresher(background=True)  # off the writer's path
        self.progress = progress
        self.stopping = threading.Event()
        self.schemas: set[str] = set()
        self.failure: BaseException | None = None
        self.started = time.monotonic()
        self._tickers_sent = 0  # how many of the resolver's tickers the publisher has been given
        # Derive and publish committed batches in commit order: in a process of its own
        # (INGEST_PUBLISH_PROCESS, the command's default) or in a thread (ingest/publishing.py).
        self._publisher: ProcessHost | ThreadHost | None = None
        if publish:
            host = ProcessHost if settings.INGEST_PUBLISH_PROCESS else ThreadHost
            run_id = uuid.uuid4().hex  # with a batch number, names each publish so a retry is not repeated
            self._publisher = host(
                run_id, closing=lambda: self.queue.closed, warn=self._warn, failed=self._publisher_failed
            )
        # After each commit, its cache bump and hand-off to the publisher, in commit order,
        # in a thread of their own: the writer goes on with the next batch's COPY meanwhile.
        self._after: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=AFTER_COMMIT_BATCHES)
        self._after_failure: BaseException | None = None
        self._after_thread = threading.Thread(target=self._after_loop, name="ingest-after-commit", daemon=True)
        self._after_thread.start()
        # The batcher (_write_loop) numbers batches and hands them to the writers (_commit_loop).
        self._failure_lock = threading.Lock()
        self._order = CommitOrder(lambda: self.failure)
        self._batches: queue.Queue[tuple[int, list[Any], list[Any]] | None] = queue.Queue(maxsize=1)
        self._dispatched = 0
        self._writers = [
            threading.Thread(target=self._commit_loop, name=f"ingest-writer-{n}", daemon=True) for n in range(WRITERS)
        ]
        for writer in self._writers:
            writer.start()
        self._writer = threading.Thread(target=self._write_loop, name="ingest-batcher", daemon=True)
        self._writer.start()

    # -- source side ---------------------------------------------------------------

    def feed(self, record: object) -> None:
        """Normalise one decoded record and enqueue it (blocks while the queue is full)."""
        row = self.normalise(record)
        if row is not None:
            self._put([row])

    def feed_many(self, records: Iterable[object]) -> None:
        """Normalise decoded records and enqueue them in chunks (blocks while the queue is full).

        Runs of COLUMNS_MIN bar or trade records or more are normalised as columns, the rest
        one by one; either way they are queued in their order.
        """
        normalise = self.normalise
        for kind, group in groupby(records, type):
            run: list[Any] = list(group)
            columns: Columns | None = None
            if len(run) >= COLUMNS_MIN:
                if kind is dbn.TradeMsg:
                    columns = normalise.trade_columns(run)
                elif kind is dbn.OHLCVMsg:
                    columns = normalise.bar_columns(run)
            if columns is not None:
                self._put_columns(columns)
                continue
            rows = [row for row in map(normalise, run) if row is not None]
            for start in range(0, len(rows), self.feed_chunk):
                self._put(rows[start : start + self.feed_chunk])

    def feed_raw(self, run: RawRecords) -> None:
        """Normalise records read as bytes (RawRecords) as columns and enqueue them; records the
        columns cannot hold (times past COLUMN_TS_LIMIT, ...) go one by one, as feed_many's."""
        columns: Columns | None = (
            self.normalise.bar_columns(run.data) if run.kind is dbn.OHLCVMsg else self.normalise.trade_columns(run.data)
        )
        if columns is None:
            self.feed_many(run.records())
        else:
            self._put_columns(columns)

    def _put_columns(self, columns: Columns) -> None:
        """Enqueue columns in pieces of at most a batch (and a quarter of the queue)."""
        batch = self.batch_trades if type(columns) is TradeColumns else self.batch_bars
        step = max(1, min(batch, self.queue.max_rows // 4))
        for start in range(0, len(columns), step):
            self._put(columns[start : start + step])

    def _put(self, item: list[Any] | Columns) -> None:
        """Enqueue rows or columns; wait (back-pressure) while the queue is full."""
        while not self.queue.put(item, timeout=0.5):
            metrics.INGEST_BACKPRESSURE.inc()
            self._raise_if_failed()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise RuntimeError("ingest writer failed") from self.failure

    def close(self) -> Stats:
        """Flush everything queued, stop the writer and return the run's stats."""
        self.queue.close()
        if self._publisher is not None:
            self._publisher.closing()
        self._writer.join()
        if self._publisher is not None:
            self._publisher.join()
        if self.failure is not None:
            raise RuntimeError("ingest writer failed") from self.failure
        return self.stats

    # -- writer side ---------------------------------------------------------------

    def _write_loop(self) -> None:
        """The batcher: gathers what is queued into batches and hands each to a writer, numbered."""
        # Each in its order: columns, and runs of rows between them.
        bars: list[BarColumns | list[BarIn]] = []
        trades: list[TradeColumns | list[TradeIn]] = []
        counts = [0, 0]  # bars, trades held
        deadline: float | None = None
        last_status = 0.0
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                item = self.queue.get(timeout=timeout)
                if item is _STOP:
                    self._dispatch(bars, trades)
                    self._order.wait_done(self._dispatched - 1)  # every batch committed and handed on
                    self._writers_stop()
                    self._after_drain()
                    self._leaderboards.close()
                    self._publish_stop()
                    self._feed_status_safe()
                    return
                if type(item) is TradeColumns:
                    trades.append(item)
                    counts[1] += len(item)
                elif type(item) is BarColumns:
                    bars.append(item)
                    counts[0] += len(item)
                else:
                    for row in item or ():
                        parts: list[Any] = bars if type(row) is BarIn else trades
                        if not parts or type(parts[-1]) is not list:
                            parts.append([])
                        parts[-1].append(row)
                        counts[parts is trades] += 1
                if deadline is None and item is not None:
                    deadline = time.monotonic() + self.flush_seconds
                metrics.INGEST_QUEUE_DEPTH.set(self.queue.qsize())
                if item is None or counts[0] >= self.batch_bars or counts[1] >= self.batch_trades:
                    self._dispatch(bars, trades)
                    bars, trades, counts, deadline = [], [], [0, 0], None
                    now = time.monotonic()
                    if now - last_status >= FEED_STATUS_EVERY_S:
                        self._feed_status_safe()
                        last_status = now
                        if self.progress:
                            self.progress(self.stats, now - self.started)
        except BaseException as exc:  # the source must learn of it; nothing else may swallow it
            self._writer_failed(exc)
            self._writers_stop()
            self._after_stop()
            self._publish_stop()
        finally:
            self._leaderboards.close()  # (again after a clean stop: returns at once)
            connections.close_all()

    def _dispatch(self, bars: list[BarColumns | list[BarIn]], trades: list[TradeColumns | list[TradeIn]]) -> None:
        """Hand a batch to the next free writer (waits while both are busy and one batch is waiting)."""
        if not bars and not trades:
            return
        job = (self._dispatched, bars, trades)
        while True:
            self._raise_if_failed()
            try:
                self._batches.put(job, timeout=PUT_WAIT_S)
                break
            except queue.Full:
                continue
        self._dispatched += 1

    def _writers_stop(self) -> None:
        """End the writers: each takes one None once the batches before it are taken."""
        for _ in self._writers:
            try:
                self._batches.put(None, timeout=PUT_WAIT_S * 4)
            except queue.Full:  # writers that failed take nothing more; they end on their own
                break
        for writer in self._writers:
            writer.join(timeout=PUT_WAIT_S * 4)

    def _commit_loop(self) -> None:
        """A writer: writes the batches it takes, each in its own transaction(s), in CommitOrder."""
        try:
            while (job := self._batches.get()) is not None:
                self._flush(*job)
        except WriterStoppedError:
            pass  # the failure that stopped the run is recorded already; this batch is rolled back
        except BaseException as exc:
            self._writer_failed(exc)
        finally:
            connections.close_all()

    def _writer_failed(self, exc: BaseException) -> None:
        """Record the run's failure (the first one only), release the source and wake waiting writers."""
        with self._failure_lock:
            first = self.failure is None
            if first:
                self.failure = exc
        if first:
            log.error("ingest writer failed", exc_info=exc)
            self._record_error(exc)
        self.queue.clear()  # unblock a source waiting on a full queue
        self._order.wake()

    @tracing.traced(
        "ingest.batch",
        lambda self, i, bars, trades: {
            "dataset": self.dataset,
            "batch": i,
            "bars": sum(len(part) for part in bars),
            "trades": sum(len(part) for part in trades),
        },
    )
    def _flush(self, i: int, bars: list[BarColumns | list[BarIn]], trades: list[TradeColumns | list[TradeIn]]) -> None:
        order = self._order
        changed: set[int] = set()
        # Per symbol whose bars alone changed: the earliest bar time per timeframe, so the
        # bump spares cached pages wholly before it (a new bar leaves a chart's history cached).
        since: dict[int, dict[str, datetime]] = {}
        publish_bars: BarColumns | None = None
        publish_trades: TradeColumns | None = None
        # Rows are made columns here (checked: a bad row raises its ValidationError); columns
        # are checked once, by bars_upsert / trades_insert.
        bar_columns = concat([p if type(p) is BarColumns else bars_checked(p) for p in bars]) if bars else None
        trade_columns = (
            concat([p if type(p) is TradeColumns else trades_checked(p) for p in trades]) if trades else None
        )
        order.start(i)
        # Two transactions (bars, then trades): the batch begins after the one before is done,
        # and the next batch may begin once its second has run its statements.
        both = bar_columns is not None and len(bar_columns) > 0 and trade_columns is not None and len(trade_columns) > 0
        if both:
            order.wait_done(i - 1)
        results: list[WriteResult] = []
        if bar_columns is not None and len(bar_columns):
            cols = bar_columns
            result, retried = self._write(
                i, "bars", lambda gate: bars_upsert(bars=cols, before_commit=gate), len(cols), gated=not both
            )
            results.append(result)
            if result.inserted + result.updated or retried:
                for (symbol_id, tf), (first, _) in result.spans.items():
                    since.setdefault(symbol_id, {})[tf] = first
                publish_bars = bar_columns
        if trade_columns is not None and len(trade_columns):
            tcols = trade_columns
            result, retried = self._write(
                i, "trades", lambda gate: trades_insert(trades=tcols, before_commit=gate), len(tcols)
            )
            results.append(result)
            if result.inserted or retried:
                changed.update(np.unique(trade_columns.symbol_id).tolist())
                publish_trades = trade_columns
        for symbol_id in changed:
            since.pop(symbol_id, None)  # its trades changed too: everything of it is invalidated
        changed.update(since)
        order.wait_done(i - 1)  # (at once after a gate; a batch with nothing to write waits here)
        for result in results:
            self.stats.written += result.inserted + result.updated
            self.stats.duplicates += result.unchanged
        self._after_put((changed, since, publish_bars, publish_trades, tracing.current_context()))
        newest = [int(c.ts.max()) for c in (bar_columns,) if c is not None and len(c)]
        newest += [int(c.ts_event.max()) for c in (trade_columns,) if c is not None and len(c)]
        last = utc(max(newest)) if newest else None
        if last is not None and (self.stats.last_ts is None or last > self.stats.last_ts):
            self.stats.last_ts = last
            metrics.INGEST_LAG.labels(self.dataset).set((timezone.now() - last).total_seconds())
            metrics.INGEST_LAST_RECORD.labels(self.dataset).set(last.timestamp())
        order.done(i)

    # -- after the commit ----------------------------------------------------------

    def _after_put(self, item: tuple[Any, ...]) -> None:
        """Hand a committed batch to the after-commit thread (waits while it is behind)."""
        while True:
            if self._after_failure is not None:
                raise RuntimeError("ingest after-commit work failed") from self._after_failure
            try:
                self._after.put(item, timeout=PUT_WAIT_S)
                return
            except queue.Full:
                metrics.INGEST_BACKPRESSURE.inc()

    def _after_loop(self) -> None:
        """Each committed batch in order: bump its symbols' cache versions, then hand it to the publisher."""
        while True:
            item = self._after.get()
            try:
                if item is None:
                    return
                if self._after_failure is not None:
                    continue  # the run is failing: what was queued is dropped
                changed, since, bars, trades, trace = item
                with tracing.continued(trace, "ingest.after_commit"):  # a child of the batch's span
                    versions_bump(symbol_ids=changed, changed=since)  # at once: the cache must not outlive the commit
                    # Refreshed in a thread of its own once quiet (readers recompute rows older than
                    # their symbol's version).
                    self._leaderboards.changed(changed)
                    if self._publisher is not None and (bars is not None or trades is not None):
                        self._publish_submit(bars, trades)
            except BaseException as exc:
                log.exception("ingest after-commit work failed")
                self._after_failure = exc
                self.failure = self.failure or exc
                self.queue.clear()  # unblock a source waiting on a full queue
            finally:
                self._after.task_done()

    def _after_drain(self) -> None:
        """Wait until every committed batch is bumped and handed over; raise what failed, if anything."""
        self._after.join()
        self._after_stop()
        if self._after_failure is not None:
            raise RuntimeError("ingest after-commit work failed") from self._after_failure

    def _after_stop(self) -> None:
        try:
            self._after.put(None, timeout=PUT_WAIT_S * 4)  # (a thread stuck past that is a daemon: it dies with us)
        except queue.Full:
            log.warning("after-commit thread still busy at stop")

    # -- publisher side ------------------------------------------------------------

    def _publish_submit(self, bars: BarColumns | None, trades: TradeColumns | None) -> None:
        """Hand a committed batch to the publisher (waits while it is behind)."""
        tickers: dict[int, str] = {}
        if len(self.resolver.tickers) != self._tickers_sent:  # tickers are only ever added
            tickers = dict(self.resolver.tickers)
            self._tickers_sent = len(tickers)
        self._publish_put(([] if bars is None else [bars], [] if trades is None else [trades_out(trades)], tickers))

    def _publish_put(self, item: Any) -> None:
        assert self._publisher is not None
        while not self._publisher.put(item, PUT_WAIT_S):
            metrics.INGEST_BACKPRESSURE.inc()
            if not self._publisher.alive():
                raise RuntimeError("ingest publisher stopped") from self.failure

    def _publish_stop(self) -> None:
        if self._publisher is not None and self._publisher.alive():
            self._publish_put(STOP)

    def _publisher_failed(self, exc: BaseException) -> None:
        """The publisher stopped on an error: the source and the writer must learn of it."""
        self.failure = exc
        self._record_error(exc)
        self.queue.clear()

    def _warn(self, what: str) -> None:
        with self._warn_lock:  # (from the writers, the after-commit thread and the publisher's reports)
            self.stats.warnings[what] += 1

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
            result, retried = self._retry(table, lambda: write(self._order.gate(i) if gated else None))
        except OutOfTurnError:
            self._warn("commit_out_of_turn")
            self._order.wait_done(i - 1)
            result, retried = self._retry(table, lambda: write(None))
        metrics.INGEST_BATCH_SECONDS.labels(table).observe(time.perf_counter() - started)
        metrics.INGEST_RECORDS.labels(table).inc(count)
        return result, retried

    def _retry(self, what: str, call: Callable[[], T]) -> tuple[T, bool]:
        """``call()`` until PostgreSQL lets it succeed (see retry.retry_until_success); True when it was retried."""
        return retry_until_success(what, call, closing=lambda: self.queue.closed, warn=self._warn)

    def _feed_status(self) -> None:
        stats = self.stats
        now = datetime.now(UTC)
        for schema in self.schemas or {"unknown"}:
            FeedStatus.objects.update_or_create(
                dataset=self.dataset,
                schema=schema,
                defaults={
                    "source": self.source,
                    "last_record_ts": stats.last_ts,
                    "last_batch_at": now,
                    "lag_seconds": (now - stats.last_ts).total_seconds() if stats.last_ts else None,
                    "records_written": stats.written,
                    "duplicates": stats.duplicates,
                    "skipped": sum(stats.skipped.values()),
                    "errors": sum(stats.errors.values()),
                    "last_error": stats.last_error[:2000],
                    "last_error_at": now if stats.last_error else None,
                },
            )

    def _feed_status_safe(self) -> None:
        """Feed status is advisory: while PostgreSQL is down it waits for the next one."""
        try:
            self._feed_status()
        except TRANSIENT as exc:
            log.warning("feed status not written", error=str(exc))
            connection.close()

    def _record_error(self, exc: BaseException) -> None:
        self.stats.error(type(exc).__name__, str(exc))
        try:
            self._feed_status()
        except Exception:
            log.exception("could not record the failure in feed status")


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


UNREAD = "(unreadable files)"  # run()'s stats of source errors that belong to no feed


def run(
    source: Source,
    *,
    symbols: list[str] | None,
    publish: bool = True,
    progress: Callable[[Stats, float], None] | None = None,
    stopping: threading.Event | None = None,
    install_signals: bool = False,
) -> dict[str, Stats]:
    """Drive ``source.records(stopping)`` through one pipeline per dataset, each feed under its advisory lock.

    The source ends its records itself once ``stopping`` is set (with ``install_signals``,
    by SIGTERM or Ctrl-C), after what it holds: every record it handed over is stored
    before this returns. Returns each dataset's stats, and ``UNREAD``'s for source errors
    of no feed (a file unreadable before its metadata).
    """
    stopping = stopping if stopping is not None else threading.Event()
    with stop_on_signals(stopping) if install_signals else nullcontext():
        return _drive(source, symbols=symbols, publish=publish, progress=progress, stopping=stopping)


def _drive(
    source: Source,
    *,
    symbols: list[str] | None,
    publish: bool,
    progress: Callable[[Stats, float], None] | None,
    stopping: threading.Event,
) -> dict[str, Stats]:
    pipelines: dict[str, Pipeline] = {}
    unread = Stats()
    locks = FeedLock()
    current: Pipeline | None = None
    shift = 0
    records = source.records(stopping)
    try:
        for item in records:
            locks.check()
            if isinstance(item, FeedStart):
                locks.acquire(item.dataset, item.schema)
                current = pipelines.get(item.dataset)
                if current is None:
                    current = pipelines[item.dataset] = Pipeline(
                        dataset=item.dataset, source=source.name, symbols=symbols, publish=publish, progress=progress
                    )
                current.schemas.add(item.schema)
                current.resolver.add_metadata_mappings(item.mappings)
            elif isinstance(item, SourceErrors):
                target = pipelines[item.dataset].stats if item.dataset is not None else unread
                target.errors.update(item.stats.errors)
                target.last_error = item.stats.last_error or target.last_error
            elif isinstance(item, Shift):
                shift = item.ns
            elif current is None:
                continue
            elif isinstance(item, Mappings):
                current.resolver.add_metadata_mappings(item.mappings)
            else:
                current.normalise.shift_ns = shift
                if isinstance(item, RawRecords):
                    current.feed_raw(item)
                elif isinstance(item, list):
                    current.feed_many(item)
                else:
                    current.feed(item)
    finally:
        try:
            try:
                results = {name: p.close() for name, p in pipelines.items()}
            finally:
                locks.release()  # a failed run lets go of its feeds too
        finally:
            records.close()  # a source left suspended (the run failed) releases its client, its spool
    if unread.errors:
        results[UNREAD] = unread
    return results
