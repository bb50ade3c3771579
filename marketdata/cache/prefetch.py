"""Background fills of the hot-cache entry a reader will likely ask for next, after a miss."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import structlog
from django.conf import settings
from django.db import close_old_connections
from prometheus_client import Counter

from ops import metrics

log = structlog.get_logger("marketdata.cache")  # the cache's log lines keep the logger they always had

# After a miss, the entry the same reader will likely want next (a chart scrolls back: the
# page before the one it just loaded) is filled in the background by the function that
# fills misses, under the version read before its query, like any entry. At most
# PREFETCH_IN_FLIGHT run at once per process, in threads of their own; one more is dropped,
# not queued (a burst of misses would otherwise queue work nobody waits for behind it).
# A prefetch schedules none itself; the first request that reads a prefetched entry
# schedules the next (a chart scrolling back keeps finding its pages). They are not lookups: cache_requests_total and
# api_cache_answers_total do not count them; cache_prefetches_total does, by outcome.

PREFETCH_IN_FLIGHT = 4
PREFETCHES = Counter(
    "cache_prefetches_total",
    "Background fills of the hot-cache entry likely asked for next, by outcome: filled, cached (already held), "
    "busy (a fill of it in flight), dropped (too many in flight), unavailable (Redis down), failed.",
    ["outcome"],
    registry=metrics.REGISTRY,
)
_prefetch_lock = threading.Lock()
_prefetch_pool: ThreadPoolExecutor | None = None
# What is being filled now, by key: real misses (a count) and prefetches (their future).
_filling: dict[Hashable, int] = {}
_prefetching: dict[Hashable, Future[Any]] = {}
_in_prefetch = threading.local()
# Prefetched entries no request has read yet: the first that does schedules the next prefetch.
_unread: set[Hashable] = set()
UNREAD_MAX = 10_000


def prefetch_enabled() -> bool:
    """Prefetches are on: the hot cache and API_HOT_CACHE_PREFETCH (default on)."""
    return bool(getattr(settings, "API_HOT_CACHE", True)) and bool(getattr(settings, "API_HOT_CACHE_PREFETCH", True))


@contextmanager
def filling(key: Hashable) -> Iterator[None]:
    """Note a fill of ``key`` (a miss being computed) for its duration: no prefetch of it starts meanwhile."""
    with _prefetch_lock:
        _filling[key] = _filling.get(key, 0) + 1
    try:
        yield
    finally:
        with _prefetch_lock:
            left = _filling.pop(key) - 1
            if left:
                _filling[key] = left


def prefetch(key: Hashable, fill: Callable[[], str]) -> Future[Any] | None:
    """Run ``fill`` in the background unless ``key`` is being filled or PREFETCH_IN_FLIGHT prefetches are running.

    Never waits. ``fill`` returns its outcome (a PREFETCHES label) and may return the body
    it stored as ``(outcome, (version, body))``; its errors are logged and swallowed. None
    when nothing was started (off, from a prefetch, busy, dropped).
    """
    global _prefetch_pool
    if getattr(_in_prefetch, "active", False) or not prefetch_enabled():
        return None
    with _prefetch_lock:
        if key in _filling or key in _prefetching:
            outcome = "busy"
        elif len(_prefetching) >= PREFETCH_IN_FLIGHT:
            outcome = "dropped"
        else:
            if _prefetch_pool is None:
                _prefetch_pool = ThreadPoolExecutor(PREFETCH_IN_FLIGHT, thread_name_prefix="cache-prefetch")
            future = _prefetching[key] = _prefetch_pool.submit(_prefetch_run, key, fill)
            return future
    PREFETCHES.labels(outcome).inc()
    return None


def _prefetch_run(key: Hashable, fill: Callable[[], Any]) -> Any:
    _in_prefetch.active = True
    # As Django's request_started and request_finished do for the thread's database connection.
    close_old_connections()
    result: Any = None
    try:
        outcome = fill()
        if isinstance(outcome, tuple):
            outcome, result = outcome
        PREFETCHES.labels(outcome).inc()
    except Exception:
        PREFETCHES.labels("failed").inc()
        log.exception("cache prefetch failed", key=str(key))
    finally:
        close_old_connections()
        _in_prefetch.active = False
        with _prefetch_lock:
            del _prefetching[key]
    return result


def prefetched_note(key: Hashable) -> None:
    """Note an entry a prefetch filled, until a request reads it (``prefetched_take``)."""
    with _prefetch_lock:
        if len(_unread) >= UNREAD_MAX:
            _unread.clear()
        _unread.add(key)


def prefetched_take(key: Hashable) -> bool:
    """True (once) when ``key`` is a prefetched entry no request of this process has read yet."""
    if key not in _unread:
        return False
    with _prefetch_lock:
        try:
            _unread.remove(key)
        except KeyError:
            return False
    return True


def prefetch_pending(key: Hashable) -> Future[Any] | None:
    """The prefetch of ``key`` in flight, if any: its result is ``(version, body)`` once filled, else None."""
    return _prefetching.get(key)


def prefetches_wait(timeout: float = 10.0) -> bool:
    """Wait until no prefetch is in flight; False if some still are after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while _prefetching:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True
