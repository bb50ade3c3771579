"""Failed authentication throttled per client IP (issue 17, finding 4), against the real Redis and PostgreSQL.

After AUTH_FAILURES_PER_IP bad tokens from one IP, that IP's token requests are refused
with 429, Retry-After and the JSON envelope before any database look-up, from Django's
path and the event loop's fast path alike; other IPs are not; a spoofed X-Forwarded-For
counts only where a proxy header is configured; a bad token repeated costs no query.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import orjson
import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from marketdata import access, auth_throttle
from marketdata.api.exceptions import ERR_RATE_LIMITED
from marketdata.auth_throttle import aauth_blocked, aauth_failed, auth_blocked, auth_failed, rate_parse
from marketdata.cache import local
from marketdata.cache.local import EPOCH_KEY, local_caches_clear
from marketdata.models import ApiToken, Entitlement
from marketdata.services.api_tokens import api_token_create
from marketdata.tokens import token_hash
from ops import metrics
from tests.marketdata.api.test_hot_asgi import Started, call

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
    errors = metrics.CACHE_ERRORS.labels("auth_throttle")
    with override_settings(REDIS_URL=CLOSED_PORT_REDIS):
        auth_throttle._down_until.clear()
        before = errors._value.get()
        assert auth_blocked("198.51.100.5") is None  # no exception
        assert errors._value.get() == before + 1
        # Paused: the next calls do not wait on that Redis again.
        auth_failed("198.51.100.5")
        assert auth_blocked("198.51.100.5") is None
        assert asyncio.run(aauth_blocked("198.51.100.5")) is None
        asyncio.run(aauth_failed("198.51.100.5"))
        assert errors._value.get() == before + 1
        # After the pause: tried (and refused) again.
        auth_throttle._down_until.clear()
        assert asyncio.run(aauth_blocked("198.51.100.5")) is None
        assert errors._value.get() == before + 2
    # The working Redis was never paused: the IP is still blocked there.
    assert auth_blocked("198.51.100.5") is not None


# REST: Django's path (DRF) and the event loop's fast path (config.asgi)

BAD = "mdg_" + "x" * 43  # a well-formed token that no row holds
URL = "/v1/ohlcv?symbol=AAPL"


@pytest.fixture
def entitled(db, make_symbol):
    """A symbol, and a user entitled to its dataset with a good token."""
    symbol = make_symbol("AAPL")
    user = User.objects.create_user("trader")
    Entitlement.objects.create(user=user, dataset=symbol.dataset)
    return api_token_create(user=user, name="test")[1]


def get(token: str, ip: str, **extra: Any) -> Any:
    """GET /v1/ohlcv with a token from a client address, through Django's test client (the DRF path)."""
    local_caches_clear()  # no process-local look-up decides; the negative cache has tests of its own
    return Client().get(URL, HTTP_AUTHORIZATION=f"Token {token}", REMOTE_ADDR=ip, **extra)


def assert_rate_limited(response: Any) -> None:
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 60
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "rate_limited"
    assert error["message"] == ERR_RATE_LIMITED.format(wait=int(response["Retry-After"]))


@override_settings(AUTH_FAILURES_PER_IP="3/min")
def test_bad_tokens_from_one_ip_end_in_429_before_any_database_query(entitled):
    for _ in range(3):
        assert get(BAD, "198.51.100.10").status_code == 401
    with CaptureQueriesContext(connection) as queries:
        refused = get(BAD + "y", "198.51.100.10")  # another bad token: not a remembered refusal
    assert_rate_limited(refused)
    assert len(queries) == 0
    # The IP is refused whatever token it sends, a good one included: no oracle while blocked.
    assert_rate_limited(get(entitled, "198.51.100.10"))
    # Another IP is not affected.
    assert get(entitled, "198.51.100.11").status_code == 200
    assert get(BAD, "198.51.100.11").status_code == 401


@override_settings(AUTH_FAILURES_PER_IP="3/min")
@pytest.mark.parametrize("how", ["revoked", "expired", "malformed", "query parameter"])
def test_every_kind_of_bad_token_counts(entitled, how):
    user = User.objects.get(username="trader")
    row, token = api_token_create(user=user, name=how)
    if how == "revoked":
        ApiToken.objects.filter(pk=row.pk).update(revoked=True)
    elif how == "expired":
        ApiToken.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    for _ in range(3):
        if how == "malformed":
            response = Client().get(URL, HTTP_AUTHORIZATION="Token a b", REMOTE_ADDR="198.51.100.12")
        elif how == "query parameter":
            response = Client().get(URL + "&token=" + BAD, REMOTE_ADDR="198.51.100.12")
        else:
            response = get(token, "198.51.100.12")
        assert response.status_code == 401
    assert_rate_limited(get(entitled, "198.51.100.12"))


