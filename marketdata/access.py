"""Who may read what: API tokens, anonymous access and per-dataset entitlements.

One place for REST and the WebSocket gateway alike: both resolve a token with
``user_from_token`` and ask ``datasets_allowed`` / ``dataset_check`` before serving data.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from .errors import MarketDataError
from .models import ApiToken, Entitlement
from .tokens import token_hash

# last_used_at is for operators ("is this token still in use?"), not an audit log: one
# write a minute per token keeps a busy client from turning every read into a write.
LAST_USED_EVERY = timedelta(minutes=1)
# A token is random text of a few dozen characters; anything much longer is not one.
TOKEN_MAX_LENGTH = 200

ERR_UNAUTHENTICATED = "authentication required: a session, or an API token (Authorization: Token ... or ?token=)"
ERR_BAD_TOKEN = "invalid, revoked or expired API token"  # noqa: S105 (a message, not a secret)
ERR_NOT_ENTITLED = "not entitled to dataset {dataset!r}"


class UnauthenticatedError(MarketDataError):
    """No acceptable credentials, where anonymous access is off."""

    code = "unauthenticated"


class NotEntitledError(MarketDataError):
    """Credentials are fine, but the user has no entitlement to the dataset."""

    code = "not_entitled"


def user_from_token(token: str) -> Any | None:
    """The active user owning this API token, or None if it is unknown, revoked or expired."""
    if not token or len(token) > TOKEN_MAX_LENGTH:
        return None
    now = timezone.now()
    row = (
        ApiToken.objects.select_related("user")
        .filter(key_hash=token_hash(token), revoked=False)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .first()
    )
    if row is None or not row.user.is_active:
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        # Conditional, so concurrent requests of one token write at most once a minute.
        ApiToken.objects.filter(pk=row.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_EVERY)
        ).update(last_used_at=now)
    return row.user


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


def dataset_check(allowed: set[str] | None, dataset: str) -> None:
    """Raise NotEntitledError unless ``dataset`` is in ``allowed`` (None allows all)."""
    if allowed is not None and dataset not in allowed:
        raise NotEntitledError(ERR_NOT_ENTITLED.format(dataset=dataset), field=None)


def datasets_check(allowed: set[str] | None, datasets: Iterable[str]) -> None:
    """dataset_check for each of ``datasets``, in order."""
    for dataset in datasets:
        dataset_check(allowed, dataset)
