"""Retention: deleting the bars and trades past their (dataset, schema) policy; saving a policy."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from ops import metrics

from ..cache.versions import versions_bump
from ..models import RetentionPolicy
from ..storage import BAR_TABLE, SCHEMA_TABLES, TRADE_TABLE, policies_sync
from ..timeframes import SCHEMA_TIMEFRAMES
from .bars_trades import check_aware

RETENTION_BARS_SQL = f"""
WITH deleted AS (
    DELETE FROM {BAR_TABLE} b USING marketdata_symbol s
    WHERE b.symbol_id = s.id AND b.timeframe = %(tf)s
      AND b.ts < %(now)s - make_interval(days => COALESCE(
          (SELECT keep_days FROM marketdata_retentionpolicy p WHERE p.dataset = s.dataset AND p.schema = %(schema)s),
          %(default)s))
    RETURNING b.symbol_id
)
SELECT symbol_id, count(*) FROM deleted GROUP BY symbol_id
"""
RETENTION_TRADES_SQL = f"""
WITH deleted AS (
    DELETE FROM {TRADE_TABLE} t USING marketdata_symbol s
    WHERE t.symbol_id = s.id
      AND t.ts_event < %(now)s - make_interval(days => COALESCE(
          (SELECT keep_days FROM marketdata_retentionpolicy p WHERE p.dataset = s.dataset AND p.schema = %(schema)s),
          %(default)s))
    RETURNING t.symbol_id
)
SELECT symbol_id, count(*) FROM deleted GROUP BY symbol_id
"""


def retention_apply(*, now: datetime | None = None) -> dict[str, int]:
    """Delete every bar and trade older than its (dataset, schema) policy; default keep applies elsewhere.

    Each symbol that lost rows has its cache version bumped after the commit, so no cached
    answer keeps showing what was deleted.
    """
    now = now or timezone.now()
    check_aware("now", now)
    deleted: dict[str, int] = {}
    params: dict[str, Any] = {"now": now, "default": settings.MARKETDATA_DEFAULT_RETENTION_DAYS}
    with connection.cursor() as cursor:
        for schema, table in SCHEMA_TABLES.items():
            with transaction.atomic():
                if table == BAR_TABLE:
                    cursor.execute(RETENTION_BARS_SQL, {**params, "schema": schema, "tf": SCHEMA_TIMEFRAMES[schema]})
                else:
                    cursor.execute(RETENTION_TRADES_SQL, {**params, "schema": schema})
                counts = dict(cursor.fetchall())
                if counts:
                    transaction.on_commit(partial(versions_bump, symbol_ids=list(counts)))
            deleted[schema] = sum(counts.values())
            metrics.RETENTION_DELETED.labels(table).inc(deleted[schema])
    return deleted


def retention_policy_save(*, policy: RetentionPolicy) -> dict[str, tuple[int, int]]:
    """Save a retention policy and apply it to the storage (TimescaleDB policies where present)."""
    with transaction.atomic():
        policy.full_clean()
        policy.save()
    return policies_sync()
