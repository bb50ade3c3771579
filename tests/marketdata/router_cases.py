"""Cases run by tests/marketdata/test_routers.py in a pytest of their own, with DATABASE_REPLICA_URL set.

Two real databases: pytest-django creates a test database for `default` and another for
`replica` (no TEST MIRROR), and each case writes different rows in each, so where a read
went shows in what it returns. Transactional cases: inside pytest-django's usual
per-test transaction every read would be on the primary (reads in a transaction are).
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.db import router, transaction

from marketdata.models import Symbol
from marketdata.routers import primary

TRANSACTIONAL = pytest.mark.django_db(transaction=True, databases=["default", "replica"])


@pytest.fixture
def two_symbols() -> None:
    """One symbol on each database (a replica that lags: it has not seen the primary's)."""
    Symbol.objects.create(ticker="ON_PRIMARY", dataset="XNAS.ITCH")
    Symbol.objects.using("replica").create(ticker="ON_REPLICA", dataset="XNAS.ITCH")


def _tickers() -> list[str]:
    return list(Symbol.objects.values_list("ticker", flat=True))


def test_two_distinct_databases_and_the_router_installed():
    primary_db, replica_db = settings.DATABASES["default"], settings.DATABASES["replica"]
    assert primary_db["NAME"] != replica_db["NAME"]
    assert not replica_db.get("TEST", {}).get("MIRROR")
    assert settings.DATABASE_ROUTERS == ["marketdata.routers.PrimaryReplicaRouter"]


@TRANSACTIONAL
def test_reads_go_to_the_replica_writes_transactions_pins_and_auth_to_the_primary(two_symbols):
    assert router.db_for_write(Symbol) == "default"
    assert list(Symbol.objects.using("default").values_list("ticker", flat=True)) == ["ON_PRIMARY"]
    assert _tickers() == ["ON_REPLICA"]
    with transaction.atomic():
        assert _tickers() == ["ON_PRIMARY"]
    with primary():
        assert _tickers() == ["ON_PRIMARY"]
    assert _tickers() == ["ON_REPLICA"]

    User = get_user_model()
    User.objects.create_user("on_primary", password="x")
    User.objects.db_manager("replica").create_user("on_replica", password="x")
    assert list(User.objects.values_list("username", flat=True)) == ["on_primary"]
    assert router.db_for_read(Session) == "default"


@TRANSACTIONAL
def test_api_reads_the_replica_and_the_admin_the_primary(client, two_symbols):
    response = client.get("/v1/symbols")
    assert response.status_code == 200
    assert [s["symbol"] for s in response.json()["results"]] == ["ON_REPLICA"]

    admin = get_user_model().objects.create_superuser("admin", password="x")
    client.force_login(admin)  # a session on the primary
    page = client.get("/admin/marketdata/symbol/")
    assert page.status_code == 200
    assert b"ON_PRIMARY" in page.content
    assert b"ON_REPLICA" not in page.content
