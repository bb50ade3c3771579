"""The client's IP address, one rule for the whole product (throttles, login lockout, socket caps).

The socket's peer is the client unless settings name a proxy header: a client can send any
header it likes, so ``CLIENT_IP_HEADER`` (e.g. ``X-Forwarded-For``) is read only where the
operator says a proxy sets it. Each proxy appends the address it received the request
from, so the client is ``CLIENT_IP_TRUSTED_PROXIES`` entries from the right: whatever the
client wrote to the left of that is ignored. A header that is missing, too short or not an
address gives the peer address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings

Headers = Mapping[str, str] | Iterable[tuple[bytes, bytes]]


def client_ip(remote_addr: str | None, headers: Headers) -> str:
    """The client's address: the configured proxy header's entry, else the socket peer ("" if unknown)."""
    peer = remote_addr or ""
    name = str(getattr(settings, "CLIENT_IP_HEADER", "") or "").strip()
    if not name:
        return peer
    value = _header(headers, name)
    if value is None:
        return peer
    trusted = max(1, int(getattr(settings, "CLIENT_IP_TRUSTED_PROXIES", 1)))
    entries = [entry.strip() for entry in value.split(",")]
    if len(entries) < trusted:
        return peer
    return _address(entries[-trusted]) or peer


def request_client_ip(request: Any) -> str:
    """client_ip of a Django (or DRF) request."""
    return client_ip(request.META.get("REMOTE_ADDR"), request.headers)


def scope_client_ip(scope: Mapping[str, Any]) -> str:
    """client_ip of an ASGI scope (HTTP or WebSocket)."""
    client = scope.get("client")
    peer = str(client[0]) if client else None
    return client_ip(peer, scope.get("headers") or ())


def _header(headers: Headers, name: str) -> str | None:
    """The header's value, repeated lines joined with commas (as proxies treat them); None if absent."""
    lowered = name.lower()
    if isinstance(headers, Mapping):
        direct = headers.get(name)  # Django's HttpHeaders ignores case itself
        if direct is not None:
            return str(direct)
        found = [str(v) for k, v in headers.items() if str(k).lower() == lowered]
    else:
        wanted = lowered.encode("latin-1")
        found = [bytes(v).decode("latin-1") for k, v in headers if bytes(k).lower() == wanted]
    return ",".join(found) if found else None


def _address(entry: str) -> str | None:
    """The entry as a normalised IP address, or None if it is not one ("[v6]:port" and "v4:port" accepted)."""
    text = entry.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
