"""Storage paths: migrations from empty on plain PostgreSQL, retention, the TimescaleDB extras."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from marketdata.models import Bar, RetentionPolicy, Trade
from marketdata.selectors.daily import daily_summary
from marketdata.services.bars_trades import BarIn, TradeIn, bars_upsert, trades_insert
from marketdata.services.retention import retention_apply
from marketdata.storage import CAGG, policies_sync, table_policies

ROOT = Path(__file__).resolve().parent.parent.parent
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
P = 1_000_000_000


def _dsn(dbname: str) -> str:
    db = settings.DATABASES["default"]
    return f"host={db['HOST'] or '127.0.0.1'} port={db['PORT'] or 5432} user={db['USER']} dbname={dbname}"


def test_migrations_from_an_empty_database():
    name = f"mdg_migrate_{uuid.uuid4().hex[:8]}"
    admin_dsn = _dsn("postgres")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        db = settings.DATABASES["default"]
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.local",
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{name}",
        }
        for args in (["migrate", "--noinput"], ["makemigrations", "--check", "--dry-run"]):
            result = subprocess.run(
                [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                timeout=120, check=False,
            )  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
        with psycopg.connect(_dsn(name)) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            indexes = {
                r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'marketdata_bar'")
            }
        assert {"marketdata_bar", "marketdata_trade", "marketdata_symbol", "marketdata_retentionpolicy"} <= tables
        assert {"marketdata_bar_pkey", "bar_regular_hours"} <= indexes
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.django_db(transaction=True)
def test_retention_apply_deletes_only_past_the_policy(make_symbol):
    nasdaq = make_symbol("AAPL", dataset="XNAS.ITCH")
    cme = make_symbol("ESH4", dataset="GLBX.MDP3")
    RetentionPolicy.objects.create(dataset="XNAS.ITCH", schema="ohlcv-1m", keep_days=30)
    RetentionPolicy.objects.create(dataset="XNAS.ITCH", schema="trades", keep_days=10)
    ages = [5, 29, 31, 200, 364, 366]
    rows = []
    for symbol in (nasdaq, cme):
        for age in ages:
            ts = (NOW - timedelta(days=age)).replace(second=0)
            rows.append(BarIn(symbol.pk, "1m", ts, 1, P, P, P, P, 1))
            rows.append(BarIn(symbol.pk, "1h", ts.replace(minute=0), 1, P, P, P, P, 1))
    bars_upsert(bars=rows)
    trades_insert(
        trades=[
            TradeIn(nasdaq.pk, NOW - timedelta(days=d), NOW - timedelta(days=d), 1, d, 0, P, 1, "B") for d in (9, 11)
        ]
    )

    deleted = retention_apply(now=NOW)

    def ages_left(symbol, tf):
        return sorted((NOW - b.ts).days for b in Bar.objects.filter(symbol_id=symbol.pk, timeframe=tf))

    assert ages_left(nasdaq, "1m") == [5, 29]  # its 30-day policy
    assert ages_left(nasdaq, "1h") == [5, 29, 31, 200, 364]  # no policy for ohlcv-1h: 365 days
    assert ages_left(cme, "1m") == [5, 29, 31, 200, 364]  # no policy for GLBX.MDP3: 365 days
    assert [(NOW - t.ts_event).days for t in Trade.objects.all()] == [9]
    quotes = dict.fromkeys(("mbp-1", "tbbo", "bbo-1s", "bbo-1m", "cbbo-1s", "cbbo-1m"), 0)
    assert deleted == {"ohlcv-1s": 0, "ohlcv-1m": 5, "ohlcv-1h": 2, "ohlcv-1d": 0, "trades": 1, **quotes}


def test_table_policies_keep_the_longest_and_compress_the_earliest():
    rows = [("XNAS.ITCH", "ohlcv-1m", 30, 3), ("GLBX.MDP3", "ohlcv-1h", 800, 10), ("XNAS.ITCH", "trades", 10, 2)]
    assert table_policies(rows) == {
        "marketdata_bar": (800, 3), "marketdata_trade": (365, 2), "marketdata_quote": (30, 7),
    }  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_daily_summary_by_query_matches_the_bars(make_symbol):
    symbol = make_symbol()
    day = datetime(2024, 1, 2, tzinfo=UTC)
    bars_upsert(
        bars=[
            BarIn(symbol.pk, "1m", day + timedelta(hours=14, minutes=30), 1, 10 * P, 12 * P, 9 * P, 11 * P, 100),
            BarIn(symbol.pk, "1m", day + timedelta(hours=20, minutes=59), 1, 11 * P, 15 * P, 8 * P, 14 * P, 50),
            BarIn(symbol.pk, "1m", day + timedelta(days=1, hours=1), 1, 20 * P, 20 * P, 20 * P, 20 * P, 7),
        ]
    )
    days = daily_summary(symbol_ids=[symbol.pk], start=day, end=day + timedelta(days=2))
    assert [(d.day, d.bar.open, d.bar.high, d.bar.low, d.bar.close, d.bar.volume) for d in days] == [
        (day, 10 * P, 15 * P, 8 * P, 14 * P, 150),
        (day + timedelta(days=1), 20 * P, 20 * P, 20 * P, 20 * P, 7),
    ]


# TimescaleDB path: these run only where the extension is installed.


@pytest.mark.timescaledb
def test_bars_and_trades_are_hypertables(timescaledb):
    with connection.cursor() as cursor:
        cursor.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")
        names = {row[0] for row in cursor.fetchall()}
    assert {"marketdata_bar", "marketdata_trade"} <= names


@pytest.mark.timescaledb
def test_policies_created_from_admin_values(timescaledb):
    RetentionPolicy.objects.create(dataset="XNAS.ITCH", schema="ohlcv-1m", keep_days=400, compress_after_days=2)
    policies_sync()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT hypertable_name, proc_name, config FROM timescaledb_information.jobs "
            "WHERE hypertable_name = 'marketdata_bar'"
        )
        jobs = {(row[1], str(row[2])) for row in cursor.fetchall()}
        cursor.execute(
            "SELECT segmentby_column_index, attname FROM timescaledb_information.compression_settings "
            "WHERE hypertable_name = 'marketdata_bar'"
        )
        segments = {row[1] for row in cursor.fetchall() if row[0] is not None}
    # Retention is retention_apply's (it drops chunks and tells the cache): no TimescaleDB retention job.
    assert not any(proc == "policy_retention" for proc, _ in jobs)
    assert any(proc == "policy_compression" and "2 days" in config for proc, config in jobs)
    assert {"symbol_id", "timeframe"} <= segments


@pytest.mark.timescaledb
@pytest.mark.django_db(transaction=True)
def test_continuous_aggregate_refreshes_and_matches_the_query_path(timescaledb, make_symbol):
    from marketdata.selectors.daily import DAILY_SQL_PLAIN
    from marketdata.timeframes import ORIGIN

    symbol = make_symbol()
    day = datetime(2024, 1, 2, tzinfo=UTC)
    bars_upsert(
        bars=[
            BarIn(symbol.pk, "1m", day + timedelta(minutes=m), 1, (10 + m) * P, (12 + m) * P, 9 * P, (11 + m) * P, m)
            for m in range(0, 3000, 7)
        ]
    )
    with connection.cursor() as cursor:
        cursor.execute(f"CALL refresh_continuous_aggregate('{CAGG}', NULL, NULL)")
    from_cagg = [(d.day, d.bar) for d in daily_summary(symbol_ids=[symbol.pk], start=day, end=day + timedelta(days=4))]
    with connection.cursor() as cursor:
        params: dict[str, Any] = {"ids": [symbol.pk], "lo": day, "hi": day + timedelta(days=4), "origin": ORIGIN}
        cursor.execute(DAILY_SQL_PLAIN, params)
        by_query = [(row[1], row[2:7]) for row in cursor.fetchall()]
    assert [(d, (b.open, b.high, b.low, b.close, b.volume)) for d, b in from_cagg] == by_query


@pytest.mark.django_db(transaction=True)
def test_retention_apply_bumps_the_cache_version_of_each_symbol_it_deleted_from(make_symbol, redis_client):
    from marketdata.cache import versions

    old, kept = make_symbol("AAPL"), make_symbol("MSFT")
    RetentionPolicy.objects.create(dataset="XNAS.ITCH", schema="ohlcv-1m", keep_days=30)
    ts = (NOW - timedelta(days=40)).replace(second=0)
    bars_upsert(
        bars=[BarIn(old.pk, "1m", ts, 1, P, P, P, P, 1), BarIn(kept.pk, "1m", NOW.replace(second=0), 1, P, P, P, P, 1)]
    )
    before = {s.pk: int(redis_client.get(versions.version_key(s.pk)) or 0) for s in (old, kept)}

    assert retention_apply(now=NOW)["ohlcv-1m"] == 1

    after = {s.pk: int(redis_client.get(versions.version_key(s.pk)) or 0) for s in (old, kept)}
    assert after == {old.pk: before[old.pk] + 1, kept.pk: before[kept.pk]}
