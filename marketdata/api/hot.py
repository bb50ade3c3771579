"""GET /v1/ohlcv with an API token, served from the event loop without Django's request cycle.

A chart's page is the API's hot request: in Django it cost ~1.3 ms of CPU even when the
answer was a cached body (the middleware chain, DRF's request wrapping, a hop to a worker
thread and back). Here the same functions answer it in the event loop, on what this
process already knows, with the Redis round trip asynchronous:

- the token is read by ``authentication.request_token`` and its user is what
  ``access.user_from_token_remembered`` knows without the database; the principal is
  ``authentication.token_principal``'s;
- the query is validated, the symbol looked up and the entitlement ruled by
  ``marketdata.api.answers``, as the view does;
- one round trip: the rate-limit counters (``ApiRateThrottle.plan``/``decide``), the
  cache epoch and the entries, as the view's;
- a cached answer is sent at once; a miss runs ``answers.ohlcv_answer`` in a worker thread.

Anything else goes to Django unchanged: no token or one not known here, a bad parameter,
an unknown symbol, a dataset not entitled, an epoch change, a rate limit, a client IP over
its failed-authentication limit (read in the same round trip; Django answers the 429),
Redis down, an error. When the counters were already incremented, the view is told
(``COUNTED_KEY``) so it does not count the request twice. The response's headers are
those Django's middleware gave: the first such request of a host and scheme is Django's,
and the headers of its 200 are kept (``_learner``); the request id and the length are
this request's. The request is counted and timed by route like any other. The path is off
where Django's request side would answer differently (``enabled``) and under tracing.
tests/marketdata/api/test_hot_asgi.py sends the same requests through both paths.
"""

from __future__ import annotations

import asyncio
import io
import time
import weakref
from asyncio import AbstractEventLoop, get_running_loop
from types import SimpleNamespace
from typing import Any

import redis
import redis.asyncio
import structlog
from asgiref.sync import sync_to_async
from asgiref.wsgi import WsgiToAsgiInstance
from django.conf import settings
from django.core.handlers.wsgi import WSGIRequest
from django.core.signals import setting_changed
from django.db import close_old_connections
from rest_framework.exceptions import AuthenticationFailed

from marketdata import access
from marketdata.access import datasets_allowed
from marketdata.auth_throttle import auth_wait, auth_window
from marketdata.cache.local import EPOCH_KEY, epoch_note
from marketdata.cache.prefetch import prefetch_pending
from marketdata.cache.redis_client import COUNTED_KEY
from ops import metrics, tracing
from ops.clientip import request_client_ip
from ops.middleware import request_context

from . import serializers as s
from .answers import JSON, cache_read, entitled, known_symbols, ohlcv_answer, ohlcv_hit, ohlcv_slot, validated
from .authentication import request_token, token_principal
from .exceptions import internal_error_body
from .throttling import ApiRateThrottle

log = structlog.get_logger(__name__)

PATH = "/v1/ohlcv"
REDIS_DOWN_PAUSE_S = 1.0
ROUTE = "v1/ohlcv"  # the route label Django's resolver gives MetricsMiddleware
LEARN_KEY = "marketdata.hot.learn"  # in a declined request's scope: the header set its answer teaches
# Headers of Django's answer that belong to one request; the fast path writes its own.
PER_REQUEST = frozenset({b"content-length", b"x-request-id"})
LEARNED_MAX = 256


