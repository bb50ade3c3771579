"""The leaderboards in Redis: each symbol's row per timeframe, kept after commits, read by /v1/leaderboard.

Per timeframe, the leaderboard statement's row of every symbol, kept by whoever changed
the symbol (the ingester, after its commit) and read by /v1/leaderboard::

    md:lb:<tf>:v            hash  symbol id -> the symbol's version the row was computed at
    md:lb:<tf>:e            hash  symbol id -> "<version>|<row as JSON>"
    md:lb:<tf>:volume       zset  symbol id -> the latest bar's volume
    md:lb:<tf>:change_pct   zset  symbol id -> change_pct (symbols with a previous close)

A row is good while its version is the symbol's current one; a reader that finds a
candidate's row missing or older computes those rows itself (the same statement) and
stores them, so the sets fill themselves and a lost update costs one slower answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any

import redis
import structlog

from ops import metrics

from .redis_client import client
from .versions import version_key

log = structlog.get_logger("marketdata.cache")  # the cache's log lines keep the logger they always had

LB_KEY = "md:lb:{tf}:{part}"
LB_CHUNK = 100
LB_REFRESH_EVERY_S = 1.0
# The ingester refreshes a symbol's rows once it has been this quiet (LeaderboardRefresher).
LB_QUIET_S = 0.25


def _lb(tf: str, part: str) -> str:
    return LB_KEY.format(tf=tf, part=part)


def _lb_encode(entry: Any) -> bytes:
    import orjson

    from ..timeframes import ORIGIN

    micros = (entry.bucket - ORIGIN) // timedelta(microseconds=1)
    change = None if entry.change_pct is None else str(entry.change_pct)
    return orjson.dumps([entry.base, micros, entry.open, entry.high, entry.low, entry.close, entry.volume,
                         entry.anomalies, entry.prev_close, change])  # fmt: skip


def _lb_decode(symbol_id: int, raw: bytes) -> Any:
    import orjson

    from ..selectors.leaderboard import LeaderboardEntry
    from ..timeframes import ORIGIN

    base, micros, o, h, low, c, v, a, prev, change = orjson.loads(raw)
    bucket = ORIGIN + timedelta(microseconds=micros)
    return LeaderboardEntry(
        symbol_id, base, bucket, o, h, low, c, v, a, prev, None if change is None else Decimal(change)
    )


def leaderboard_refresh(*, symbol_ids: Iterable[int], tfs: Sequence[str] | None = None) -> None:
    """Recompute these symbols' leaderboard rows from the database and store them (after the commit)."""
    from ..selectors.leaderboard import leaderboard_entries
    from ..timeframes import SERVED_TIMEFRAMES

    ids = sorted(set(symbol_ids))
    if not ids:
        return
    r = client()
    # The versions first: what the statement then reads is at least as new as they are.
    versions = [int(v or 0) for v in r.mget([version_key(i) for i in ids])]
    members = [str(i) for i in ids]
    for tf in tfs or SERVED_TIMEFRAMES:
        entries = {e.symbol_id: e for e in leaderboard_entries(symbol_ids=ids, tf=tf)}
        rows: dict[Any, bytes] = {}  # (Any: redis-py types mapping keys as an invariant union)
        volumes: dict[str, float] = {}
        changes: dict[str, float] = {}
        gone: list[str] = []  # no row in this timeframe
        unchanged: list[str] = []  # a row, but no previous close to change from
        for symbol_id, member, version in zip(ids, members, versions, strict=True):
            entry = entries.get(symbol_id)
            if entry is None:
                gone.append(member)
                continue
            rows[member] = b"%d|" % version + _lb_encode(entry)
            volumes[member] = entry.volume
            if entry.change_pct is None:
                unchanged.append(member)
            else:
                changes[member] = float(entry.change_pct)
        # One command per key, not per symbol (1,600 commands for 50 symbols took a quarter of a
        # refresh), in one transaction: a reader sees a symbol's row, stamp and scores change together.
        pipe = r.pipeline(transaction=True)
        pipe.hset(_lb(tf, "v"), mapping=dict(zip(members, versions, strict=True)))
        if rows:
            pipe.hset(_lb(tf, "e"), mapping=rows)
            pipe.zadd(_lb(tf, "volume"), volumes)
        if changes:
            pipe.zadd(_lb(tf, "change_pct"), changes)
        if gone:
            pipe.hdel(_lb(tf, "e"), *gone)
            pipe.zrem(_lb(tf, "volume"), *gone)
        if gone or unchanged:
            pipe.zrem(_lb(tf, "change_pct"), *gone, *unchanged)
        pipe.execute()


class LeaderboardStale(Exception):
    """Rows changed between the round trips of one read."""


