"""Retention: removing the bars, trades and quotes past their (dataset, schema) policy; saving a policy."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from ops import metrics

from ..cache.versions import versions_bump
from ..models import RetentionPolicy
from ..storage import (
    BAR_TABLE,
    QUOTE_TABLE,
    RETENTION_DROP,
    SCHEMA_TABLES,
    TRADE_TABLE,
    default_keep_days,
    policies_sync,
    table_policies,
    timescaledb_enabled,
)
from ..timeframes import QUOTE_SCHEMAS, SCHEMA_TIMEFRAMES
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
RETENTION_QUOTES_SQL = f"""
WITH deleted AS (
    DELETE FROM {QUOTE_TABLE} q USING marketdata_symbol s
    WHERE q.symbol_id = s.id AND q.schema = %(code)s
      AND q.ts_recv < %(now)s - make_interval(days => COALESCE(
          (SELECT keep_days FROM marketdata_retentionpolicy p WHERE p.dataset = s.dataset AND p.schema = %(schema)s),
          %(default)s))
    RETURNING q.symbol_id
)
SELECT symbol_id, count(*) FROM deleted GROUP BY symbol_id
"""

RETENTION_DROP_CALL = f"SELECT hypertable, symbol_id, timeframe, dropped FROM {RETENTION_DROP}(%s, %s, %s)"


def retention_apply(*, now: datetime | None = None) -> dict[str, int]:
    """Delete every bar, trade and quote older than its (dataset, schema) policy; default keep applies elsewhere
    (MARKETDATA_DEFAULT_QUOTE_RETENTION_DAYS for quotes, MARKETDATA_DEFAULT_RETENTION_DAYS for the rest).

    On TimescaleDB the chunks wholly past their hypertable's longest window are dropped
    first, whole (storage.RETENTION_DROP_SQL); then, on both paths, rows are deleted. Each
    symbol that lost rows either way has its cache version bumped after the commit, so no
    cached answer (a page, a leaderboard row) keeps showing what retention removed.
    Returns the rows removed per schema.
    """
    now = now or timezone.now()
    check_aware("now", now)
    deleted = dict.fromkeys(SCHEMA_TABLES, 0)
    params: dict[str, Any] = {"now": now}
    with connection.cursor() as cursor:
        if timescaledb_enabled():
            for schema, count in _chunks_drop(cursor, now).items():
                deleted[schema] += count
        for schema, table in SCHEMA_TABLES.items():
            with transaction.atomic():
                values = {**params, "schema": schema, "default": default_keep_days(table)}
                if table == BAR_TABLE:
                    cursor.execute(RETENTION_BARS_SQL, {**values, "tf": SCHEMA_TIMEFRAMES[schema]})
                elif table == QUOTE_TABLE:
                    cursor.execute(RETENTION_QUOTES_SQL, {**values, "code": QUOTE_SCHEMAS[schema]})
                else:
                    cursor.execute(RETENTION_TRADES_SQL, values)
                counts = dict(cursor.fetchall())
                if counts:
                    transaction.on_commit(partial(versions_bump, symbol_ids=list(counts)))
            deleted[schema] += sum(counts.values())
            metrics.RETENTION_DELETED.labels(table).inc(deleted[schema])
    return deleted


def _chunks_drop(cursor: Any, now: datetime) -> dict[str, int]:
    """Drop the chunks wholly past each hypertable's longest window (one transaction); the rows dropped per schema."""
    policies = RetentionPolicy.objects.values_list("dataset", "schema", "keep_days", "compress_after_days")
    keep = {table: days for table, (days, _) in table_policies(list(policies)).items()}
    schema_of = {timeframe: schema for schema, timeframe in SCHEMA_TIMEFRAMES.items()}
    quote_schema_of = {str(code): schema for schema, code in QUOTE_SCHEMAS.items()}
    dropped: dict[str, int] = {}
    with transaction.atomic():
        windows = [now - timedelta(days=keep[table]) for table in (BAR_TABLE, TRADE_TABLE, QUOTE_TABLE)]
        cursor.execute(RETENTION_DROP_CALL, windows)
        symbols: set[int] = set()
        for table, symbol_id, timeframe, count in cursor.fetchall():
            # (the timeframe column holds a bar's timeframe, or a quote's schema code)
            if table == BAR_TABLE:
                schema = schema_of[timeframe]
            elif table == QUOTE_TABLE:
                schema = quote_schema_of[timeframe]
            else:
                schema = "trades"
            dropped[schema] = dropped.get(schema, 0) + count
            symbols.add(symbol_id)
        if symbols:
            transaction.on_commit(partial(versions_bump, symbol_ids=sorted(symbols)))
    return dropped


def retention_policy_save(*, policy: RetentionPolicy) -> dict[str, tuple[int, int]]:
    """Save a retention policy and apply it to the storage (TimescaleDB compression policies where present)."""
    with transaction.atomic():
        policy.full_clean()
        policy.save()
    return policies_sync()
