"""Login lockout on /login/ and /admin/login/ (issue 17, finding 4): real POSTs, real Redis, real PostgreSQL.

django-axes counts wrong passwords per (client IP, username) in Redis; at AXES_FAILURE_LIMIT
the pair is locked for AXES_COOLOFF_TIME: 429 with Retry-After and the login page saying
so, the right password refused too. Another IP, or another username, is not affected. An
IP trying many usernames is stopped at AUTH_FAILURES_PER_IP, as bad API tokens are.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import SESSION_KEY
from django.contrib.auth.models import User
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"
LIMIT = 3
CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"
LOCKED_TEXT = b"Too many failed logins"


@pytest.fixture(autouse=True)
def _limits(settings, redis_client):
    """A small failure limit; no attempts left over from other tests (the fixture flushes the test Redis)."""
    settings.AXES_FAILURE_LIMIT = LIMIT
    return redis_client


@pytest.fixture
def trader() -> User:
    return User.objects.create_user("trader", password=PASSWORD)


@pytest.fixture
def admin_user() -> User:
    return User.objects.create_user("boss", password=PASSWORD, is_staff=True, is_superuser=True)


def login(path: str, username: str, password: str, ip: str, browser: Client | None = None, **extra: Any) -> Any:
    """POST a login form as a browser at ``ip`` would (the test client skips CSRF checks)."""
    browser = browser or Client()
    return browser.post(path, {"username": username, "password": password}, REMOTE_ADDR=ip, **extra)


def assert_locked(response: Any) -> None:
    assert response.status_code == 429
    assert int(response["Retry-After"]) == 15 * 60
    assert LOCKED_TEXT in response.content
    assert b'name="password"' in response.content  # the login page itself, to try again later


@pytest.mark.parametrize("path", ["/login/", "/admin/login/"])
def test_locked_after_the_limit_of_wrong_passwords_then_even_the_right_one_is_refused(trader, admin_user, path):
    username = "boss" if path.startswith("/admin") else "trader"
    for _ in range(LIMIT - 1):
        response = login(path, username, "wrong", "198.51.100.30")
        assert response.status_code == 200
        assert LOCKED_TEXT not in response.content
    assert_locked(login(path, username, "wrong", "198.51.100.30"))
    browser = Client()
    assert_locked(login(path, username, PASSWORD, "198.51.100.30", browser))
    assert SESSION_KEY not in browser.session


def test_another_ip_logs_in_with_the_right_password(trader):
    for _ in range(LIMIT):
        login("/login/", "trader", "wrong", "198.51.100.31")
    browser = Client()
    response = login("/login/", "trader", PASSWORD, "198.51.100.32", browser)
    assert response.status_code == 302
    assert browser.session[SESSION_KEY] == str(trader.pk)


def test_the_admin_still_works_for_a_good_login(admin_user):
    for _ in range(LIMIT):
        login("/admin/login/", "boss", "wrong", "198.51.100.33")
    browser = Client()
    response = login("/admin/login/", "boss", PASSWORD, "198.51.100.34", browser)
    assert response.status_code == 302
    assert browser.get("/admin/", REMOTE_ADDR="198.51.100.34").status_code == 200


def test_the_lock_is_per_ip_and_username(trader):
    User.objects.create_user("other", password=PASSWORD)
    for _ in range(LIMIT):
        login("/login/", "trader", "wrong", "198.51.100.35")
    assert login("/login/", "other", PASSWORD, "198.51.100.35").status_code == 302


def test_a_good_login_before_the_limit_starts_the_count_again(trader):
    for _ in range(LIMIT - 1):
        login("/login/", "trader", "wrong", "198.51.100.36")
    assert login("/login/", "trader", PASSWORD, "198.51.100.36").status_code == 302
    for _ in range(LIMIT - 1):
        assert login("/login/", "trader", "wrong", "198.51.100.36").status_code == 200


def test_a_spoofed_forwarded_for_does_not_escape_the_lock(trader):
    for i in range(LIMIT):
        login("/login/", "trader", "wrong", "198.51.100.37", HTTP_X_FORWARDED_FOR=f"203.0.113.{i}")
    assert_locked(login("/login/", "trader", PASSWORD, "198.51.100.37", HTTP_X_FORWARDED_FOR="203.0.113.99"))


def test_behind_a_configured_proxy_the_forwarded_client_is_locked_not_the_proxy(trader, settings):
    settings.CLIENT_IP_HEADER = "X-Forwarded-For"
    for _ in range(LIMIT):
        login("/login/", "trader", "wrong", "10.0.0.2", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.40")
    assert_locked(login("/login/", "trader", PASSWORD, "10.0.0.2", HTTP_X_FORWARDED_FOR="203.0.113.40"))
    # Another client behind the same proxy logs in.
    assert login("/login/", "trader", PASSWORD, "10.0.0.2", HTTP_X_FORWARDED_FOR="203.0.113.41").status_code == 302


def test_one_ip_trying_many_usernames_is_stopped_at_its_failed_authentication_limit(trader, settings):
    settings.AUTH_FAILURES_PER_IP = "4/min"
    for i in range(4):
        User.objects.create_user(f"user{i}", password=PASSWORD)
        assert login("/login/", f"user{i}", "wrong", "198.51.100.50").status_code == 200
    browser = Client()
    response = login("/login/", "trader", PASSWORD, "198.51.100.50", browser)
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 60  # the IP's window, not the pair's cool-off
    assert LOCKED_TEXT in response.content
    assert SESSION_KEY not in browser.session
    assert login("/login/", "trader", PASSWORD, "198.51.100.51").status_code == 302


def test_with_redis_down_logins_still_work(trader, settings):
    caches = {**settings.CACHES, "axes": {**settings.CACHES["axes"], "LOCATION": CLOSED_PORT_REDIS}}
    # AXES_HANDLER after CACHES: axes makes its handler again, on the unreachable cache.
    with override_settings(CACHES=caches, AXES_HANDLER=settings.AXES_HANDLER):
        assert login("/login/", "trader", "wrong", "198.51.100.38").status_code == 200
        assert login("/login/", "trader", PASSWORD, "198.51.100.38").status_code == 302
    # The axes cache's outage did not switch off the per-IP limit, whose Redis is up.
    settings.AUTH_FAILURES_PER_IP = "1/min"
    assert login("/login/", "trader", "wrong", "198.51.100.39").status_code == 200
    assert login("/login/", "trader", PASSWORD, "198.51.100.39").status_code == 429