@override_settings(AUTH_FAILURES_PER_IP="3/min")
def test_a_spoofed_forwarded_for_is_ignored_unless_a_proxy_header_is_configured(entitled):
    # No proxy header configured: the peer is the client, whatever it writes.
    for i in range(3):
        assert get(BAD, "198.51.100.13", HTTP_X_FORWARDED_FOR=f"203.0.113.{i}").status_code == 401
    assert_rate_limited(get(entitled, "198.51.100.13", HTTP_X_FORWARDED_FOR="203.0.113.99"))
    with override_settings(CLIENT_IP_HEADER="X-Forwarded-For", CLIENT_IP_TRUSTED_PROXIES=1):
        # Behind one proxy (the peer): the client is the proxy's entry, its own left entries ignored.
        for i in range(3):
            spoofed = f"203.0.113.{i}, 192.0.2.7"
            assert get(BAD, "198.51.100.13", HTTP_X_FORWARDED_FOR=spoofed).status_code == 401
        assert_rate_limited(get(entitled, "198.51.100.13", HTTP_X_FORWARDED_FOR="203.0.113.50, 192.0.2.7"))
        # Another client behind the same proxy is not affected.
        assert get(entitled, "198.51.100.13", HTTP_X_FORWARDED_FOR="192.0.2.8").status_code == 200


# A bad token costs no database query twice (a per-process, bounded, short-lived refusal cache)


def fresh_get(token: str, ip: str = "198.51.100.20") -> Any:
    """GET /v1/ohlcv with a token, keeping what this process remembers (unlike get())."""
    return Client().get(URL, HTTP_AUTHORIZATION=f"Token {token}", REMOTE_ADDR=ip)


@pytest.fixture
def no_limit(settings):
    settings.AUTH_FAILURES_PER_IP = ""
    local_caches_clear()


def test_a_repeated_bad_token_costs_no_query(entitled, no_limit):
    with CaptureQueriesContext(connection) as first:
        assert fresh_get(BAD).status_code == 401
    assert len(first) >= 1  # the look-up
    with CaptureQueriesContext(connection) as second:
        response = fresh_get(BAD, ip="198.51.100.21")
    assert response.status_code == 401
    assert orjson.loads(response.content)["error"]["code"] == "unauthenticated"
    assert len(second) == 0, [q["sql"] for q in second.captured_queries]


def test_a_token_created_after_its_refusal_is_accepted_at_once(entitled, no_limit):
    assert fresh_get(BAD).status_code == 401
    user = User.objects.get(username="trader")
    # Saved through the ORM in this process: the signal empties the refusals.
    ApiToken.objects.create(user=user, name="late", prefix=BAD[:12], key_hash=token_hash(BAD))
    assert fresh_get(BAD).status_code == 200


def test_a_token_created_by_another_process_is_accepted_after_its_epoch_bump(entitled, no_limit, redis_client):
    late = BAD + "z"
    assert fresh_get(late).status_code == 401
    user = User.objects.get(username="trader")
    # No signal here (bulk_create, as SQL or another process would); that process bumps the epoch.
    ApiToken.objects.bulk_create([ApiToken(user=user, name="late", prefix=late[:12], key_hash=token_hash(late))])
    assert fresh_get(late).status_code == 401  # still remembered: nothing said it changed
    redis_client.set(EPOCH_KEY, "another process changed access")
    assert fresh_get(late).status_code == 200


def test_refusals_are_bounded_and_expire(entitled, no_limit, monkeypatch):
    assert access._refused.maxsize <= 100_000
    assert fresh_get(BAD).status_code == 401
    with CaptureQueriesContext(connection) as remembered:
        fresh_get(BAD)
    assert len(remembered) == 0
    now = time.monotonic()
    monkeypatch.setattr(local, "_now", lambda: now + access.REFUSED_TTL_S + 1)
    with CaptureQueriesContext(connection) as expired:
        assert fresh_get(BAD).status_code == 401
    assert len(expired) >= 1


# The gateway's ASGI application: the event loop's fast path answers a known token without Django


def gateway_get(token: str, ip: str) -> tuple[int, dict[str, str], bytes]:
    """GET /v1/ohlcv through config.asgi's application (admission, the fast path, Django), from a client address."""
    from config.asgi import application

    return call(application, "symbol=AAPL&tf=1m", token=token, client=ip)


@pytest.mark.django_db(transaction=True)
@override_settings(AUTH_FAILURES_PER_IP="3/min")
def test_the_fast_path_refuses_a_blocked_ip_as_django_does(entitled):
    from config.asgi import http_app

    http_app._redis_down_until = 0.0
    assert gateway_get(entitled, "198.51.100.40")[0] == 200  # Django; the token is known here now
    with Started() as django:
        assert gateway_get(entitled, "198.51.100.41")[0] == 200
    assert django.count == 0  # answered in the event loop
    for _ in range(3):
        assert gateway_get(BAD, "198.51.100.41")[0] == 401
    with Started() as django:
        status, headers, body = gateway_get(entitled, "198.51.100.41")
        other = gateway_get(entitled, "198.51.100.42")
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 60
    assert orjson.loads(body)["error"]["code"] == "rate_limited"
    assert django.count == 1  # the fast path declined the blocked IP; the other IP was answered in the loop
    assert other[0] == 200


@pytest.mark.parametrize(
    ("variable", "named"),
    [("AUTH_FAILURES_PER_IP", "AUTH_FAILURES_PER_IP"), ("API_THROTTLE_IP", "DEFAULT_THROTTLE_RATES']['ip']")],
)
def test_a_mistyped_rate_stops_the_process_at_start_naming_its_setting(variable, named):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent.parent
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", variable: "20 per minute"}
    done = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("django.core.exceptions.ImproperlyConfigured:"), done.stderr[-2000:]
    assert named in last
    assert "'20 per minute'" in last
