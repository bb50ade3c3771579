"""Storage paths: TimescaleDB where the extension is installed, plain PostgreSQL otherwise.

Both paths have the same tables and keys. TimescaleDB adds hypertables (bars, trades,
quotes; created by the backend, see marketdata/db), native compression segmented by symbol, whole chunks dropped
by retention, and the continuous aggregate ``daily_ohlcv_summary``. Plain PostgreSQL gets
a partial index for regular hours and daily summaries by query. Retention is
``manage.py retention_apply`` on both paths; these functions are what both the
migrations and the admin call.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import connections

from .timeframes import QUOTE_SCHEMAS

BAR_TABLE = "marketdata_bar"
TRADE_TABLE = "marketdata_trade"
QUOTE_TABLE = "marketdata_quote"
STATUS_TABLE = "marketdata_statuschange"
HYPERTABLES = (BAR_TABLE, TRADE_TABLE, QUOTE_TABLE)
CAGG = "daily_ohlcv_summary"

REGULAR_HOURS_INDEX_SQL = """
CREATE INDEX IF NOT EXISTS bar_regular_hours ON marketdata_bar (symbol_id, timeframe, ts)
WHERE (timezone('America/New_York', ts))::time >= '09:30'
  AND (timezone('America/New_York', ts))::time < '16:00'
"""

QUOTES_COMPRESSION_SQL = f"""ALTER TABLE {QUOTE_TABLE} SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'symbol_id',
    timescaledb.compress_orderby = 'ts_recv DESC, publisher_id, schema, sequence, ordinal')"""

TIMESCALE_SETUP_SQL = [
    f"""ALTER TABLE {BAR_TABLE} SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'symbol_id, timeframe',
        timescaledb.compress_orderby = 'ts DESC, publisher_id')""",
    f"""ALTER TABLE {TRADE_TABLE} SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'symbol_id',
        timescaledb.compress_orderby = 'ts_event DESC, publisher_id, sequence, ordinal')""",
    # Daily bars from 1m bars; real-time so a read also sees what is not yet materialised.
    f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {CAGG}
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT symbol_id,
               time_bucket(INTERVAL '1 day', ts) AS day,
               first(open, ts) AS open, max(high) AS high, min(low) AS low,
               last(close, ts) AS close, sum(volume) AS volume,
               bit_or(anomalies) AS anomalies, count(*) AS bars
        FROM {BAR_TABLE} WHERE timeframe = '1m'
        GROUP BY symbol_id, day
        WITH NO DATA""",
    f"""SELECT add_continuous_aggregate_policy('{CAGG}',
        start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 minute',
        schedule_interval => INTERVAL '5 minutes', if_not_exists => true)""",
]

# Retention drops the chunks wholly past the longest window of their hypertable in
# retention_apply, not in a TimescaleDB policy: a background job cannot tell the hot cache
# what it dropped, and a cached page would go on showing it. drop_chunks needs the
# hypertable's owner, so the writer role that runs retention_apply calls it through this
# function of the owner's (EXECUTE granted by db_roles), which drops only these two
# tables' chunks and says, per symbol and timeframe (trades: none), how many rows went.
RETENTION_DROP = "marketdata_retention_drop"
RETENTION_DROP_SIGNATURE = f"{RETENTION_DROP}(timestamptz, timestamptz, timestamptz)"
# Before quotes (migration 0006) it took two arguments; migration 0006 drops that one.
RETENTION_DROP_SIGNATURE_0005 = f"{RETENTION_DROP}(timestamptz, timestamptz)"
RETENTION_DROP_SQL = f"""
CREATE OR REPLACE FUNCTION {RETENTION_DROP}(
    bars_before timestamptz, trades_before timestamptz, quotes_before timestamptz)
RETURNS TABLE (hypertable text, symbol_id bigint, timeframe text, dropped bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $fn$
DECLARE
    chunk regclass;
BEGIN
    -- Each chunk is locked before it is counted: a write into it waits, and the count is all it holds.
    FOR chunk IN SELECT show_chunks('{BAR_TABLE}', older_than => bars_before) LOOP
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', chunk);
        RETURN QUERY EXECUTE format(
            'SELECT %L::text, symbol_id, timeframe::text, count(*) FROM %s GROUP BY 2, 3', '{BAR_TABLE}', chunk);
    END LOOP;
    FOR chunk IN SELECT show_chunks('{TRADE_TABLE}', older_than => trades_before) LOOP
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', chunk);
        RETURN QUERY EXECUTE format(
            'SELECT %L::text, symbol_id, NULL::text, count(*) FROM %s GROUP BY 2', '{TRADE_TABLE}', chunk);
    END LOOP;
    -- Quotes say per symbol and schema (its code, as text, in the timeframe column).
    FOR chunk IN SELECT show_chunks('{QUOTE_TABLE}', older_than => quotes_before) LOOP
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', chunk);
        RETURN QUERY EXECUTE format(
            'SELECT %L::text, symbol_id, schema::text, count(*) FROM %s GROUP BY 2, 3', '{QUOTE_TABLE}', chunk);
    END LOOP;
    PERFORM drop_chunks('{BAR_TABLE}', older_than => bars_before);
    PERFORM drop_chunks('{TRADE_TABLE}', older_than => trades_before);
    PERFORM drop_chunks('{QUOTE_TABLE}', older_than => quotes_before);
END
$fn$
"""

TIMESCALE_TEARDOWN_SQL = [
    f"DROP MATERIALIZED VIEW IF EXISTS {CAGG}",
]

