"""What the credentials of open connections still grant: many tokens, or sessions, at once.

The WebSocket gateway checks its connections again whenever access may have changed
(marketdata.access bumps the access epoch; the gateway also re-checks on a timer, for
changes that send no signal). One query answers for every token the process holds, so
the cost is per distinct token, never per connection or per message. The rules are
marketdata.access's: the same SQL conditions as a token lookup and ``datasets_allowed``.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.db import connection
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from .access import _token_query, datasets_allowed
from .models import Entitlement

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


def sessions_grants(*, keys: Collection[str], now: datetime | None = None) -> dict[str, Grant] | None:
    """Each session key still logged in to an active user, and what it grants (None: sessions not in the database).

    Three queries for any number of sessions (the sessions, their users, the users'
    entitlements), where a look-up per session (Channels' ``get_user``) costs three each.
    The session's rules are get_user's: its row unexpired, its backend one of
    AUTHENTICATION_BACKENDS, and its auth hash the user's current one (a password change
    ends it). A test holds the two equal.
    """
    if settings.SESSION_ENGINE != "django.contrib.sessions.backends.db":
        return None
    if not keys:
        return {}
    now = now or timezone.now()
    store = import_module(settings.SESSION_ENGINE).SessionStore()
    claims: dict[str, tuple[Any, str]] = {}
    for key, data in Session.objects.filter(session_key__in=list(keys), expire_date__gt=now).values_list(
        "session_key", "session_data"
    ):
        decoded = store.decode(data)
        if decoded.get(BACKEND_SESSION_KEY) not in settings.AUTHENTICATION_BACKENDS:
            continue
        try:
            user_id = get_user_model()._meta.pk.to_python(decoded[SESSION_KEY])
        except (KeyError, ValidationError):
            continue
        claims[key] = (user_id, decoded.get(HASH_SESSION_KEY) or "")
    users = {u.pk: u for u in get_user_model()._default_manager.filter(pk__in={c[0] for c in claims.values()})}
    datasets: dict[Any, set[str]] = {pk: set() for pk in users}
    for user_id, dataset in Entitlement.objects.filter(user_id__in=list(users)).values_list("user_id", "dataset"):
        datasets[user_id].add(dataset)
    out: dict[str, Grant] = {}
    for key, (user_id, session_hash) in claims.items():
        user: Any = users.get(user_id)
        if user is None or not user.is_active:
            continue
        if not (session_hash and constant_time_compare(session_hash, user.get_session_auth_hash())):
            continue
        user._marketdata_datasets = datasets[user.pk]
        out[key] = Grant(user.pk, datasets_allowed(user), None)
    return out
