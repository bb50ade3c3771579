"""db_roles: the gateway's role cannot write market data; the ingester's role can run the ingest path.

Roles are global to the PostgreSQL server: each test makes its own, with unique names,
and drops them afterwards. The processes that use them connect as them for real (a new
connection, or the gateway and ingester code in a subprocess with the role's URL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connection

from marketdata.models import Bar, FeedStatus, Symbol
from marketdata.services.api_tokens import api_token_create
from marketdata.services.bars_trades import BarIn, bars_upsert

ROOT = Path(__file__).resolve().parent.parent.parent
WRITER_PASSWORD = "writer-" + uuid.uuid4().hex
READER_PASSWORD = "reader-" + uuid.uuid4().hex
T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


class Roles:
    """A writer and a gateway role with names of their own."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.writer = f"md_test_writer_{suffix}"
        self.reader = f"md_test_gateway_{suffix}"
        self.out = StringIO()

    def drop(self) -> None:
        with connection.cursor() as cursor:
            for name in (self.writer, self.reader):
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [name])
                if cursor.fetchone():
                    # Grants in this database and on the database itself, then the role.
                    cursor.execute(f'DROP OWNED BY "{name}"')
                    cursor.execute(f'DROP ROLE "{name}"')

    def url(self, role: str) -> str:
        db = settings.DATABASES["default"]
        return f"postgres://{role}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"

    def connect(self, role: str) -> psycopg.Connection:
        db = settings.DATABASES["default"]
        return psycopg.connect(
            host=db["HOST"] or "127.0.0.1",
            port=db["PORT"] or 5432,
            dbname=db["NAME"],
            user=role,
            password=READER_PASSWORD if role == self.reader else WRITER_PASSWORD,
            autocommit=True,
        )


@pytest.fixture
def roles(transactional_db: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Roles]:
    """Both roles created by the command (committed, so other connections see them); dropped after."""
    made = Roles()
    monkeypatch.setenv("DB_WRITER_PASSWORD", WRITER_PASSWORD)
    monkeypatch.setenv("DB_READER_PASSWORD", READER_PASSWORD)
    try:
        call_command("db_roles", "--writer", made.writer, "--reader", made.reader, stdout=made.out)
        yield made
    finally:
        made.drop()


def _grants(*names: str) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT grantee, table_name, privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = ANY(%s) UNION ALL "
            "SELECT grantee, table_name || '.' || column_name, privilege_type "
            "FROM information_schema.column_privileges "
            "WHERE grantee = ANY(%s) ORDER BY 1, 2, 3",
            [list(names), list(names)],
        )
        return cursor.fetchall()


def test_command_prints_what_it_did_never_the_passwords_and_is_idempotent(roles):
    out = roles.out.getvalue()
    assert f"role {roles.writer}: created, password set" in out
    assert f"role {roles.reader}: created, password set" in out
    assert f"{roles.reader}: UPDATE (last_used_at) on marketdata_apitoken" in out
    assert WRITER_PASSWORD not in out
    assert READER_PASSWORD not in out
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN (%s, %s)", [roles.writer, roles.reader]
        )
        stored = dict(cursor.fetchall())
    # Hashed before it was sent: the server holds a SCRAM verifier, never the password.
    assert all(v.startswith("SCRAM-SHA-256$") for v in stored.values())
    before = _grants(roles.writer, roles.reader)

    again = StringIO()
    call_command("db_roles", "--writer", roles.writer, "--reader", roles.reader, stdout=again)
    assert f"role {roles.writer}: updated, password set" in again.getvalue()
    assert _grants(roles.writer, roles.reader) == before


MARKET_DATA_WRITES = {
    "marketdata_bar": [
        "INSERT INTO marketdata_bar (symbol_id, timeframe, ts, publisher_id, open, high, low, close, volume) "
        "VALUES (%(sid)s, '1m', '2024-01-03T00:00:00Z', 1, 1, 1, 1, 1, 1)",
        "UPDATE marketdata_bar SET volume = 0",
        "DELETE FROM marketdata_bar",
    ],
    "marketdata_trade": [
        "INSERT INTO marketdata_trade (symbol_id, ts_event, ts_recv, publisher_id, sequence, ordinal, price, size, "
        "side, flags) VALUES (%(sid)s, now(), now(), 1, 1, 0, 1, 1, 'N', 0)",
        "UPDATE marketdata_trade SET size = 0",
        "DELETE FROM marketdata_trade",
    ],
    "marketdata_symbol": [
        "INSERT INTO marketdata_symbol (ticker, dataset, active, description, created_at) "
        "VALUES ('EVIL', 'XNAS.ITCH', true, '', now())",
        "UPDATE marketdata_symbol SET active = false",
        "DELETE FROM marketdata_symbol",
    ],
}


