"""Who may read what: API tokens, anonymous access and per-dataset entitlements.

One place for REST and the WebSocket gateway alike: both resolve a token with
``user_from_token`` and ask ``datasets_allowed`` / ``dataset_check`` before serving data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Model, Q
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from .cache import local as local_cache
from .cache.local import LocalCache, epoch_bump, local_caches_clear
from .errors import MarketDataError
from .models import ApiToken, Entitlement, Symbol
from .tokens import token_hash

# last_used_at is for operators ("is this token still in use?"), not an audit log: one
# write a minute per token keeps a busy client from turning every read into a write.
LAST_USED_EVERY = timedelta(minutes=1)
# A token is random text of a few dozen characters; anything much longer is not one.
TOKEN_MAX_LENGTH = 200
# What access decisions read of a token's user; the rest is loaded only on demand.
USER_FIELDS = ("id", "username", "is_active", "is_staff", "is_superuser")

ERR_UNAUTHENTICATED = "authentication required: a session, or an API token (Authorization: Token ... or ?token=)"
ERR_BAD_TOKEN = "invalid, revoked or expired API token"  # noqa: S105 (a message, not a secret)
ERR_NOT_ENTITLED = "not entitled to dataset {dataset!r}"


class UnauthenticatedError(MarketDataError):
    """No acceptable credentials, where anonymous access is off."""

    code = "unauthenticated"


class NotEntitledError(MarketDataError):
    """Credentials are fine, but the user has no entitlement to the dataset."""

    code = "not_entitled"


# One round trip for the token, its user and the user's entitlements: this runs on every
# token-authenticated request, and three ORM queries cost ~3 ms where this costs ~0.3.
# Also every token an open WebSocket holds, all at once (marketdata.grants): hence ANY.
_API_KEY_LOOKUP_SQL = """
SELECT t.key_hash, t.id, t.last_used_at, t.expires_at, {fields},
       ARRAY(SELECT e.dataset FROM marketdata_entitlement e WHERE e.user_id = u.id)
FROM marketdata_apitoken t JOIN {users} u ON u.id = t.user_id
WHERE t.key_hash = ANY(%s) AND NOT t.revoked AND (t.expires_at IS NULL OR t.expires_at > %s)
"""


@lru_cache(maxsize=1)
def _token_query() -> tuple[str, list[str]]:
    """The statement and its user columns, in the model's field order (which Model.from_db expects)."""
    meta = get_user_model()._meta
    fields = [f.attname for f in meta.concrete_fields if f.attname in USER_FIELDS]
    return _API_KEY_LOOKUP_SQL.format(fields=", ".join(f"u.{f}" for f in fields), users=meta.db_table), fields


@dataclass(frozen=True, slots=True)
class _Resolved:
    """A token's user as the database gave it, and what decides how long that holds."""

    user: Any
    expires_at: datetime | None
    last_used_at: datetime


_resolved: LocalCache[str, _Resolved] = LocalCache()

# A token the database refused (unknown, revoked, expired, its user inactive) is remembered
# this long, so a client retrying a dead token or guessing costs no query after the first.
# It never refuses a token made good later: an ORM save empties it in this process at once
# (the signals below) and, through the cache epoch that is read before every look-up
# (auth_throttle.auth_blocked), in every other process; a change made without the ORM
# (update(), SQL) and no epoch bump holds off a token for at most this long.
REFUSED_TTL_S = 60.0


class _Refusals(LocalCache[str, bool]):
    """A LocalCache of refused token hashes whose entries live REFUSED_TTL_S (off with the other local caches)."""

    def put(self, key: str, value: bool, *, generation: int) -> None:
        if float(getattr(settings, "API_LOCAL_CACHE_SECONDS", local_cache.LOCAL_TTL_S)) <= 0:
            return
        if generation != self._generation:
            return
        if len(self._items) >= self.maxsize:
            self._items.clear()
        self._items[key] = (local_cache._now() + REFUSED_TTL_S, value)


_refused = _Refusals(maxsize=10_000)


def user_from_token(token: str) -> Any | None:
    """The active user owning this API token, or None if it is unknown, revoked or expired."""
    resolved = _token_resolve(token)
    return None if resolved is None else resolved.user


def user_from_token_cached(token: str) -> Any | None:
    """user_from_token, remembered in this process for a few seconds (the API's hot path).

    What may end a token's use is seen at once in every process when it is saved through
    the ORM (the signals below replace the cache epoch that every API request reads), and
    otherwise (a queryset update, SQL) within API_LOCAL_CACHE_SECONDS. Expiry is checked
    on each use. The user object is shared by the requests that use it: read it, never
    change it.
    """
    remembered = user_from_token_remembered(token)
    if remembered is not NOT_REMEMBERED:
        return remembered
    key = token_hash(token)
    generation, refused_generation = _resolved.generation(), _refused.generation()
    resolved = _token_resolve(token, now=timezone.now())
    if resolved is None:
        _refused.put(key, True, generation=refused_generation)
        return None
    _resolved.put(key, resolved, generation=generation)
    return resolved.user


