"""One ingester per (dataset, schema): PostgreSQL session-level advisory locks, kept for the whole run."""

from __future__ import annotations

import threading
import zlib
from typing import Any

import psycopg
import structlog
from django.db import connection

from marketdata.errors import MarketDataError

log = structlog.get_logger("ingest.pipeline")  # the run's log lines keep the logger they always had

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
