"""What the credentials of open connections still grant: many tokens, or sessions, at once.

The WebSocket gateway checks its connections again whenever access may have changed
(marketdata.access bumps the access epoch; the gateway also re-checks on a timer, for
changes that send no signal). One query answers for every token the process holds (the
very look-up of marketdata.access, ``tokens_read``), three for every session, so nothing
is paid per connection or per message; what a user may read is ``datasets_allowed``.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from importlib import import_module
from typing import Any, NamedTuple

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from .access import datasets_allowed, tokens_read
from .models import Entitlement


class Grant(NamedTuple):
    """What one credential grants now: its user, and the datasets (None: all)."""

    user_id: int
    datasets: set[str] | None


def tokens_grants(*, hashes: Collection[str], now: datetime | None = None) -> dict[str, Grant]:
    """Each token hash that still authenticates an active user, with what it grants; the others are absent."""
    if not hashes:
        return {}
    rows = tokens_read(hashes=list(hashes), now=now or timezone.now())
    return {key: Grant(row.user.pk, datasets_allowed(row.user)) for key, row in rows.items()}


def user_grant(user: object) -> Grant | None:
    """What a session's user grants now (None: no longer authenticated)."""
    if user is None or not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return None
    return Grant(user.pk, datasets_allowed(user))  # type: ignore[attr-defined]


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
        out[key] = Grant(user.pk, datasets_allowed(user))
    return out
