"""Process-local caches of the API's hot path (token and symbol look-ups), and the epoch that empties them."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Generic, TypeVar

import redis
import structlog
from django.conf import settings

from ops import metrics

from .redis_client import client

log = structlog.get_logger("marketdata.cache")  # the cache's log lines keep the logger they always had

# Replaced (random text) after each commit that changes tokens, entitlements, users or
# symbols; every request reads it in its one round trip, so no process trusts its local
# caches past such a change.
EPOCH_KEY = "md:epoch"

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
