"""Every API error as ``{"error": {"code", "message", "field"}}`` with the fitting status."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response

from marketdata.access import ERR_UNAUTHENTICATED, NotEntitledError, UnauthenticatedError
from marketdata.api.authentication import WWW_AUTHENTICATE
from marketdata.errors import MarketDataError, UnknownSymbolError, ValidationError

ERR_RATE_LIMITED = "rate limit exceeded; retry in {wait} s"
ERR_NOT_FOUND = "not found"

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


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: domain errors and DRF's own, each in the envelope; anything else is a 500."""
    if isinstance(exc, MarketDataError):
        http = next((s for cls, s in DOMAIN_STATUS if isinstance(exc, cls)), status.HTTP_400_BAD_REQUEST)
        extra = {"WWW-Authenticate": WWW_AUTHENTICATE} if http == status.HTTP_401_UNAUTHORIZED else None
        return Response(envelope(exc.code, exc.message, exc.field), status=http, headers=extra)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(ERR_NOT_FOUND)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return None
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
