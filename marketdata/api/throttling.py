"""Rate limits per principal (API token or user) and per client IP, counted in Redis.

DRF's own throttles keep a list of request times in Django's cache: per process with the
default cache, and a list of thousands of entries per request at generous rates. Here each
scope is a fixed-window counter in Redis (one INCR, shared by every gateway process); a
window may let through up to twice the rate across its edge, which is fine for a guard
against runaway clients. When Redis is unreachable, requests are let through: the cache
and the limits are optional, the answers are not.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from marketdata.cache import client
from ops import metrics

KEY = "md:throttle:{scope}:{ident}:{window}"
PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def rate_parse(rate: str) -> tuple[int, int]:
    """'6000/min' -> (6000, 60): requests allowed per window of seconds (DRF's notation)."""
    count, _, period = rate.partition("/")
    return int(count), PERIODS[period.strip()[:1].lower()]


class ApiRateThrottle(BaseThrottle):
    """Both scopes in one Redis round trip; rates come from REST_FRAMEWORK['DEFAULT_THROTTLE_RATES']."""

    def __init__(self) -> None:
        self._wait: float | None = None

    def _principal(self, request: Request) -> str | None:
        if isinstance(request.auth, str) and request.auth.startswith("token:"):
            return request.auth
        user = request.user
        if user is not None and user.is_authenticated:
            return f"user:{user.pk}"
        return None

    def allow_request(self, request: Request, view: Any) -> bool:
        rates = api_settings.DEFAULT_THROTTLE_RATES or {}
        now = time.time()
        checks: list[tuple[str, str, int, int, float]] = []
        for scope, ident in (("principal", self._principal(request)), ("ip", self.get_ident(request))):
            rate = rates.get(scope)
            if not rate or not ident:
                continue
            allowed, period = rate_parse(str(rate))
            window = int(now // period)
            checks.append((scope, KEY.format(scope=scope, ident=ident, window=window), allowed, period,
                           (window + 1) * period - now))  # fmt: skip
        if not checks:
            return True
        try:
            pipe = client().pipeline(transaction=False)
            for _, key, _, period, _ in checks:
                pipe.incr(key)
                pipe.expire(key, period + 1)
            counts = pipe.execute()[0::2]
        except redis.RedisError:
            metrics.CACHE_ERRORS.labels("throttle").inc()
            return True
        waits = []
        for (scope, _, allowed, _, remaining), count in zip(checks, counts, strict=True):
            if count > allowed:
                metrics.API_THROTTLED.labels(scope).inc()
                waits.append(remaining)
        self._wait = max(waits) if waits else None
        return not waits

    def wait(self) -> float | None:
        return None if self._wait is None else max(1, math.ceil(self._wait))