class OhlcvFastPath:
    """ASGI: GET /v1/ohlcv with a token known to this process served here; everything else by ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._clients: weakref.WeakKeyDictionary[AbstractEventLoop, redis.asyncio.Redis] = weakref.WeakKeyDictionary()
        self._flights: dict[tuple[str, str | None, int], asyncio.Future[bytes]] = {}
        # The headers Django's middleware gave its last 200 answer, per (host, secure).
        self._learned: dict[tuple[str, bool], list[tuple[bytes, bytes]]] = {}
        self._redis_down_until = 0.0
        setting_changed.connect(self._settings_changed, weak=False)

    def _settings_changed(self, **kwargs: Any) -> None:
        self._learned.clear()

    def enabled(self) -> bool:
        """Off where Django's request side would answer a token GET differently from this path.

        CommonMiddleware refuses DISALLOWED_USER_AGENTS and redirects for PREPEND_WWW;
        SecurityMiddleware's HTTPS redirect is checked per request (``_prepare``); the
        spans of tracing come from Django's middleware. tests/marketdata/api/test_hot_asgi.py
        lists the middleware whose request side was checked, and fails when the list changes.
        """
        return not tracing.enabled() and not settings.DISALLOWED_USER_AGENTS and not settings.PREPEND_WWW

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        mine = scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "GET" and self.enabled()
        if mine:
            sent = _SendWatch(send)
            try:
                if await self.serve(scope, sent):
                    return
            except Exception:
                if sent.started:
                    raise
                # A bug here answers as one in Django's path would: the envelope with the request id.
                log.exception("ohlcv fast path failed")
                await _internal_error(scope, send)
                return
        learn = scope.get(LEARN_KEY)
        await self.app(scope, receive, send if learn is None else self._learner(learn, send))

    def _learner(self, key: tuple[str, bool], send: Any) -> Any:
        """``send``, keeping the headers of a 200 answer as this path's for ``key``."""

        async def learning(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", ())]
                if not any(k == b"set-cookie" for k, _ in headers):  # never replay a cookie
                    if len(self._learned) >= LEARNED_MAX:
                        self._learned.clear()
                    self._learned[key] = [(k, v) for k, v in headers if k not in PER_REQUEST]
            await send(message)

        return learning

    def _client(self) -> redis.asyncio.Redis:
        loop = get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=0.25, socket_connect_timeout=0.25)
            self._clients[loop] = client
        return client

    async def serve(self, scope: Any, send: Any) -> bool:
        """Answer the request and return True, or return False (having sent nothing) for Django to answer it."""
        started = time.perf_counter()
        if time.monotonic() < self._redis_down_until:
            return False
        found = self._prepare(scope)
        if found is None:
            return False
        headers, q, symbol, base_url, slot, throttle, checks, failures = found
        try:
            pipe = self._client().pipeline(transaction=False)
            for check in checks:
                pipe.incr(check.key)
                pipe.expire(check.key, check.period + 1)
            if failures is not None:
                pipe.get(failures.key)
            pipe.mget([EPOCH_KEY, *(slot.keys if slot is not None else [])])
            out = await pipe.execute()
        except (redis.RedisError, OSError):
            metrics.CACHE_ERRORS.labels("get").inc()
            # Django's path: counts nothing, reads the database. For a second, leave Redis to it
            # alone: each request would otherwise wait out two connect timeouts, not one.
            self._redis_down_until = time.monotonic() + REDIS_DOWN_PAUSE_S
            return False
        counts, values = out[0 : 2 * len(checks) : 2], out[-1]
        blocked = failures is not None and auth_wait(failures, out[2 * len(checks)]) is not None
        if epoch_note(values[0]) or blocked or not throttle.decide(checks, counts):
            # A token, entitlement or symbol changed somewhere, or a limit: Django decides, not counting again.
            scope[COUNTED_KEY] = counts
            return False
        context = request_context(_headers(scope))
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**context, path=PATH)
        metrics.HTTP_IN_FLIGHT.inc()
        try:
            read = cache_read(slot, values[1:]) if slot is not None else None
            body = read.body if read is not None else None
            if read is not None:
                metrics.CACHE_REQUESTS.labels("miss" if body is None else "hit").inc()
            if body is None:
                try:
                    body = await self._compute(q, symbol, base_url, slot, read)
                except Exception:
                    log.exception("ohlcv fast path failed; Django answers")
                    scope[COUNTED_KEY] = counts
                    return False
            else:
                metrics.API_CACHE.labels("ohlcv", "hit").inc()
                ohlcv_hit(q, symbol, base_url, slot)
            headers = [
                *headers,
                (b"content-length", b"%d" % len(body)),
                (b"x-request-id", context["request_id"].encode("latin-1")),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
        metrics.HTTP_LATENCY.labels(ROUTE).observe(time.perf_counter() - started)
        metrics.HTTP_REQUESTS.labels(ROUTE, "GET", "2xx").inc()
        return True

    async def _compute(self, q: dict[str, Any], symbol: Any, base_url: str, slot: Any, read: Any) -> bytes:
        """The answer from the database, computed once for all the requests of this process that want it at once.

        Requests that missed the same entry at the same version share one computation
        (counted ``coalesced``, not as hits), also a prefetch of it in flight: when a hot
        symbol's page is invalidated, or at a cold start, its readers would otherwise all
        run the same query. What they get is what each would have computed: the version
        they read is the one it was computed at.
        """
        if read is None:  # the hot cache is off: every answer its own query
            return await sync_to_async(_answer, thread_sensitive=False)(q, symbol, base_url, slot, read)
        flight = (slot.stable, slot.clocked, read.version)
        shared = self._flights.get(flight)
        if shared is not None:
            metrics.API_CACHE.labels("ohlcv", "coalesced").inc()
            return await asyncio.shield(shared)
        future: asyncio.Future[bytes] = get_running_loop().create_future()
        self._flights[flight] = future
        try:
            prefetched = await self._prefetched(slot, read)
            if prefetched is not None:
                metrics.API_CACHE.labels("ohlcv", "coalesced").inc()
                body = prefetched
            else:
                metrics.API_CACHE.labels("ohlcv", "miss").inc()
                body = await sync_to_async(_answer, thread_sensitive=False)(q, symbol, base_url, slot, read)
        except BaseException as exc:  # cancelled too: the waiters then go to Django rather than wait forever
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("the shared computation stopped"))
            future.exception()  # retrieved: the waiters (if any) raise it themselves
            raise
        finally:
            del self._flights[flight]
        future.set_result(body)
        return body

    async def _prefetched(self, slot: Any, read: Any) -> bytes | None:
        """The body a prefetch of this entry in flight (cache.prefetch.prefetch) fills at this version, if any."""
        pending = prefetch_pending((slot.stable, slot.clocked))
        if pending is None:
            return None
        got = await asyncio.shield(asyncio.wrap_future(pending))
        return got[1] if got is not None and got[0] == read.version else None

    def _prepare(self, scope: Any) -> tuple[Any, ...] | None:
        """What the view would know before its round trip, if this process knows it without the database."""
        try:
            environ = _ENVIRON.build_environ(scope, io.BytesIO())
            request = WSGIRequest(environ)
            if settings.SECURE_SSL_REDIRECT and not request.is_secure():
                return None  # SecurityMiddleware redirects it
            key = (request.get_host(), request.is_secure())
            if key not in self._learned and _has_token(request):
                # Django answers; the headers its middleware gives a token's 200 are this path's from
                # then on (_learner): none are written here.
                scope[LEARN_KEY] = key
                return None
            found = _token_user(request)
            if found is None:
                return None
            user, auth = found
            s.query_utf8_check(request.META.get("QUERY_STRING", ""))
            items = tuple(sorted((key, value) for key, value in request.GET.items() if value != ""))
            q = validated(s.OhlcvQuery, items)
            symbol = known_symbols.get(q["symbol"])
            if symbol is None:
                return None
            if not access.datasets_known(user):
                return None
            # Not entitled: the view's 404, the unknown symbol's (raised, so Django answers it).
            symbol = entitled(symbol, datasets_allowed(user), ticker=q["symbol"], field="symbol")
            base_url = request.build_absolute_uri(request.path)
            slot = ohlcv_slot(q, symbol, base_url)
            throttle = ApiRateThrottle()
            ident = SimpleNamespace(auth=auth, user=user, META=request.META, headers=request.headers)
            checks = throttle.plan(ident)  # type: ignore[arg-type]
            failures = auth_window(request_client_ip(request))
            headers = self._learned[key]
        except Exception:  # a bad parameter, a host not allowed, ...: Django says what is wrong
            return None
        return headers, q, symbol, base_url, slot, throttle, checks, failures


