"""Fixtures of the REST API tests: a client, bars written as the ingester writes them, users and tokens."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from marketdata.cache.local import local_caches_clear
from marketdata.cache.versions import versions_bump
from marketdata.models import Entitlement, Symbol
from marketdata.services.api_tokens import api_token_create
from marketdata.services.bars_trades import BarIn, bars_upsert

P = 1_000_000_000  # Databento fixed-point scale
T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def clean_redis(redis_client: redis.Redis) -> redis.Redis:
    """Each test starts with no cache entries, versions or throttle counters, and no process-local look-ups."""
    local_caches_clear()
    return redis_client


@pytest.fixture
def client() -> APIClient:
    return APIClient()


def body(response: Any) -> Any:
    """The JSON body of a response (the API writes raw JSON text, not DRF's Response.data)."""
    return orjson.loads(response.content)


@pytest.fixture
def write_bars() -> Callable[..., list[BarIn]]:
    """Write bars the way the ingester does: upsert in one transaction, then bump the versions."""

    def write(bars: list[BarIn]) -> list[BarIn]:
        bars_upsert(bars=bars)
        versions_bump(symbol_ids={b.symbol_id for b in bars})
        return bars

    return write


def minute_bars(symbol: Symbol, n: int, *, start: datetime = T0, tf: str = "1m", step: timedelta | None = None,
                publisher: int = 1, anomalies: dict[int, int] | None = None) -> list[BarIn]:  # fmt: skip
    """``n`` consecutive bars with distinct, exactly representable-nowhere-in-binary prices."""
    step = step or timedelta(minutes=1)
    out = []
    for i in range(n):
        open_ = 100 * P + i * 10_000_000 + 100_000_000  # 100.1, 100.11, ...
        close = open_ + (i % 7 - 3) * 10_000_000
        high = max(open_, close) + 20_000_000
        low = min(open_, close) - 30_000_000
        flags = (anomalies or {}).get(i, 0)
        out.append(BarIn(symbol.pk, tf, start + i * step, publisher, open_, high, low, close, 100 + i, flags))
    return out


@pytest.fixture
def make_user(db: None) -> Callable[..., User]:
    counter = iter(range(1_000_000))

    def make(*, datasets: tuple[str, ...] = (), staff: bool = False, active: bool = True) -> User:
        user = User.objects.create_user(f"user{next(counter)}", is_staff=staff, is_active=active)
        for dataset in datasets:
            Entitlement.objects.create(user=user, dataset=dataset)
        return user

    return make


@pytest.fixture
def make_token() -> Callable[..., str]:
    def make(user: User, **kwargs: Any) -> str:
        return api_token_create(user=user, name="test", **kwargs)[1]

    return make
