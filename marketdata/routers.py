"""Reads from a PostgreSQL replica when one is configured; writes, the admin, auth and sessions on the primary.

Installed by the settings only when ``DATABASE_REPLICA_URL`` is set (alias ``replica``);
without it every query goes to ``default`` and this module is not used. A replica lags
its primary, so whatever must read its own writes stays on the primary:

- the ``admin``, ``auth``, ``contenttypes`` and ``sessions`` apps (a login, a session, a
  permission, an admin log entry read on a replica would be missing right after it is made);
- every read inside a transaction on the primary (it is reading what it is about to write);
- every read of a request pinned by :class:`PrimaryPinMiddleware`: the admin pages and any
  request that is not GET, HEAD or OPTIONS.

Raw SQL through ``django.db.connection`` is not routed: it runs on ``default``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest
from django.http.response import HttpResponseBase as HttpResponse

from ops.middleware import _SyncAndAsync

REPLICA_DB_ALIAS = "replica"
PRIMARY_APPS = frozenset({"admin", "auth", "contenttypes", "sessions"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ADMIN_PREFIX = "/admin/"  # where config.urls mounts the admin

_pinned: ContextVar[bool] = ContextVar("marketdata_primary_pinned", default=False)


@contextmanager
def primary() -> Iterator[None]:
    """Send every read in this block (this thread or task) to the primary."""
    token = _pinned.set(True)
    try:
        yield
    finally:
        _pinned.reset(token)


class PrimaryReplicaRouter:
    """Route ORM reads to ``replica`` unless they must see the primary; everything else to ``default``."""

    def __init__(self) -> None:
        self.has_replica = REPLICA_DB_ALIAS in settings.DATABASES

    def db_for_read(self, model: type[Any], **hints: Any) -> str:
        if (
            not self.has_replica
            or model._meta.app_label in PRIMARY_APPS
            or _pinned.get()
            or connections[DEFAULT_DB_ALIAS].in_atomic_block
        ):
            return DEFAULT_DB_ALIAS
        return REPLICA_DB_ALIAS

    def db_for_write(self, model: type[Any], **hints: Any) -> str:
        return DEFAULT_DB_ALIAS

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        # The replica holds the same rows as the primary: an object read from one may
        # refer to an object read from the other.
        aliases = {DEFAULT_DB_ALIAS, REPLICA_DB_ALIAS}
        if obj1._state.db in aliases and obj2._state.db in aliases:
            return True
        return None

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None, **hints: Any) -> bool | None:
        # No opinion: `migrate` only touches the alias it is given (default), and a
        # streaming replica refuses writes anyway. A test database standing in for a
        # replica needs the same tables, which is what migrating it gives.
        return None


class PrimaryPinMiddleware(_SyncAndAsync):
    """Pin the reads of admin pages and of unsafe requests to the primary (see the module docstring)."""

    def _pins(self, request: HttpRequest) -> bool:
        return request.method not in SAFE_METHODS or request.path.startswith(ADMIN_PREFIX)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self.__acall__(request)
        if not self._pins(request):
            response = self.get_response(request)
            assert isinstance(response, HttpResponse)
            return response
        with primary():
            response = self.get_response(request)
        assert isinstance(response, HttpResponse)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        if not self._pins(request):
            return await self.get_response(request)  # type: ignore[misc]
        with primary():
            return await self.get_response(request)  # type: ignore[misc]
