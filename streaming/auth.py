"""The Django session and user of a WebSocket connection, read once when it opens.

Channels' AuthMiddlewareStack does the same but also wraps ``send`` to save a modified
session: a check on every frame the gateway sends, which profiled at 6-10% of a busy
gateway's time (bench/fanout.py). The gateway never modifies a session, so this reads
the cookie, the session and the user once (Channels' own ``get_user``, which checks the
session's auth hash) and passes ``send`` through untouched.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from channels.auth import get_user
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.cookie import parse_cookie


class SessionUserMiddleware:
    """Sets ``scope["cookies"]``, ``scope["session"]`` and ``scope["user"]``; nothing per message."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        cookies: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                cookies = parse_cookie(bytes(value).decode("latin-1"))
                break
        scope = dict(scope, cookies=cookies)
        session_key = cookies.get(settings.SESSION_COOKIE_NAME)
        if session_key:
            scope["session"] = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
            scope["user"] = await get_user(scope)
        else:  # no cookie, no session: nothing to read
            scope["session"] = import_module(settings.SESSION_ENGINE).SessionStore(None)
            scope["user"] = AnonymousUser()
        return await self.inner(scope, receive, send)
