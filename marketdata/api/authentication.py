"""API tokens for DRF (``Authorization: Token <token>`` or ``?token=``), and their OpenAPI description."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed, Throttled
from rest_framework.request import Request

from marketdata.access import ERR_BAD_TOKEN, user_from_token_cached
from marketdata.auth_throttle import auth_blocked, auth_failed
from marketdata.tokens import token_hash
from ops.clientip import request_client_ip

KEYWORDS = (b"token", b"bearer")
QUERY_PARAM = "token"
WWW_AUTHENTICATE = 'Token realm="api"'


class TokenAuthentication(BaseAuthentication):
    """An API token from the Authorization header or the ``token`` query parameter.

    A token that is given but unknown, revoked or expired is refused (401) rather than
    ignored, so a client with a dead token learns it instead of falling back to anonymous.
    Each refusal counts against the client IP (marketdata.auth_throttle); an IP over
    AUTH_FAILURES_PER_IP is answered 429 for any token, before the token is looked up.
    """

    def authenticate(self, request: Request) -> tuple[Any, str] | None:
        try:
            token = self._token(request)
        except AuthenticationFailed:
            token = ""  # malformed: refused and counted below, as any bad token
        if token is None:
            return None
        ip = request_client_ip(request)
        wait = auth_blocked(ip)
        if wait is not None:
            raise Throttled(wait)
        user = user_from_token_cached(token)
        if user is None:
            auth_failed(ip)
            raise AuthenticationFailed(ERR_BAD_TOKEN)
        return user, token_principal(token)

    def authenticate_header(self, request: Request) -> str:
        return WWW_AUTHENTICATE

    @staticmethod
    def _token(request: Request | HttpRequest) -> str | None:
        return request_token(request)


def request_token(request: Request | HttpRequest) -> str | None:
    """The API token a request carries (Authorization: Token or Bearer, else ?token=), or None.

    A malformed Authorization header raises AuthenticationFailed. The event loop's fast
    path (marketdata.api.hot) reads the token with this too.
    """
    parts = get_authorization_header(request).split()  # type: ignore[arg-type]  # it reads META, as any request has
    if parts and parts[0].lower() in KEYWORDS:
        if len(parts) != 2:
            raise AuthenticationFailed(ERR_BAD_TOKEN)
        try:
            return parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise AuthenticationFailed(ERR_BAD_TOKEN) from None
    value = request.GET.get(QUERY_PARAM)
    return value or None


def token_principal(token: str) -> str:
    """``request.auth`` of a token: it names the token (by hash) so throttling can count per token."""
    return "token:" + token_hash(token)[:32]


class TokenAuthenticationScheme(OpenApiAuthenticationExtension):
    """Describe both ways of passing a token in the OpenAPI document."""

    target_class = "marketdata.api.authentication.TokenAuthentication"
    name = ["tokenHeader", "tokenQuery"]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        return [{name: []} for name in self.name]  # either one, not both

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, str]]:
        return [
            {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "`Token <token>` (an API token from the admin).",
            },
            {"type": "apiKey", "in": "query", "name": QUERY_PARAM, "description": "The API token itself."},
        ]