def test_gateway_role_reads_market_data_and_cannot_write_it(roles):
    symbol = Symbol.objects.create(ticker="AAPL", dataset="XNAS.ITCH")
    bars_upsert(bars=[BarIn(symbol.pk, "1m", T0, 1, 10, 12, 9, 11, 100)])
    with roles.connect(roles.reader) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (roles.reader,)
        assert conn.execute("SELECT ticker FROM marketdata_symbol").fetchall() == [("AAPL",)]
        assert conn.execute("SELECT close, volume FROM marketdata_bar").fetchall() == [(11, 100)]
        assert conn.execute("SELECT count(*) FROM marketdata_trade").fetchone() == (0,)
        for table, statements in MARKET_DATA_WRITES.items():
            for statement in [*statements, f"TRUNCATE {table}"]:
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"permission denied for table {table}"):
                    conn.execute(statement, {"sid": symbol.pk})
        for statement in [
            "UPDATE marketdata_feedstatus SET errors = 0",
            "UPDATE marketdata_retentionpolicy SET keep_days = 1",
            "UPDATE marketdata_apitoken SET revoked = false",
            "UPDATE auth_user SET is_superuser = true",
            "INSERT INTO django_admin_log (action_time, object_repr, action_flag, change_message, user_id) "
            "VALUES (now(), 'x', 1, '', 1)",
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    assert Bar.objects.get().volume == 100


GATEWAY_SCRIPT = """
import django
django.setup()
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()
browser = Client()
assert browser.login(username="ops", password="correct horse battery"), "login failed"
assert browser.get("/v1/symbols").status_code == 200
browser.logout()
response = Client().get("/v1/symbols", HTTP_AUTHORIZATION="Token " + TOKEN)
assert response.status_code == 200, response.content
print("gateway ok")
"""


def _run(argv: list[str], url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": url,
        "DATABASE_POOL_MIN": "0",
        "TEST_REDIS_URL": settings.REDIS_URL,
        "CHANNELS_PREFIX": getattr(settings, "CHANNELS_PREFIX", "asgi"),
        **extra,
    }
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_gateway_process_logs_in_and_authenticates_tokens_as_its_role(roles):
    user = get_user_model().objects.create_user("ops", password="correct horse battery")
    token_row, token = api_token_create(user=user, name="ci")
    script = GATEWAY_SCRIPT.replace("TOKEN", repr(token))
    result = _run([sys.executable, "-c", script], roles.url(roles.reader))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gateway ok" in result.stdout
    user.refresh_from_db()
    token_row.refresh_from_db()
    assert user.last_login is not None  # login() stamped it through the column grant
    assert token_row.last_used_at is not None


WRITER_SCRIPT = """
import datetime, django
django.setup()
from marketdata.services.bars_trades import BarIn, bars_upsert
from marketdata.services.retention import retention_apply
print(bars_upsert(bars=BARS))
print(bars_upsert(bars=CHANGED))
print("retention", retention_apply())
"""


def test_writer_role_runs_the_ingester_bars_upsert_and_retention(roles, samples):
    bars_file = samples / "XNAS.ITCH" / "test_data.ohlcv-1m.dbn.zst"
    trades_file = samples / "XNAS.ITCH" / "test_data.trades.dbn.zst"
    url = roles.url(roles.writer)
    ingest = [sys.executable, "manage.py", "ingest", "replay", str(bars_file), str(trades_file), "--no-publish"]
    result = _run(ingest, url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Symbol.objects.exists()  # the ingester created the symbols it met
    assert FeedStatus.objects.filter(dataset="XNAS.ITCH").exists()
    old = Bar.objects.count()
    assert old > 0

    # A new bar (the append path), then a change to it (the staged upsert through a temp
    # table), then retention: the samples are from 2020, past the default 365 days.
    symbol = Symbol.objects.create(ticker="NEWSYM", dataset="XNAS.ITCH")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    bars = [BarIn(symbol.pk, "1m", now, 1, 10, 12, 9, 11, 100)]
    changed = [BarIn(symbol.pk, "1m", now, 1, 10, 12, 9, 11, 200)]
    script = WRITER_SCRIPT.replace("CHANGED", repr(changed)).replace("BARS", repr(bars))
    result = _run([sys.executable, "-c", script], url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "inserted=1, updated=0" in result.stdout
    assert "inserted=0, updated=1" in result.stdout
    assert list(Bar.objects.values_list("symbol__ticker", "volume")) == [("NEWSYM", 200)]

    with roles.connect(roles.writer) as conn:
        for table in ("auth_user", "django_session", "marketdata_apitoken"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT * FROM {table}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM marketdata_symbol")


CURRENT = object()  # the role the tests connect as


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("writer", "reader", "message"),
    [
        ("Bad-Name", "md_r", "role name 'Bad-Name'"),
        ("md_same", "md_same", "two different roles"),
        (CURRENT, "md_r", "the role this command runs as"),
    ],
)
def test_refuses_bad_role_names(writer, reader, message):
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_user")
        current = cursor.fetchone()[0]
        writer = current if writer is CURRENT else writer
        with pytest.raises(CommandError, match=message):
            call_command("db_roles", "--writer", writer, "--reader", reader, stdout=StringIO())
        cursor.execute("SELECT count(*) FROM pg_roles WHERE rolname IN ('md_r', 'md_same')")
        assert cursor.fetchone() == (0,)
