"""Rate limits per principal (API token or user) and per client IP, counted in Redis.

DRF's own throttles keep a list of request times in Django's cache: per process with the
default cache, and a list of thousands of entries per request at generous rates. Here each
scope is a fixed-window counter in Redis (one INCR, shared by every gateway process); a
window may let through up to twice the rate across its edge, which is fine for a guard
against runaway clients. When Redis is unreachable, requests are let through: the cache
and the limits are optional, the answers are not. The client IP is ops.clientip's, the
product's one rule (a proxy header only where CLIENT_IP_HEADER names one).
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import redis
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from marketdata.auth_throttle import rate_parse
from marketdata.cache.redis_client import client
from ops import metrics
from ops.clientip import request_client_ip

KEY = "md:throttle:{scope}:{ident}:{window}"


class Check(NamedTuple):
    """One scope's counter for this request: its key, allowance, window and the seconds left in the window."""

    scope: str
    key: str
    allowed: int
    period: int
    remaining: float


class ApiRateThrottle(BaseThrottle):
    """Both scopes in one Redis round trip; rates come from REST_FRAMEWORK['DEFAULT_THROTTLE_RATES'].

    The /v1 views put the counters into the round trip that also reads the cache
    (``plan`` then ``decide``); used alone, as DRF's throttle, it makes its own.
    """

    def __init__(self) -> None:
        self._wait: float | None = None

    def _principal(self, request: Request) -> str | None:
        if isinstance(request.auth, str) and request.auth.startswith("token:"):
            return request.auth
        user = request.user
        if user is not None and user.is_authenticated:
            return f"user:{user.pk}"
        return None

    def get_ident(self, request: Request) -> str:
        return request_client_ip(request)

    def plan(self, request: Request) -> list[Check]:
        """The counters this request increments (none when both rates are off)."""
        rates = api_settings.DEFAULT_THROTTLE_RATES or {}
        now = time.time()
        checks: list[Check] = []
        for scope in ("principal", "ip"):
            rate = rates.get(scope)
            if not rate:
                continue
            ident = self._principal(request) if scope == "principal" else self.get_ident(request)
            if not ident:
                continue
            allowed, period = rate_parse(str(rate))
            window = int(now // period)
            key = KEY.format(scope=scope, ident=ident, window=window)
            checks.append(Check(scope, key, allowed, period, (window + 1) * period - now))
        return checks

    def decide(self, checks: list[Check], counts: list[int] | None) -> bool:
        """Whether the request may go on, given the counters' new values (None: Redis was down, let it through)."""
        if counts is None:
            return True
        waits = []
        for check, count in zip(checks, counts, strict=True):
            if count > check.allowed:
                metrics.API_THROTTLED.labels(check.scope).inc()
                waits.append(check.remaining)
        self._wait = max(waits) if waits else None
        return not waits

    def allow_request(self, request: Request, view: Any) -> bool:
        checks = self.plan(request)
        if not checks:
            return True
        try:
            pipe = client().pipeline(transaction=False)
            for check in checks:
                pipe.incr(check.key)
                pipe.expire(check.key, check.period + 1)
            counts = pipe.execute()[0::2]
        except redis.RedisError:
            metrics.CACHE_ERRORS.labels("throttle").inc()
            return True
        return self.decide(checks, counts)

    def wait(self) -> float | None:
        return None if self._wait is None else max(1, math.ceil(self._wait))