class _SendWatch:
    """The ASGI send, noting whether the response has started (after which no other answer can be given)."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: dict[str, Any]) -> None:
        self.started = True
        await self.send(message)


async def _internal_error(scope: Any, send: Any) -> None:
    """Send the /v1 500 (marketdata.api.exceptions): the envelope and the request's id, nothing of the failure."""
    bound = structlog.contextvars.get_contextvars()
    rid = bound.get("request_id") if bound.get("path") == PATH else None
    rid = rid or request_context(_headers(scope))["request_id"]
    body = internal_error_body(rid)
    headers = [
        (b"content-type", JSON.encode()),
        (b"content-length", b"%d" % len(body)),
        (b"x-request-id", rid.encode("latin-1")),
    ]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    metrics.HTTP_REQUESTS.labels(ROUTE, "GET", "5xx").inc()


def _headers(scope: Any) -> dict[str, str]:
    return {bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1") for k, v in scope.get("headers", ())}


class _EnvironBuilder(WsgiToAsgiInstance):
    """asgiref's scope -> WSGI environ, the same the Django path gets (nothing else of the instance is used)."""

    def __init__(self) -> None:
        super().__init__(None)

    def build_environ(self, scope: Any, body: Any) -> dict[str, Any]:
        self.scope = scope  # asgiref reads the headers from self.scope
        environ: dict[str, Any] = super().build_environ(scope, body)
        return environ


_ENVIRON = _EnvironBuilder()


def _has_token(request: WSGIRequest) -> bool:
    try:
        return request_token(request) is not None
    except AuthenticationFailed:
        return False


def _token_user(request: WSGIRequest) -> tuple[Any, str] | None:
    """The token's user and principal, as TokenAuthentication gives them, if known here without the database."""
    try:
        token = request_token(request)
    except AuthenticationFailed:
        return None
    if token is None:
        return None
    user = access.user_from_token_remembered(token)
    if user is None or user is access.NOT_REMEMBERED:
        return None  # refused, or the database must be asked: Django's path
    return user, token_principal(token)


def _answer(q: dict[str, Any], symbol: Any, base_url: str, slot: Any, read: Any) -> bytes:
    # As Django's request_started and request_finished do for the thread's database connection.
    close_old_connections()
    try:
        return ohlcv_answer(q, symbol, base_url, slot, read)
    finally:
        close_old_connections()
