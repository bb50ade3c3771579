"""Bind a request id and the W3C trace id to every log line of a request."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest
from django.http.response import HttpResponseBase as HttpResponse

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def request_context(headers: dict[str, str]) -> dict[str, str]:
    """Derive the log context (request id, trace id) from incoming headers."""
    candidate = headers.get("x-request-id", "")
    context = {"request_id": candidate if _REQUEST_ID_RE.match(candidate) else uuid.uuid4().hex}
    match = _TRACEPARENT_RE.match(headers.get("traceparent", ""))
    if match and match.group(1) != "0" * 32:
        context["trace_id"] = match.group(1)
        context["parent_span_id"] = match.group(2)
    return context


def websocket_bind(scope: dict[str, Any]) -> dict[str, str]:
    """Bind a WebSocket connection's log context (request id, trace id, path) from its handshake; return it.

    Call it in the connection's own task before it starts others: asyncio tasks copy the
    context when they are created, so they carry it for the connection's lifetime.
    """
    headers = {bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1") for k, v in scope.get("headers", ())}
    context = {**request_context(headers), "path": str(scope.get("path", ""))}
    structlog.contextvars.bind_contextvars(**context)
    return context


class _SyncAndAsync:
    """Django middleware that runs in whichever mode its chain runs, never forcing a thread hop."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)  # type: ignore[type-var]  # the instance is the callable Django awaits


class RequestContextMiddleware(_SyncAndAsync):
    """Bind request context for the duration of a request and echo the request id."""

    def _bind(self, request: HttpRequest) -> dict[str, str]:
        headers = {k.lower(): v for k, v in request.headers.items()}
        context = request_context(headers)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**context, path=request.path)
        return context

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self.__acall__(request)
        context = self._bind(request)
        response = self.get_response(request)
        assert isinstance(response, HttpResponse)  # any response: plain, streaming, file
        response[REQUEST_ID_HEADER] = context["request_id"]
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        context = self._bind(request)
        response = await self.get_response(request)  # type: ignore[misc]
        response[REQUEST_ID_HEADER] = context["request_id"]
        return response


class MetricsMiddleware(_SyncAndAsync):
    """Count requests and time them by route pattern (not raw path: bounded labels); serve /metrics.

    Async-capable like RequestContextMiddleware: a sync-only middleware under ASGI makes
    Django hop between the event loop and a thread several times per request (measured
    at ~3 ms a request, more than the rest of a cached /v1/ohlcv answer).

    ``/metrics`` (and anything on METRICS_PORT) is answered here, before the host check
    and the HTTPS redirect of the middleware below (``ops.views.metrics_port_answer``).
    """

    @staticmethod
    def _observe(request: HttpRequest, response: HttpResponse, started: float, route: str | None = None) -> None:
        from . import metrics

        match = getattr(request, "resolver_match", None)
        route = route or (match.route if match is not None and match.route else "unmatched")
        metrics.HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)
        metrics.HTTP_REQUESTS.labels(route, request.method, f"{response.status_code // 100}xx").inc()

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self.__acall__(request)
        from .metrics import HTTP_IN_FLIGHT
        from .views import metrics_port_answer

        started = time.perf_counter()
        HTTP_IN_FLIGHT.inc()
        try:
            answer = metrics_port_answer(request)
            response = answer if answer is not None else self.get_response(request)
        finally:
            HTTP_IN_FLIGHT.dec()
        assert isinstance(response, HttpResponse)
        self._observe(request, response, started, "metrics" if answer is not None else None)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        from .metrics import HTTP_IN_FLIGHT
        from .views import metrics_port_answer

        started = time.perf_counter()
        HTTP_IN_FLIGHT.inc()
        try:
            answer = metrics_port_answer(request)
            response = answer if answer is not None else await self.get_response(request)  # type: ignore[misc]
        finally:
            HTTP_IN_FLIGHT.dec()
        self._observe(request, response, started, "metrics" if answer is not None else None)
        return response
