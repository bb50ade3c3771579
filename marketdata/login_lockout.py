"""Login lockout for /login/ and /admin/login/: django-axes, counting in Redis, failing open.

Axes counts wrong passwords per (client IP, username) in the "axes" cache (Redis, shared by
every gateway process, so the gateway's database role needs no write to axes' tables) and,
past AXES_FAILURE_LIMIT, refuses that pair for AXES_COOLOFF_TIME, each further try
starting the cool-off again. A wrong password also counts as a failed authentication of
its IP (marketdata.auth_throttle), so one IP trying a few passwords on many usernames is
stopped at AUTH_FAILURES_PER_IP, as bad API tokens are. The client IP is ops.clientip's.
"""

from __future__ import annotations

import math
from typing import Any

import redis
from axes.backends import AxesStandaloneBackend
from axes.exceptions import AxesBackendPermissionDenied
from axes.handlers.cache import AxesCacheHandler
from axes.helpers import get_cool_off
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from ops.clientip import request_client_ip

from .auth_throttle import auth_blocked, auth_failed, redis_down

LOCKOUT_STATUS = 429
LOCKOUT_TEMPLATE = "login.html"


class LoginLockoutBackend(AxesStandaloneBackend):
    """Axes' backend (refuses a locked-out pair before the password is checked), for HTTP logins only.

    Without a request there is no client to lock out: the test client's ``login()``,
    ``createsuperuser``, a shell. Axes' own backend raises there. An IP over its
    failed-authentication limit is refused whatever the username, and answered as a
    locked-out pair is (AxesMiddleware, lockout_response) with that limit's Retry-After.
    """

    def authenticate(
        self, request: HttpRequest | None, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> None:
        if request is None:
            return None
        wait = auth_blocked(request_client_ip(request))
        if wait is not None:
            request.axes_locked_out = True  # type: ignore[attr-defined]
            request.auth_retry_after = wait  # type: ignore[attr-defined]
            raise AxesBackendPermissionDenied("too many failed authentications from this IP")
        return super().authenticate(request, username, password, **kwargs)


class LoginAttempts(AxesCacheHandler):
    """Axes' cache handler that lets logins through (logged) when Redis is unreachable, rather than answer 500.

    Its cache is axes' own client: its failures do not pause the failed-authentication limit's.
    """

    def get_failures(self, request: Any, credentials: dict[str, Any] | None = None) -> int:
        try:
            return super().get_failures(request, credentials)
        except redis.RedisError as exc:
            redis_down(exc, pause=False)
            return 0

    def user_login_failed(self, sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
        try:
            super().user_login_failed(sender, credentials, request, **kwargs)
        except redis.RedisError as exc:
            redis_down(exc, pause=False)
        if request is not None:
            auth_failed(request.axes_ip_address)

    def user_logged_in(self, sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
        try:
            super().user_logged_in(sender, request, user, **kwargs)
        except redis.RedisError as exc:
            redis_down(exc, pause=False)


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: dict[str, Any] | None = None
) -> HttpResponse:
    """The login page saying the account is locked for now: 429 with Retry-After (AXES_LOCKOUT_CALLABLE)."""
    cool_off = get_cool_off(request)
    seconds: int | None = getattr(request, "auth_retry_after", None)  # the IP's limit, else the pair's cool-off
    if seconds is None and cool_off:
        seconds = max(1, math.ceil(cool_off.total_seconds()))
    context = {
        "form": AuthenticationForm(request),
        "locked_out": True,
        "retry_minutes": None if seconds is None else max(1, math.ceil(seconds / 60)),
        "next": request.POST.get("next", "") if request.method == "POST" else "",
    }
    response = render(request, LOCKOUT_TEMPLATE, context, status=LOCKOUT_STATUS)
    if seconds is not None:
        response["Retry-After"] = str(seconds)
    return response
