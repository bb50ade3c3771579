"""Failed authentication counted per client IP in Redis, shared by every gateway process.

REST (a bad, revoked or expired API token) and the WebSocket gateway (a bad token or JWT)
count a failure with ``auth_failed``; before they look a credential up they ask
``auth_blocked``, and an IP with ``AUTH_FAILURES_PER_IP`` failures in the current window
is refused (429 with ``Retry-After``, or close 4029) without touching the database. The
counter is a fixed window (one INCR with an expiry), as the API's rate limits are.

The round trip of ``auth_blocked`` also reads the cache epoch (marketdata.cache): a change
to tokens, users or entitlements made in another process then empties this process's
token look-ups, the remembered refusals included, before the look-up that follows.

When Redis is unreachable the check lets requests through (logged, at most every
WARN_EVERY_S): the limit is a guard, the answers are not optional. For DOWN_PAUSE_S after
a failure these functions do not try that Redis again, so an outage costs a request one
connect timeout (the view's own round trip), not two.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from asyncio import AbstractEventLoop, get_running_loop
from typing import Any, NamedTuple

import redis
import redis.asyncio
import structlog
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ops import metrics

from .cache.local import EPOCH_KEY, epoch_note
from .cache.redis_client import client

log = structlog.get_logger(__name__)

KEY = "md:authfail:{ip}:{window}"
PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
WARN_EVERY_S = 10.0
DOWN_PAUSE_S = 1.0
ERR_RATE = "rate {rate!r}: give '<count>/<s|min|hour|day>' (e.g. '20/min'), or '' for no limit"


class Window(NamedTuple):
    """An IP's failure counter now: its key, the failures allowed, the window (s) and what is left of it."""

    key: str
    allowed: int
    period: int
    remaining: float


def rate_parse(rate: str) -> tuple[int, int]:
    """'20/min' -> (20, 60): the count allowed per window of seconds (DRF's notation)."""
    count, _, period = rate.partition("/")
    try:
        return int(count), PERIODS[period.strip()[:1].lower()]
    except (KeyError, ValueError):
        raise ValueError(ERR_RATE.format(rate=rate)) from None


def rates_check() -> None:
    """Refuse to start (ImproperlyConfigured) on a rate the limits could not read, naming its setting.

    Read at each request instead, a mistyped rate would answer every request 500.
    """
    from rest_framework.settings import api_settings

    rates: dict[str, object] = {"AUTH_FAILURES_PER_IP": getattr(settings, "AUTH_FAILURES_PER_IP", "")}
    for scope, rate in (api_settings.DEFAULT_THROTTLE_RATES or {}).items():
        rates[f"REST_FRAMEWORK['DEFAULT_THROTTLE_RATES'][{scope!r}]"] = rate
    for name, value in rates.items():
        if value and str(value).strip():
            try:
                rate_parse(str(value))
            except ValueError as exc:
                raise ImproperlyConfigured(f"{name}: {exc}") from None


def auth_window(ip: str, now: float | None = None) -> Window | None:
    """This IP's counter now, or None when AUTH_FAILURES_PER_IP is off."""
    rate = str(getattr(settings, "AUTH_FAILURES_PER_IP", "") or "").strip()
    if not rate:
        return None
    allowed, period = rate_parse(rate)
    now = time.time() if now is None else now
    window = int(now // period)
    return Window(KEY.format(ip=ip, window=window), allowed, period, (window + 1) * period - now)


def auth_wait(window: Window | None, count: Any) -> int | None:
    """Seconds to wait (Retry-After) if ``count`` failures reach the window's allowance, else None."""
    if window is None or count is None or int(count) < window.allowed:
        return None
    return max(1, math.ceil(window.remaining))


def auth_blocked(ip: str) -> int | None:
    """Seconds this IP must wait before authenticating again, or None if it may (also when Redis is down)."""
    if _paused():
        return None
    window = auth_window(ip)
    keys = [EPOCH_KEY] + ([window.key] if window is not None else [])
    try:
        values = client().mget(keys)
    except redis.RedisError as exc:
        redis_down(exc)
        return None
    return _decide(window, values)


def auth_failed(ip: str) -> None:
    """Count one failed authentication from this IP."""
    window = auth_window(ip)
    if window is None or _paused():
        return
    try:
        pipe = client().pipeline(transaction=False)
        pipe.incr(window.key)
        pipe.expire(window.key, window.period + 1)
        pipe.execute()
    except redis.RedisError as exc:
        redis_down(exc)


async def aauth_blocked(ip: str) -> int | None:
    """auth_blocked, with the event loop's asyncio Redis client."""
    if _paused():
        return None
    window = auth_window(ip)
    keys = [EPOCH_KEY] + ([window.key] if window is not None else [])
    try:
        values = await _aclient().mget(keys)
    except (redis.RedisError, OSError) as exc:
        redis_down(exc)
        return None
    return _decide(window, values)


async def aauth_failed(ip: str) -> None:
    """auth_failed, with the event loop's asyncio Redis client."""
    window = auth_window(ip)
    if window is None or _paused():
        return
    try:
        pipe = _aclient().pipeline(transaction=False)
        pipe.incr(window.key)
        pipe.expire(window.key, window.period + 1)
        await pipe.execute()
    except (redis.RedisError, OSError) as exc:
        redis_down(exc)


def _decide(window: Window | None, values: list[Any]) -> int | None:
    epoch_note(values[0])
    wait = auth_wait(window, values[1] if window is not None else None)
    if wait is not None:
        metrics.API_THROTTLED.labels("auth").inc()
    return wait


_aclients: weakref.WeakKeyDictionary[AbstractEventLoop, dict[str, redis.asyncio.Redis]] = weakref.WeakKeyDictionary()


def _aclient() -> redis.asyncio.Redis:
    # One per event loop (an asyncio client is bound to the loop it first ran in) and URL.
    per_loop = _aclients.setdefault(get_running_loop(), {})
    url = settings.REDIS_URL
    found = per_loop.get(url)
    if found is None:
        found = per_loop[url] = redis.asyncio.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
    return found


_warned_at = 0.0
_warn_lock = threading.Lock()
_down_until: dict[str, float] = {}  # per Redis URL


def _paused() -> bool:
    return time.monotonic() < _down_until.get(settings.REDIS_URL, 0.0)


def redis_down(exc: BaseException, *, pause: bool = True) -> None:
    """Count a Redis failure of these limits (paused for DOWN_PAUSE_S if ``pause``); log at most every WARN_EVERY_S."""
    global _warned_at
    metrics.CACHE_ERRORS.labels("auth_throttle").inc()
    now = time.monotonic()
    if pause:
        _down_until[settings.REDIS_URL] = now + DOWN_PAUSE_S
    with _warn_lock:
        if now - _warned_at < WARN_EVERY_S:
            return
        _warned_at = now
    log.warning("failed-authentication limit not checked: Redis unreachable", error=str(exc))
