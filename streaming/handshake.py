"""What a WebSocket handshake says about itself: whether its Origin may connect, and the API token it carries.

Read once per connection by streaming.consumers before it accepts. The Origin is compared
as scheme, host and port (docs/WEBSOCKET.md, "Connecting").
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from django.conf import settings
from django.http.request import split_domain_port, validate_host

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, the default port filled in; None if it is not one."""
    try:
        parts = urlsplit(origin.strip())
        scheme, host, port = parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port out of range or not a number
        return None
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/") or parts.query or parts.username:
        return None
    return _HTTP_SCHEME[scheme], host, port or _DEFAULT_PORTS[scheme]


def own_origin(scope: dict[str, Any]) -> tuple[str, str, int] | None:
    """The gateway's origin as the browser sees it: the request's scheme and its Host (if allowed)."""
    host = _header(scope, b"host")
    if not host:
        return None
    domain, _port = split_domain_port(host)
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return None
    scheme = "wss" if scope.get("scheme") == "wss" or _forwarded_https(scope) else "ws"
    return origin_key(f"{scheme}://{host}")


def _forwarded_https(scope: dict[str, Any]) -> bool:
    """The proxy says the browser spoke TLS (only where SECURE_PROXY_SSL_HEADER trusts it)."""
    trusted = settings.SECURE_PROXY_SSL_HEADER
    if not trusted:
        return False
    header, value = trusted
    name = header.removeprefix("HTTP_").lower().replace("_", "-").encode("latin-1")
    sent = _header(scope, name)
    return sent is not None and sent.split(",", 1)[0].strip() == value


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Browsers send Origin; other clients need not. Scheme, host and port must match an allowed origin."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    allowed = settings.WS_ALLOWED_ORIGINS
    if "*" in allowed:
        return True
    key = origin_key(origin)
    if key is None:
        return False
    return key == own_origin(scope) or key in {origin_key(a) for a in allowed}


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def token_of(scope: dict[str, Any]) -> str | None:
    """An API token from ?token= or Authorization: Token (or Bearer) ..."""
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    if query.get("token"):
        return query["token"][0]
    header = _header(scope, b"authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
    return None
