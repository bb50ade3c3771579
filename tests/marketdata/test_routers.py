"""The database router: without DATABASE_REPLICA_URL everything is on `default`; with it, see router_cases.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.sessions.models import Session
from django.db import router
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory

from marketdata.models import Bar, Symbol
from marketdata.routers import PrimaryPinMiddleware, PrimaryReplicaRouter

ROOT = Path(__file__).resolve().parent.parent.parent
CASES = Path(__file__).with_name("router_cases.py")


def test_without_a_replica_everything_is_on_default():
    assert "replica" not in settings.DATABASES
    assert router.db_for_read(Symbol) == "default"
    # Even installed, the router sends reads to default while no replica is configured.
    installed = PrimaryReplicaRouter()
    assert installed.db_for_read(Bar) == "default"
    assert installed.db_for_read(Session) == "default"
    assert installed.db_for_write(Symbol) == "default"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("get", "/v1/ohlcv", "replica"),
        ("head", "/", "replica"),
        ("options", "/v1/ohlcv", "replica"),
        ("post", "/v1/ohlcv", "default"),
        ("delete", "/v1/ohlcv", "default"),
        ("get", "/admin/marketdata/symbol/", "default"),
    ],
)
def test_middleware_pins_admin_and_unsafe_requests_to_the_primary(method, path, expected):
    routed = PrimaryReplicaRouter()
    routed.has_replica = True  # as when DATABASE_REPLICA_URL is set
    seen: list[str] = []

    def view(request: HttpRequest) -> HttpResponse:
        seen.append(routed.db_for_read(Symbol))
        return HttpResponse()

    async def async_view(request: HttpRequest) -> HttpResponse:
        return view(request)

    request = getattr(RequestFactory(), method)(path)
    PrimaryPinMiddleware(view)(request)
    async_to_sync(PrimaryPinMiddleware(async_view))(request)  # type: ignore[arg-type]
    assert seen == [expected, expected]
    assert routed.db_for_read(Symbol) == "replica"  # the pin ends with the request
    assert routed.db_for_read(Session) == "default"


@pytest.mark.django_db
def test_with_a_replica_reads_go_to_it_and_writes_and_the_admin_to_the_primary():
    """Run router_cases.py with DATABASE_REPLICA_URL set: two real test databases, different rows in each."""
    db = settings.DATABASES["default"]
    server = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    # pytest-django prefixes test_ to both, so these never touch a real database.
    base = f"{db['NAME']}_router"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": f"{server}/{base}",
        "DATABASE_REPLICA_URL": f"{server}/{base}_replica",
        "DATABASE_POOL_MIN": "0",
        "TEST_REDIS_URL": settings.REDIS_URL,
        "CHANNELS_PREFIX": getattr(settings, "CHANNELS_PREFIX", "asgi"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--create-db", "--nomigrations", str(CASES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed, result.stdout[-2000:]
    assert int(passed.group(1)) == 3
