"""One ingest run: source -> bounded queue -> batcher -> writers -> commit -> after-commit -> publish.

The source runs in the calling thread and only normalises and enqueues (``Pipeline.feed``:
rows, or columns for runs of COLUMNS_MIN records, marketdata/columns.py); a full queue
blocks it (back-pressure: nothing is dropped while the database is slow). The stages
behind the queue each have a module (batcher.py, writers.py, after_commit.py,
publisher.py, publisher_hosts.py) and one owner, supervisor.py, which starts them, holds the run's first
failure and stops them in order. SIGTERM and Ctrl-C stop the source; everything already
queued is still written before the run ends.

``run`` is the one driver: it takes any source's ``records(stopping)`` (source.py)
into one pipeline per dataset, each feed under its advisory lock (feed_lock.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from itertools import groupby
from typing import TYPE_CHECKING, Any

import databento_dbn as dbn
import structlog
from django.conf import settings
from django.db import connection

from marketdata.cache.leaderboards import LeaderboardRefresher
from marketdata.columns import BarColumns, Columns
from marketdata.services.feeds import feed_status_record
from ops import metrics

from .after_commit import AfterCommit
from .batcher import Batcher
from .book_records import QUOTE_RECORDS
from .feed_lock import FeedLock, IngestLockedError, advisory_key
from .publisher_hosts import ProcessHost, PublisherHost, ThreadHost
from .record_queue import RecordQueue
from .records import Normaliser, RawRecords
from .retry import TRANSIENT
from .source import FeedStart, Mappings, Shift, SourceErrors
from .stats import Stats
from .supervisor import Supervisor, stop_on_signals
from .symbology import Resolver
from .writers import Writers

if TYPE_CHECKING:
    from .source import Source

__all__ = ["FeedLock", "IngestLockedError", "Pipeline", "advisory_key", "run"]

log = structlog.get_logger(__name__)

BATCH_BARS = 1000
BATCH_TRADES = 5000
FLUSH_SECONDS = 0.05
QUEUE_MAX = 20_000
FEED_CHUNK = 256
# A run of at least this many bar or trade records is normalised as columns (marketdata/columns.py);
# a shorter one (a live feed's record, a run cut by symbology records) one record at a time.
COLUMNS_MIN = 64


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
        self.queue = RecordQueue(queue_max)
        self.feed_chunk = max(1, min(FEED_CHUNK, queue_max // 4))
        self.batch_bars = batch_bars
        self.batch_trades = batch_trades
        self.schemas: set[str] = set()
        self.run = Supervisor(queue=self.queue, record_error=self._record_error)
        closing = lambda: self.queue.closed  # noqa: E731 (what retries ask: is the run closing?)
        # Derive and publish committed batches in commit order: in a process of its own
        # (INGEST_PUBLISH_PROCESS, the command's default) or in a thread (ingest/publisher_hosts.py).
        publisher: PublisherHost | None = None
        if publish:
            host = ProcessHost if settings.INGEST_PUBLISH_PROCESS else ThreadHost
            run_id = uuid.uuid4().hex  # with a batch number, names each publish so a retry is not repeated
            publisher = host(run_id, closing=closing, warn=self._warn, failed=self.run.fail)
        leaderboards = LeaderboardRefresher(background=True)  # off the writer's path
        after_commit = AfterCommit(run=self.run, resolver=self.resolver, leaderboards=leaderboards, publisher=publisher)
        writers = Writers(
            dataset=dataset, stats=self.stats, run=self.run, after_commit=after_commit, warn=self._warn, closing=closing
        )
        batcher = Batcher(
            queue=self.queue, writers=writers, run=self.run, batch_bars=batch_bars, batch_trades=batch_trades,
            flush_seconds=flush_seconds, stats=self.stats, feed_status=self._feed_status_safe, progress=progress,
            started=time.monotonic(), drained=self.run.drained, abort=self.run.abort, leaderboards=leaderboards,
        )  # fmt: skip
        self.run.start(
            publisher=publisher, after_commit=after_commit, writers=writers, batcher=batcher,
            leaderboards=leaderboards, feed_status=self._feed_status_safe,
        )  # fmt: skip

    @property
    def failure(self) -> BaseException | None:
        """The run's first failure, if any."""
        return self.run.failure

    # -- source side ---------------------------------------------------------------

    def feed(self, record: object) -> None:
        """Normalise one decoded record and enqueue it (blocks while the queue is full)."""
        row = self.normalise(record)
        if isinstance(row, Columns):  # a quote
            self._put_columns(row)
        elif row is not None:
            self._put([row])

    def feed_many(self, records: Iterable[object]) -> None:
        """Normalise decoded records and enqueue them in chunks (blocks while the queue is full).

        Runs of COLUMNS_MIN bar or trade records or more are normalised as columns, the rest
        one by one; quotes always as columns. Either way they are queued in their order.
        """
        normalise = self.normalise
        for kind, group in groupby(records, type):
            run: list[Any] = list(group)
            columns: Columns | None = None
            if kind in QUOTE_RECORDS:
                quotes = normalise.quote_columns(run)
                if quotes is not None:
                    self._put_columns(quotes)
                continue
            if len(run) >= COLUMNS_MIN:
                if kind is dbn.TradeMsg:
                    columns = normalise.trade_columns(run)
                elif kind is dbn.OHLCVMsg:
                    columns = normalise.bar_columns(run)
            if columns is not None:
                self._put_columns(columns)
                continue
            rows: list[Any] = [row for row in map(normalise, run) if row is not None]
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
        batch = self.batch_bars if type(columns) is BarColumns else self.batch_trades
        step = max(1, min(batch, self.queue.max_rows // 4))
        for start in range(0, len(columns), step):
            self._put(columns[start : start + step])

    def _put(self, item: list[Any] | Columns) -> None:
        """Enqueue rows or columns; wait (back-pressure) while the queue is full."""
        while not self.queue.put(item, timeout=0.5):
            metrics.INGEST_BACKPRESSURE.inc()
            self.run.check()
        self.run.check()

    def close(self) -> Stats:
        """Flush everything queued, stop the stages in order and return the run's stats (or raise its failure)."""
        self.run.stop()
        return self.stats

    def _warn(self, what: str) -> None:
        with self._warn_lock:  # (from the writers, the after-commit thread and the publisher's reports)
            self.stats.warnings[what] += 1

    # -- feed status ---------------------------------------------------------------

    def _feed_status(self) -> None:
        stats = self.stats
        # A copy: the reader thread adds schemas while this runs (set.copy holds the GIL throughout).
        for schema in self.schemas.copy() or {"unknown"}:
            feed_status_record(
                dataset=self.dataset, schema=schema, source=self.source, last_record_ts=stats.last_ts,
                records_written=stats.written, duplicates=stats.duplicates, skipped=sum(stats.skipped.values()),
                errors=sum(stats.errors.values()), last_error=stats.last_error,
            )  # fmt: skip

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
    by SIGTERM or Ctrl-C: the supervisor's ``stop_on_signals``, entered here and nowhere
    else, for every source), after what it holds: every record it handed over is stored
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
                current.normalise.feed_schema = item.schema
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