# Which table holds a schema's records: TimescaleDB policies are per hypertable.
SCHEMA_TABLES = {
    "ohlcv-1s": BAR_TABLE,
    "ohlcv-1m": BAR_TABLE,
    "ohlcv-1h": BAR_TABLE,
    "ohlcv-1d": BAR_TABLE,
    "trades": TRADE_TABLE,
    **dict.fromkeys(QUOTE_SCHEMAS, QUOTE_TABLE),
}


def timescaledb_enabled(using: str = "default") -> bool:
    """Tell whether this database runs the TimescaleDB path."""
    connection: Any = connections[using]
    return bool(connection.timescaledb_installed())


def storage_setup(*, using: str = "default") -> None:
    """Create what each path needs beyond the tables (run by migration 0002)."""
    with connections[using].cursor() as cursor:
        cursor.execute(REGULAR_HOURS_INDEX_SQL)
        if timescaledb_enabled(using):
            for statement in TIMESCALE_SETUP_SQL:
                cursor.execute(statement)
    policies_sync(using=using)


def retention_drop_setup(*, using: str = "default") -> None:
    """On TimescaleDB, create the owner's function that drops retention's chunks (migrations 0005, 0006)."""
    if not timescaledb_enabled(using):
        return
    with connections[using].cursor() as cursor:
        cursor.execute(f"DROP FUNCTION IF EXISTS {RETENTION_DROP_SIGNATURE_0005}")
        cursor.execute(RETENTION_DROP_SQL)
        cursor.execute(f"REVOKE ALL ON FUNCTION {RETENTION_DROP_SIGNATURE} FROM PUBLIC")


def quotes_storage_setup(*, using: str = "default") -> None:
    """On TimescaleDB, compress the quotes hypertable by symbol and let retention drop its chunks (migration 0006)."""
    if timescaledb_enabled(using):
        with connections[using].cursor() as cursor:
            cursor.execute(QUOTES_COMPRESSION_SQL)
        retention_drop_setup(using=using)
    policies_sync(using=using)


def retention_drop_teardown(*, using: str = "default") -> None:
    """Undo retention_drop_setup: TimescaleDB's own retention policies again, at each table's longest window."""
    if not timescaledb_enabled(using):
        return
    from .models import RetentionPolicy

    rows = RetentionPolicy.objects.using(using).values_list("dataset", "schema", "keep_days", "compress_after_days")
    with connections[using].cursor() as cursor:
        cursor.execute(f"DROP FUNCTION IF EXISTS {RETENTION_DROP_SIGNATURE}")
        cursor.execute(f"DROP FUNCTION IF EXISTS {RETENTION_DROP_SIGNATURE_0005}")
        for table, (keep, _) in table_policies(list(rows)).items():
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [table])
            if not cursor.fetchone()[0]:
                continue
            cursor.execute("SELECT add_retention_policy(%s, make_interval(days => %s), if_not_exists => true)",
                           [table, keep])  # fmt: skip


def storage_teardown(*, using: str = "default") -> None:
    """Undo storage_setup (migration 0002 backwards)."""
    with connections[using].cursor() as cursor:
        if timescaledb_enabled(using):
            for statement in TIMESCALE_TEARDOWN_SQL:
                cursor.execute(statement)
        cursor.execute("DROP INDEX IF EXISTS bar_regular_hours")


def table_policies(
    policies: list[tuple[str, str, int, int]],
) -> dict[str, tuple[int, int]]:
    """Fold (dataset, schema, keep_days, compress_after_days) rows into one pair per table.

    A hypertable holds every dataset, so its chunks are dropped past the longest window
    any (dataset, schema) asks for (shorter ones are trimmed row by row; both by
    retention_apply) and compressed as early as the earliest asks.
    """
    default_compress = settings.MARKETDATA_DEFAULT_COMPRESS_AFTER_DAYS
    result: dict[str, tuple[int, int]] = {}
    for table in HYPERTABLES:
        default_keep = default_keep_days(table)
        rows = [(keep, comp) for _, schema, keep, comp in policies if SCHEMA_TABLES.get(schema) == table]
        keep = max([default_keep] + [r[0] for r in rows]) if rows else default_keep
        comp = min(r[1] for r in rows) if rows else default_compress
        result[table] = (keep, comp)
    return result


def default_keep_days(table: str) -> int:
    """Days a table's rows are kept where no policy row names their (dataset, schema)."""
    if table == QUOTE_TABLE:
        return int(settings.MARKETDATA_DEFAULT_QUOTE_RETENTION_DAYS)
    return int(settings.MARKETDATA_DEFAULT_RETENTION_DAYS)


def policies_sync(*, using: str = "default") -> dict[str, tuple[int, int]]:
    """Make the TimescaleDB compression policies match the admin's values; each table's (keep, compress) days.

    Retention is retention_apply's on both paths (see RETENTION_DROP_SQL): a TimescaleDB
    retention policy, which an earlier version made, is removed.
    """
    from .models import RetentionPolicy

    rows = list(
        RetentionPolicy.objects.using(using).values_list("dataset", "schema", "keep_days", "compress_after_days")
    )
    wanted = table_policies(rows)
    if not timescaledb_enabled(using):
        return wanted
    with connections[using].cursor() as cursor:
        # Only the compressed hypertables that exist: earlier migrations run this before later tables are made.
        cursor.execute("SELECT hypertable_name FROM timescaledb_information.hypertables WHERE compression_enabled")
        present = {row[0] for row in cursor.fetchall()}
        for table, (_, compress) in wanted.items():
            if table not in present:
                continue
            cursor.execute("SELECT remove_retention_policy(%s, if_exists => true)", [table])
            cursor.execute("SELECT remove_compression_policy(%s, if_exists => true)", [table])
            cursor.execute(
                "SELECT add_compression_policy(%s, make_interval(days => %s))",
                [table, compress],
            )
    return wanted
