"""Symbols' active flag, set in bulk (the admin's action)."""

from __future__ import annotations

from collections.abc import Sequence

from django.db import transaction

from ..cache.local import epoch_bump
from ..models import Symbol


def symbols_set_active(*, symbol_ids: Sequence[int], active: bool) -> int:
    """Activate or deactivate symbols; return how many changed."""
    changed = Symbol.objects.filter(pk__in=list(symbol_ids)).exclude(active=active).update(active=active)
    if changed:
        # update() sends no signal: processes that remember symbols must forget them now.
        transaction.on_commit(epoch_bump)
    return changed