NOT_REMEMBERED = object()  # user_from_token_remembered: this process must ask the database


def user_from_token_remembered(token: str) -> Any:
    """What user_from_token_cached answers without a query: the user, None (refused), or NOT_REMEMBERED.

    The event loop of the WebSocket gateway asks this first, so a token it knows costs no
    hop to the database thread, where a flood of other clients' look-ups may be waiting.
    """
    if not token or len(token) > TOKEN_MAX_LENGTH:
        return None
    key = token_hash(token)
    now = timezone.now()
    hit = _resolved.get(key)
    if (
        hit is not None
        and (hit.expires_at is None or hit.expires_at > now)
        and now - hit.last_used_at < LAST_USED_EVERY
    ):
        return hit.user
    if _refused.get(key):
        return None
    return NOT_REMEMBERED


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A token that still authenticates: its row's id and times, and its active user (entitlements loaded)."""

    token_id: int
    last_used_at: datetime | None
    expires_at: datetime | None
    user: Any


def tokens_read(*, hashes: list[str], now: datetime) -> dict[str, TokenRow]:
    """The tokens of these hashes that are neither revoked nor expired and whose user is active, in one query."""
    sql, fields = _token_query()
    with connection.cursor() as cursor:
        cursor.execute(sql, [hashes, now])
        rows = cursor.fetchall()
    out: dict[str, TokenRow] = {}
    for key_hash, token_id, last_used_at, expires_at, *user_values, datasets in rows:
        # The other user fields are deferred: loaded only if something reads them.
        user: Any = get_user_model().from_db(connection.alias, fields, user_values)
        if user.is_active:
            user._marketdata_datasets = set(datasets)
            out[key_hash] = TokenRow(token_id, last_used_at, expires_at, user)
    return out


def _token_resolve(token: str, now: datetime | None = None) -> _Resolved | None:
    if not token or len(token) > TOKEN_MAX_LENGTH:
        return None
    now = now or timezone.now()
    key = token_hash(token)
    row = tokens_read(hashes=[key], now=now).get(key)
    if row is None:
        return None
    last_used_at = row.last_used_at
    if last_used_at is None or now - last_used_at >= LAST_USED_EVERY:
        # Conditional, so concurrent requests of one token write at most once a minute.
        ApiToken.objects.filter(pk=row.token_id).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_EVERY)
        ).update(last_used_at=now)
        last_used_at = now
    return _Resolved(row.user, row.expires_at, last_used_at)


def _access_changed(sender: type[Model], **kwargs: Any) -> None:
    # Now for this process (its own later reads), and after the commit for every process:
    # an epoch replaced before the commit could be read, and the old rows cached again.
    local_caches_clear()
    transaction.on_commit(epoch_bump)


for _model in (ApiToken, Entitlement, Symbol, get_user_model()):
    post_save.connect(_access_changed, sender=_model, dispatch_uid=f"marketdata.access.{_model.__name__}.save")
    post_delete.connect(_access_changed, sender=_model, dispatch_uid=f"marketdata.access.{_model.__name__}.delete")


def anonymous_allowed() -> bool:
    """Whether requests without credentials are served (the local demo; never production)."""
    return bool(settings.STREAMING_ALLOW_ANONYMOUS)


def datasets_allowed(user: Any | None) -> set[str] | None:
    """Datasets this user may read; None means all of them.

    Staff and superusers see all; anonymous users see all where anonymous access is on and
    nothing otherwise; everyone else sees the datasets of their Entitlement rows.
    """
    if user is None or not user.is_authenticated:
        return None if anonymous_allowed() else set()
    if not user.is_active:
        return set()
    if user.is_staff or user.is_superuser:
        return None
    cached: set[str] | None = getattr(user, "_marketdata_datasets", None)
    if cached is None:
        cached = set(Entitlement.objects.filter(user_id=user.pk).values_list("dataset", flat=True))
        # Kept on the user object, which lives for one request or one connection.
        user._marketdata_datasets = cached
    return cached


def datasets_known(user: Any | None) -> bool:
    """Whether datasets_allowed(user) answers without a query (its entitlements came with the user)."""
    if user is None or not user.is_authenticated or not user.is_active or user.is_staff or user.is_superuser:
        return True
    return getattr(user, "_marketdata_datasets", None) is not None


def dataset_check(allowed: set[str] | None, dataset: str) -> None:
    """Raise NotEntitledError unless ``dataset`` is in ``allowed`` (None allows all)."""
    if allowed is not None and dataset not in allowed:
        raise NotEntitledError(ERR_NOT_ENTITLED.format(dataset=dataset), field=None)
