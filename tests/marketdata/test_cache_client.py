"""The gateway's process-wide Redis client is made once, however many threads ask first."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from marketdata.cache import local
from marketdata.cache import redis_client as cache_redis

THREADS = 32


@pytest.fixture
def fresh_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No client made yet, and a window for the race: making one takes a millisecond more, and
    the interpreter switches threads as often as it can."""
    monkeypatch.setattr(cache_redis, "_clients", {})
    from_url = redis.Redis.from_url

    def slow_from_url(*args: Any, **kwargs: Any) -> redis.Redis:
        time.sleep(0.001)
        return from_url(*args, **kwargs)

    monkeypatch.setattr(redis.Redis, "from_url", slow_from_url)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        for made in cache_redis._clients.values():
            made.close()


def test_threads_asking_at_once_share_one_client_and_none_loses_its_connection(
    fresh_clients: None, redis_client: redis.Redis
) -> None:
    barrier = threading.Barrier(THREADS)
    made: list[redis.Redis] = []
    errors: list[BaseException] = []

    def first_requests() -> None:
        try:
            barrier.wait(timeout=10)
            mine = cache_redis.client()
            made.append(mine)
            for _ in range(20):  # a request's round trips, while the other threads start theirs
                assert cache_redis.round_trip(get=[local.EPOCH_KEY]) is not None
                assert mine.ping()
        except BaseException as exc:  # every failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=first_requests) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[:3]
    assert len(made) == THREADS
    assert len({id(c) for c in made}) == 1
    assert cache_redis.client() is made[0]
