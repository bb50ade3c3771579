"""What the credentials of open connections still grant: many tokens in one query.

The WebSocket gateway checks its connections again whenever access may have changed
(marketdata.access bumps the access epoch; the gateway also re-checks on a timer, for
changes that send no signal). One query answers for every token the process holds, so
the cost is per distinct token, never per connection or per message. The rules are
marketdata.access's: the same SQL conditions as a token lookup and ``datasets_allowed``.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone

from .access import _token_query, datasets_allowed

_TOKENS_SQL = """
SELECT t.key_hash, t.expires_at, {fields},
       ARRAY(SELECT e.dataset FROM marketdata_entitlement e WHERE e.user_id = u.id)
FROM marketdata_apitoken t JOIN {users} u ON u.id = t.user_id
WHERE t.key_hash = ANY(%s) AND NOT t.revoked AND (t.expires_at IS NULL OR t.expires_at > %s)
"""


class Grant:
    """What one credential grants now: its user id, datasets (None: all) and expiry."""

    __slots__ = ("datasets", "expires_at", "user_id")

    def __init__(self, user_id: int, datasets: set[str] | None, expires_at: datetime | None) -> None:
        self.user_id = user_id
        self.datasets = datasets
        self.expires_at = expires_at


def tokens_grants(*, hashes: Collection[str], now: datetime | None = None) -> dict[str, Grant]:
    """Each token hash that still authenticates an active user, with what it grants; the others are absent."""
    if not hashes:
        return {}
    now = now or timezone.now()
    _, fields = _token_query()
    meta = get_user_model()._meta
    sql = _TOKENS_SQL.format(fields=", ".join(f"u.{f}" for f in fields), users=meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(sql, [list(hashes), now])
        rows = cursor.fetchall()
    out: dict[str, Grant] = {}
    for key_hash, expires_at, *user_values, datasets in rows:
        user: Any = get_user_model().from_db(connection.alias, fields, user_values)
        if not user.is_active:
            continue
        user._marketdata_datasets = set(datasets)
        out[key_hash] = Grant(user.pk, datasets_allowed(user), expires_at)
    return out


def user_grant(user: object) -> Grant | None:
    """What a session's user grants now (None: no longer authenticated)."""
    if user is None or not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return None
    return Grant(user.pk, datasets_allowed(user), None)  # type: ignore[attr-defined]
