"""Every API error as ``{"error": {"code", "message", "field"}}`` with the fitting status."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
import structlog
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import set_rollback

from marketdata.access import ERR_UNAUTHENTICATED, NotEntitledError, UnauthenticatedError
from marketdata.api.authentication import WWW_AUTHENTICATE
from marketdata.errors import MarketDataError, UnknownSymbolError, ValidationError

ERR_RATE_LIMITED = "rate limit exceeded; retry in {wait} s"
ERR_NOT_FOUND = "not found"
ERR_BAD_REQUEST = "bad request"
ERR_FORBIDDEN = "forbidden"
ERR_INTERNAL = "internal error; quote request id {request_id} when reporting it"
API_PREFIX = "/v1"
JSON = "application/json"
# Django's own logger and message for a request that failed: alerts and dashboards key on them.
request_log = logging.getLogger("django.request")

DOMAIN_STATUS: list[tuple[type[MarketDataError], int]] = [
    (ValidationError, status.HTTP_400_BAD_REQUEST),
    (UnknownSymbolError, status.HTTP_404_NOT_FOUND),
    (UnauthenticatedError, status.HTTP_401_UNAUTHORIZED),
    (NotEntitledError, status.HTTP_403_FORBIDDEN),
]
API_CODES: list[tuple[type[exceptions.APIException], str]] = [
    (exceptions.ValidationError, "invalid"),
    (exceptions.ParseError, "invalid"),
    (exceptions.NotAuthenticated, "unauthenticated"),
    (exceptions.AuthenticationFailed, "unauthenticated"),
    (exceptions.PermissionDenied, "permission_denied"),
    (exceptions.NotFound, "not_found"),
    (exceptions.Throttled, "rate_limited"),
    (exceptions.MethodNotAllowed, "method_not_allowed"),
    (exceptions.NotAcceptable, "not_acceptable"),
]


def envelope(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The error body SPEC section 6 names."""
    return {"error": {"code": code, "message": message, "field": field}}


def _first_error(detail: Any, field: str | None = None) -> tuple[str | None, str]:
    """The first (field, message) of a DRF ValidationError's detail (dict, list or text)."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = None if key == "non_field_errors" else str(key)
            return _first_error(value, name or field)
        return field, "invalid request"
    if isinstance(detail, list):
        return _first_error(detail[0], field) if detail else (field, "invalid request")
    return field, str(detail)


def request_id(request: HttpRequest) -> str:
    """The id ops.middleware bound for this request (and echoes in X-Request-ID), else a fresh one."""
    bound = structlog.contextvars.get_contextvars()
    # A failure before the middleware bound this request must not borrow the thread's previous id.
    if bound.get("path") == request.path and isinstance(bound.get("request_id"), str):
        return str(bound["request_id"])
    return uuid.uuid4().hex


def internal_error_body(rid: str) -> bytes:
    """The body of every /v1 500: the envelope with the request id, no detail of the failure."""
    return orjson.dumps(envelope("internal", ERR_INTERNAL.format(request_id=rid)))


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: every error in the envelope, rendered as JSON whatever the view renders."""
    request = context.get("request")
    response = _api_response(exc, context)
    if request is not None:
        # The schema view renders YAML; its errors are the API's, in JSON.
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = JSON
    return response


def _api_response(exc: Exception, context: dict[str, Any]) -> Response:
    if isinstance(exc, MarketDataError):
        http = next((s for cls, s in DOMAIN_STATUS if isinstance(exc, cls)), status.HTTP_400_BAD_REQUEST)
        extra = {"WWW-Authenticate": WWW_AUTHENTICATE} if http == status.HTTP_401_UNAUTHORIZED else None
        return Response(envelope(exc.code, exc.message, exc.field), status=http, headers=extra)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(ERR_NOT_FOUND)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return _internal_error(exc, context.get("request"))
    headers: dict[str, str] = {}
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        headers["WWW-Authenticate"] = auth_header
    code = next((c for cls, c in API_CODES if isinstance(exc, cls)), str(exc.default_code))
    field: str | None = None
    if isinstance(exc, exceptions.ValidationError):
        field, message = _first_error(exc.detail)
    elif isinstance(exc, exceptions.Throttled):
        wait = getattr(exc, "wait", None) or 1
        headers["Retry-After"] = str(int(wait))
        message = ERR_RATE_LIMITED.format(wait=int(wait))
    elif isinstance(exc, exceptions.NotAuthenticated):
        message = ERR_UNAUTHENTICATED
    else:
        message = str(exc.detail)
    return Response(envelope(code, message, field), status=exc.status_code, headers=headers)


def _internal_error(exc: Exception, request: Any) -> Response:
    """A bug: logged with its traceback as Django logs one, answered without its details."""
    set_rollback()
    rid = request_id(request) if request is not None else uuid.uuid4().hex
    path = request.path if request is not None else "?"
    django_request = getattr(request, "_request", request)  # what Django's own log line carries
    request_log.error(
        "Internal Server Error: %s", path, exc_info=exc, extra={"status_code": 500, "request": django_request}
    )
    response = Response(envelope("internal", ERR_INTERNAL.format(request_id=rid)), status=500)
    response["X-Request-ID"] = rid
    # Django's handler would log the 500 again, without the traceback (django.utils.log.log_response).
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


# Django's error views (config.urls handler400/403/404/500): what fails outside DRF's views, an
# unknown path or a middleware's bug, answers in the envelope under /v1 and as Django does elsewhere.


def _under_api(request: HttpRequest) -> bool:
    return request.path == API_PREFIX or request.path.startswith(API_PREFIX + "/")


def _json(body: dict[str, Any] | bytes, status_code: int) -> HttpResponse:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return HttpResponse(content, status=status_code, content_type=JSON)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _under_api(request):
        return _json(envelope("invalid", ERR_BAD_REQUEST), 400)
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _under_api(request):
        return _json(envelope("permission_denied", ERR_FORBIDDEN), 403)
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _under_api(request):
        return _json(envelope("not_found", ERR_NOT_FOUND), 404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _under_api(request):
        rid = request_id(request)
        response = _json(internal_error_body(rid), 500)
        response["X-Request-ID"] = rid
        return response
    return defaults.server_error(request)
