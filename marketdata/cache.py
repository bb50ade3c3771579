"""The Redis hot cache: versioned entries, so a read never returns data older than the database.

Every writer bumps a symbol's version after its commit. An entry holds the version it
was computed at in front of its body (``b"<version>|<body>"``), and a reader fetches the
symbol's version and the entry in one round trip (MGET): an entry of another version is
a miss. A reader reads the version before it queries the database, so what it stores
under that version is at least as new as every commit that version covers; a slower
reader overwriting a newer entry with an older one only costs the next reader a miss.
When Redis is unreachable, reads go to the database and stay correct.

Also here: the process-local caches of the API's hot path (token and symbol look-ups,
a few seconds each) and the epoch that empties them in every process at once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

import redis
import structlog
from django.conf import settings

from ops import metrics

log = structlog.get_logger(__name__)

VERSION_KEY = "md:ver:{symbol_id}"
ENTRY_KEY = "md:cache:{symbol_id}:{what}"
ENTRY_TTL_S = 300
# Replaced (random text) after each commit that changes tokens, entitlements, users or
# symbols; every request reads it in its one round trip, so no process trusts its local
# caches past such a change.
EPOCH_KEY = "md:epoch"
_clients: dict[str, redis.Redis] = {}


def client() -> redis.Redis:
    """A process-wide client for the configured Redis (short timeouts: the cache is optional)."""
    url = settings.REDIS_URL
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
    return _clients[url]


def versions_bump(*, symbol_ids: Iterable[int]) -> None:
    """Invalidate every cached read of these symbols; call after the commit that changed them."""
    ids = sorted(set(symbol_ids))
    if not ids:
        return
    try:
        pipe = client().pipeline(transaction=False)
        for symbol_id in ids:
            pipe.incr(VERSION_KEY.format(symbol_id=symbol_id))
        pipe.execute()
    except redis.RedisError as exc:
        # Entries expire; until Redis is back readers cannot read entries either.
        metrics.CACHE_ERRORS.labels("bump").inc()
        log.warning("cache version bump failed", error=str(exc))


def version_key(symbol_id: int) -> str:
    return VERSION_KEY.format(symbol_id=symbol_id)


def entry_key(symbol_id: int, what: str) -> str:
    return ENTRY_KEY.format(symbol_id=symbol_id, what=what)


def entry_body(version: int, value: bytes | None) -> bytes | None:
    """The body of a fetched entry if it was stored at ``version``, else None (a miss)."""
    if value is None:
        return None
    head, sep, body = value.partition(b"|")
    if not sep or head != b"%d" % version:
        return None
    return body


def round_trip(*, incr: Sequence[tuple[str, int]] = (), get: Sequence[str] = ()) -> tuple[list[int], list[Any]] | None:
    """One Redis round trip: INCR (with an expiry) each counter, then MGET the keys; None if Redis is down."""
    try:
        pipe = client().pipeline(transaction=False)
        for key, expire in incr:
            pipe.incr(key)
            pipe.expire(key, expire)
        if get:
            pipe.mget(list(get))
        out = pipe.execute()
    except redis.RedisError:
        metrics.CACHE_ERRORS.labels("get").inc()
        return None
    return out[0 : 2 * len(incr) : 2], (out[-1] if get else [])


def mget(keys: Sequence[str]) -> list[Any] | None:
    """MGET, or None if Redis is down."""
    result = round_trip(get=keys)
    return None if result is None else result[1]


def cached_set(*, key: str | None, version: int, value: bytes) -> None:
    """Store a computed body under ``key`` at the version read before computing it (no-op without a key)."""
    if key is None:
        return
    try:
        client().set(key, b"%d|" % version + value, ex=ENTRY_TTL_S)
    except redis.RedisError:
        metrics.CACHE_ERRORS.labels("set").inc()


# PROCESS-LOCAL CACHES

LOCAL_TTL_S = 5.0
K = TypeVar("K")
V = TypeVar("V")
_MISSING = object()


def _now() -> float:
    return time.monotonic()


class LocalCache(Generic[K, V]):
    """A bounded dict whose entries live LOCAL_TTL_S seconds; emptied by local_caches_clear.

    ``generation()`` before a database read and ``put(..., generation=)`` after it: a
    value read before a clear is not stored after it.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self._items: dict[K, tuple[float, V]] = {}
        self._generation = 0
        _LOCAL_CACHES.append(self)

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None or item[0] <= _now():
            return None
        return item[1]

    def generation(self) -> int:
        return self._generation

    def put(self, key: K, value: V, *, generation: int) -> None:
        ttl = float(getattr(settings, "API_LOCAL_CACHE_SECONDS", LOCAL_TTL_S))
        if ttl <= 0 or generation != self._generation:
            return
        if len(self._items) >= self.maxsize:
            self._items.clear()
        self._items[key] = (_now() + ttl, value)

    def clear(self) -> None:
        self._generation += 1
        self._items.clear()


_LOCAL_CACHES: list[LocalCache[Any, Any]] = []
_epoch_lock = threading.Lock()
_epoch_seen: object = _MISSING


def local_caches_clear() -> None:
    """Forget every process-local look-up (tokens, symbols)."""
    for local in _LOCAL_CACHES:
        local.clear()


def epoch_note(value: bytes | None) -> bool:
    """Note the epoch a request read; True (after emptying the local caches) when it changed since the last."""
    global _epoch_seen
    with _epoch_lock:
        if value == _epoch_seen:
            return False
        first = _epoch_seen is _MISSING
        _epoch_seen = value
    if not first:
        local_caches_clear()
    return not first


def epoch_bump() -> None:
    """Tell every process to drop its local caches; call after the commit that changed what they hold."""
    local_caches_clear()
    try:
        client().set(EPOCH_KEY, uuid.uuid4().hex)
    except redis.RedisError as exc:
        # The local caches of other processes then hold for at most LOCAL_TTL_S.
        metrics.CACHE_ERRORS.labels("epoch").inc()
        log.warning("cache epoch bump failed", error=str(exc))
