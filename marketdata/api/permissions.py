"""Who may call the API at all; per-dataset entitlements are checked by the views (marketdata.access)."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from marketdata.access import ERR_UNAUTHENTICATED, anonymous_allowed


class HasApiAccess(BasePermission):
    """Authenticated users, and anonymous ones only where settings.STREAMING_ALLOW_ANONYMOUS is on."""

    message = ERR_UNAUTHENTICATED

    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.is_authenticated) or anonymous_allowed()
