"""Failed authentication throttled per client IP (issue 17, finding 4), against the real Redis and PostgreSQL.

After AUTH_FAILURES_PER_IP bad tokens from one IP, that IP's token requests are refused
with 429, Retry-After and the JSON envelope before any database look-up, from Django's
path and the event loop's fast path alike; other IPs are not; a spoofed X-Forwarded-For
counts only where a proxy header is configured; a bad token repeated costs no query.
"""

from __future__ import annotations

import asyncio

import pytest
from django.test import override_settings

from marketdata import auth_throttle
from marketdata.auth_throttle import aauth_blocked, aauth_failed, auth_blocked, auth_failed, rate_parse

CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture(autouse=True)
def _clean_redis(redis_client):
    """Every test starts with no failure counted (the fixture flushes the test Redis database)."""
    return redis_client


def test_rate_parse():
    assert rate_parse("20/min") == (20, 60)
    assert rate_parse("5/s") == (5, 1)
    assert rate_parse("100/hour") == (100, 3600)
    with pytest.raises(ValueError, match="rate 'twenty'"):
        rate_parse("twenty")


@override_settings(AUTH_FAILURES_PER_IP="3/min")
def test_blocked_after_the_allowed_failures_for_the_rest_of_the_window(redis_client):
    for _ in range(3):
        assert auth_blocked("198.51.100.1") is None
        auth_failed("198.51.100.1")
    wait = auth_blocked("198.51.100.1")
    assert wait is not None
    assert 1 <= wait <= 60
    assert auth_blocked("198.51.100.2") is None  # per IP
    # Counted in Redis under a prefix the tests can clean, with an expiry.
    keys = redis_client.keys("md:authfail:*")
    assert len(keys) == 1
    assert 0 < redis_client.ttl(keys[0]) <= 61


@override_settings(AUTH_FAILURES_PER_IP="2/min")
def test_async_twins_share_the_counter():
    async def run() -> tuple[int | None, int | None]:
        await aauth_failed("198.51.100.3")
        before = await aauth_blocked("198.51.100.3")
        auth_failed("198.51.100.3")  # another process (sync) counts into the same key
        return before, await aauth_blocked("198.51.100.3")

    before, after = asyncio.run(run())
    assert before is None
    assert after is not None
    assert auth_blocked("198.51.100.3") is not None


@override_settings(AUTH_FAILURES_PER_IP="")
def test_no_limit_when_the_setting_is_empty():
    for _ in range(50):
        auth_failed("198.51.100.4")
    assert auth_blocked("198.51.100.4") is None


@override_settings(AUTH_FAILURES_PER_IP="1/min")
def test_redis_down_fails_open():
    auth_failed("198.51.100.5")
    assert auth_blocked("198.51.100.5") is not None
    auth_throttle._warned_at = 0.0
    with override_settings(REDIS_URL=CLOSED_PORT_REDIS):
        auth_failed("198.51.100.5")  # no exception
        assert auth_blocked("198.51.100.5") is None
        assert asyncio.run(aauth_blocked("198.51.100.5")) is None
        asyncio.run(aauth_failed("198.51.100.5"))