def leaderboard_read(*, metric: str, tf: str, limit: int, candidates: Sequence[int]) -> list[Any] | None:
    """The top ``limit`` rows among ``candidates`` by ``metric`` (descending), or None when Redis cannot say.

    Rows come back as selectors.leaderboard.LeaderboardEntry, over-fetched past ties and past symbols
    that are not candidates, for the caller to order exactly (Decimal, then ticker).
    Candidates whose rows are missing or older than their version are recomputed first.
    """
    if not candidates:
        return []
    ids = [str(i) for i in candidates]
    r = client()
    for attempt in range(2):
        pipe = r.pipeline(transaction=True)
        pipe.hmget(_lb(tf, "v"), ids)
        pipe.mget([version_key(int(i)) for i in ids])
        pipe.zrevrange(_lb(tf, metric), 0, max(LB_CHUNK, 2 * limit) - 1, withscores=True)
        stamps, versions, top = pipe.execute()
        current = [int(v or 0) for v in versions]
        stale = [int(i) for i, s, v in zip(ids, stamps, current, strict=True) if s is None or int(s) != v]
        if stale:
            if attempt:
                return None
            leaderboard_refresh(symbol_ids=stale, tfs=[tf])
            continue
        wanted = set(ids)
        chosen: list[tuple[str, float]] = []
        start, chunk = 0, max(LB_CHUNK, 2 * limit)
        while True:
            chosen += [(m.decode(), score) for m, score in top if m.decode() in wanted]
            exhausted = len(top) < chunk
            # Every candidate scoring at least the limit-th one may rank above it once ties are broken.
            if exhausted or (len(chosen) >= limit and top[-1][1] < chosen[limit - 1][1]):
                break
            start += chunk
            top = r.zrevrange(_lb(tf, metric), start, start + chunk - 1, withscores=True)
        if len(chosen) >= limit:
            threshold = chosen[limit - 1][1]
            chosen = [(m, score) for m, score in chosen if score >= threshold]
        pipe = r.pipeline(transaction=True)
        pipe.hmget(_lb(tf, "v"), ids)
        pipe.hmget(_lb(tf, "e"), [m for m, _ in chosen] or ["-"])
        stamps_after, raws = pipe.execute()
        if stamps_after != stamps:
            continue  # rows changed meanwhile: read again
        by_id = dict(zip(ids, current, strict=True))
        out = []
        for (member, _), raw in zip(chosen, raws, strict=False):
            head, _, body = (raw or b"").partition(b"|")
            if raw is None or int(head) != by_id[member]:
                return None
            out.append(_lb_decode(int(member), body))
        return out
    return None


class LeaderboardRefresher:
    """An ingester's side of the leaderboards: rows of the symbols it changed.

    Readers never depend on it for correctness: they recompute the rows older than their
    symbol's version. In the caller's thread it refreshes what changed at most every
    ``every_s``. With ``background=True`` (the ingester) a thread of its own refreshes,
    at most every ``every_s``, the changed symbols that have been quiet for ``quiet_s``:
    a row refreshed while its symbol changes batch after batch is stale at the next
    version bump, so that work bought no reader a hit (a refresh is a statement per
    served timeframe, 200 ms for 50 symbols on the benchmark machine; once a second it
    took a fifth of PostgreSQL's time in a replay), while a symbol that changes once a
    second is quiet most of the time and keeps its rows fresh. The writer never waits
    for it; ``close`` refreshes whatever is pending and stops it.
    """

    def __init__(
        self,
        every_s: float = LB_REFRESH_EVERY_S,
        *,
        background: bool = False,
        quiet_s: float = LB_QUIET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_s = every_s
        self.quiet_s = quiet_s
        self.dirty: set[int] = set()
        self.last = 0.0
        self._clock = clock
        self._changed_at: dict[int, float] = {}  # background: symbol id -> when it last changed
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="leaderboard-refresh", daemon=True)
            self._thread.start()

    def changed(self, symbol_ids: Iterable[int]) -> None:
        """Note symbols whose data was committed (after their version bump); refresh when due."""
        if self._thread is not None:
            now = self._clock()
            with self._cond:
                idle = not self._changed_at
                self._changed_at.update(dict.fromkeys(symbol_ids, now))
                if idle and self._changed_at:
                    self._cond.notify()  # the thread waits without a timeout while nothing is pending
            return
        self.dirty.update(symbol_ids)
        if self.dirty and time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Refresh every symbol noted in the caller's thread now (failures are logged: readers recompute)."""
        with self._cond:
            ids, self.dirty, self.last = self.dirty, set(), time.monotonic()
        self._refresh(ids)

    def close(self) -> None:
        """Refresh what is pending, then stop the thread (in the background) or return (in the caller's)."""
        if self._thread is None:
            self.flush()
            return
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        from django.db import connections

        try:
            while True:
                with self._cond:
                    if not self._closed:  # looks once per every_s while anything is pending
                        self._cond.wait(self.every_s if self._changed_at else None)
                    closed = self._closed
                    now = self._clock()
                    due = {i for i, at in self._changed_at.items() if closed or now - at >= self.quiet_s}
                    for symbol_id in due:
                        del self._changed_at[symbol_id]
                self._refresh(due)
                if closed:
                    return
        except Exception:
            log.exception("leaderboard refresher stopped")
        finally:
            connections.close_all()

    @staticmethod
    def _refresh(ids: set[int]) -> None:
        from django.db import DatabaseError

        if not ids:
            return
        try:
            leaderboard_refresh(symbol_ids=ids)
        except (redis.RedisError, DatabaseError) as exc:
            metrics.CACHE_ERRORS.labels("leaderboard").inc()
            log.warning("leaderboard refresh failed", error=str(exc), symbols=len(ids))
