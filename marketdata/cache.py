"""The Redis hot cache: versioned keys, so a read never returns data older than the database.

Every writer bumps a symbol's version after its commit; readers build keys from the
version they read first, so an entry made before a write is simply never read again
(and expires). When Redis is unreachable, reads go to the database and stay correct.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis
import structlog
from django.conf import settings

from ops import metrics

log = structlog.get_logger(__name__)

VERSION_KEY = "md:ver:{symbol_id}"
ENTRY_KEY = "md:cache:{symbol_id}:{version}:{what}"
ENTRY_TTL_S = 300
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


def cached_get(*, symbol_id: int, what: str) -> tuple[bytes | None, str | None]:
    """The cached value for ``what`` at the symbol's current version, and the key to store under."""
    try:
        r = client()
        version = int(r.get(VERSION_KEY.format(symbol_id=symbol_id)) or 0)
        key = ENTRY_KEY.format(symbol_id=symbol_id, version=version, what=what)
        value = r.get(key)
    except redis.RedisError:
        metrics.CACHE_ERRORS.labels("get").inc()
        return None, None
    metrics.CACHE_REQUESTS.labels("hit" if value is not None else "miss").inc()
    return value, key  # type: ignore[return-value]


def cached_set(*, key: str | None, value: bytes) -> None:
    """Store a computed value under the key cached_get gave (no-op when Redis was down)."""
    if key is None:
        return
    try:
        client().set(key, value, ex=ENTRY_TTL_S)
    except redis.RedisError:
        metrics.CACHE_ERRORS.labels("set").inc()
