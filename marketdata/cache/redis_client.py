"""The process's Redis client for the hot cache (short timeouts: the cache is optional), and its one round trip."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import redis
from django.conf import settings

from ops import metrics

_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()
# Rate-limit counts of a request that the event loop's fast path (marketdata.api.hot) has
# already made, handed to the Django view it falls back to: an ASGI scope and WSGI environ
# key that config.asgi copies from one to the other (a client's headers cannot set it).
COUNTED_KEY = "marketdata.counted"


def client() -> redis.Redis:
    """A process-wide client for the configured Redis (short timeouts: the cache is optional).

    Made once under a lock: the gateway's first requests arrive together in many threads,
    and a client made twice is a client dropped, whose finaliser disconnects its pool,
    connections in use by other threads included (a pipeline holds the pool, not the
    client). redis-py then fails those requests with a ValueError from a closed buffer,
    not a RedisError: the one 500 bench/history.py ever showed.
    """
    url = settings.REDIS_URL
    found = _clients.get(url)
    if found is None:
        with _clients_lock:
            found = _clients.get(url)
            if found is None:
                found = _clients[url] = redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
    return found


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
