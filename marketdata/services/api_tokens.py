"""API tokens: made here, shown once, stored only as their hash."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..models import ApiToken
from ..tokens import token_generate, token_hash
from .bars_trades import check_aware


def api_token_create(*, user: Any, name: str, expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """Create a token for ``user``; return the row and the token itself, which is not stored."""
    if expires_at is not None:
        check_aware("expires_at", expires_at)
    token = token_generate()
    row = ApiToken.objects.create(
        user=user, name=name, prefix=token[:12], key_hash=token_hash(token), expires_at=expires_at
    )
    return row, token
