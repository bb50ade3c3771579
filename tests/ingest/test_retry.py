"""ingest/retry.py: the waits between tries, and the retry of PostgreSQL and Redis work until it succeeds."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

import psycopg
import pytest
import redis
from django.conf import settings
from django.db import connection

from ingest import retry
from ingest.retry import STORE_BACKOFF, Backoff, retry_until_success


def _dsn() -> str:
    db = settings.DATABASES["default"]
    return f"host={db['HOST']} port={db['PORT']} user={db['USER']} dbname={db['NAME']}"


def _failing(times: int, error: BaseException, result: str = "done") -> tuple[list[float], Callable[[], str]]:
    """A call that raises ``error`` its first ``times`` calls, then returns ``result``; and when it was called."""
    calls: list[float] = []

    def call() -> str:
        calls.append(time.monotonic())
        if len(calls) <= times:
            raise error
        return result

    return calls, call


# -- Backoff ---------------------------------------------------------------------------------


def test_waits_double_from_the_base_up_to_the_cap():
    assert [Backoff(base_s=1.0, cap_s=60.0).delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert [STORE_BACKOFF.delay(n) for n in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_long_outages_retry_count_waits_the_cap_not_an_overflow():
    assert Backoff(base_s=0.05, cap_s=1.0).delay(100_000) == 1.0
    assert Backoff(base_s=0.5, cap_s=30.0, jitter=True).delay(100_000) <= 30.0


def test_equal_jitter_keeps_the_upper_half_of_each_wait_and_spreads_it():
    backoff = Backoff(base_s=0.5, cap_s=8.0, jitter=True)
    rng = random.Random(3)
    for n in range(8):
        ceiling = min(8.0, 0.5 * 2**n)
        delays = [backoff.delay(n, rng=rng) for _ in range(100)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # spread, not one value


def test_jitter_follows_the_random_source_given():
    backoff = Backoff(base_s=0.5, cap_s=30.0, jitter=True)
    first = [backoff.delay(n, rng=random.Random(11)) for n in range(6)]
    assert first == [backoff.delay(n, rng=random.Random(11)) for n in range(6)]


# -- retry_until_success ---------------------------------------------------------------------


def test_a_call_that_succeeds_at_once_is_not_counted_as_retried():
    warnings: list[str] = []
    assert retry_until_success("publish", lambda: 7, closing=lambda: False, warn=warnings.append) == (7, False)
    assert warnings == []


def test_redis_down_is_retried_with_doubling_waits_until_the_call_succeeds():
    warnings: list[str] = []
    calls, call = _failing(3, redis.ConnectionError("Connection refused"))

    result = retry_until_success("publish", call, closing=lambda: False, warn=warnings.append)

    assert result == ("done", True)
    assert warnings == ["retried_publish"] * 3
    waits = [b - a for a, b in itertools.pairwise(calls)]
    assert all(wait >= delay for wait, delay in zip(waits, [0.05, 0.1, 0.2], strict=True))
    assert waits[2] > waits[0] * 2  # doubling, not a fixed pause


def test_an_error_that_is_not_transient_is_raised_at_once():
    warnings: list[str] = []
    calls, call = _failing(1, ValueError("a bad batch"))

    with pytest.raises(ValueError, match="a bad batch"):
        retry_until_success("bars", call, closing=lambda: False, warn=warnings.append)
    assert len(calls) == 1
    assert warnings == []


def test_a_closing_run_gives_up_once_the_failure_outlasts_the_shutdown_limit(monkeypatch):
    monkeypatch.setattr(retry, "SHUTDOWN_RETRY_S", 0.2)
    calls, call = _failing(1_000, redis.TimeoutError("Timeout reading from socket"))

    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        retry_until_success("publish", call, closing=lambda: True, warn=lambda what: None)
    assert 0.2 <= time.monotonic() - started < 5
    assert len(calls) > 1  # it was retried meanwhile


@pytest.mark.django_db(transaction=True)
def test_a_killed_database_session_is_replaced_and_the_call_retried():
    def backend_pid() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0]

    first = backend_pid()
    with psycopg.connect(_dsn(), autocommit=True) as admin:  # as a PostgreSQL restart would
        admin.execute("SELECT pg_terminate_backend(%s)", [first])
    warnings: list[str] = []

    pid, retried = retry_until_success("bars", backend_pid, closing=lambda: False, warn=warnings.append)

    assert retried
    assert pid != first
    assert warnings == ["retried_bars"]
