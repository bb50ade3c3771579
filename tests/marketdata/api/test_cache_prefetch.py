"""After a miss, the page before it is filled in the background: exact, versioned, bounded, never counted.

The prefetch reads the database from a thread of its own, so the bars must be committed:
transactional tests. Both the Django view and the event loop's fast path (config.asgi)
schedule it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import orjson
import pytest
import redis

from config.asgi import http_app
from marketdata.api import answers
from marketdata.api import serializers as s
from marketdata.cache import prefetch, versions
from marketdata.selectors.symbols import symbol_ref
from marketdata.services.bars_trades import BarIn, bars_upsert
from ops import metrics

from .conftest import T0, P, minute_bars
from .test_hot_asgi import acall, call

pytestmark = pytest.mark.django_db(transaction=True)

LATEST = "symbol=AAPL&limit=10"
# 50 bars from T0: the latest 10 open at T0+40..49; the page before them is [T0+30, T0+40).
PAGE_1 = "symbol=AAPL&limit=10&start=2024-01-02T15:00:00Z&end=2024-01-02T15:10:00Z"
PAGE_2 = "symbol=AAPL&limit=10&start=2024-01-02T14:50:00Z&end=2024-01-02T15:00:00Z"
PAGE_3 = "symbol=AAPL&limit=10&start=2024-01-02T14:40:00Z&end=2024-01-02T14:50:00Z"


def counts() -> dict[str, float]:
    """The cache's hit/miss counters and the prefetch outcomes so far."""
    out = {f"api_{r}": metrics.API_CACHE.labels("ohlcv", r)._value.get() for r in ("hit", "miss", "coalesced")} | {
        f"lookup_{r}": metrics.CACHE_REQUESTS.labels(r)._value.get() for r in ("hit", "miss")
    }
    for outcome in ("filled", "cached", "busy", "dropped", "unavailable", "failed"):
        out[outcome] = prefetch.PREFETCHES.labels(outcome)._value.get()
    return out


def delta(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in counts().items() if v != before[k]}


@pytest.fixture(autouse=True)
def idle() -> Iterator[None]:
    """No prefetch of one test runs into the next; the fast path is not paused by an earlier Redis failure."""
    http_app._redis_down_until = 0.0
    assert prefetch.prefetches_wait()
    prefetch._unread.clear()
    yield
    assert prefetch.prefetches_wait()


@pytest.fixture
def symbol(make_symbol, write_bars):
    symbol = make_symbol("AAPL")
    write_bars(minute_bars(symbol, 50))
    return symbol


def get(client, query: str) -> bytes:
    response = client.get("/v1/ohlcv?" + query)
    assert response.status_code == 200
    return bytes(response.content)


def uncached(client, settings, query: str) -> bytes:
    settings.API_HOT_CACHE = False
    try:
        return get(client, query)
    finally:
        settings.API_HOT_CACHE = True


def test_a_miss_prefetches_the_page_before_it_exactly_as_the_database_answers(client, settings, symbol):
    before = counts()
    latest = get(client, LATEST)
    assert prefetch.prefetches_wait()
    # One miss, one prefetch filled; the prefetch is neither a hit nor a miss.
    assert delta(before) == {"api_miss": 1, "lookup_miss": 1, "filled": 1}
    assert orjson.loads(latest)["results"][0]["ts"] == "2024-01-02T15:10:00Z"

    before = counts()
    page_1 = get(client, PAGE_1)
    assert page_1 == uncached(client, settings, PAGE_1)
    assert [b["ts"] for b in orjson.loads(page_1)["results"]][::9] == ["2024-01-02T15:00:00Z", "2024-01-02T15:09:00Z"]
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_hit": 1, "lookup_hit": 1, "filled": 1}  # its first read prefetched PAGE_2
    before = counts()
    get(client, PAGE_1)
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_hit": 1, "lookup_hit": 1}  # only the first read does

    # A page with start and end: the same span before it, whatever the spelling of the times.
    before = counts()
    get(client, PAGE_3)
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_miss": 1, "lookup_miss": 1, "filled": 1}
    page_4 = "symbol=AAPL&limit=10&start=1704205800000&end=2024-01-02T14:40:00%2B00:00"  # 14:30 to 14:40
    before = counts()
    assert get(client, page_4) == uncached(client, settings, page_4)
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_hit": 1, "lookup_hit": 1, "filled": 1}  # the empty page before the data
    before = counts()
    get(client, "symbol=AAPL&limit=10&start=2024-01-02T14:20:00Z&end=2024-01-02T14:30:00Z")
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_hit": 1, "lookup_hit": 1}  # empty: the data ends, so do the prefetches


def test_a_chart_scrolling_back_misses_once_and_a_prefetch_alone_prefetches_nothing(client, settings, symbol):
    before = counts()
    get(client, LATEST)
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_miss": 1, "lookup_miss": 1, "filled": 1}  # PAGE_1 only, not PAGE_2 from it
    for page in (PAGE_1, PAGE_2, PAGE_3):
        before = counts()
        assert get(client, page) == uncached(client, settings, page)
        assert prefetch.prefetches_wait()
        assert delta(before) == {"api_hit": 1, "lookup_hit": 1, "filled": 1}


def test_a_version_bump_treats_a_prefetched_page_as_any_page(client, settings, symbol):
    get(client, LATEST)
    assert prefetch.prefetches_wait()
    # A new bar after the page: the page before the latest one outlives the bump.
    bars_upsert(bars=[BarIn(symbol.pk, "1m", T0 + timedelta(minutes=50), 1, P, P, P, 5 * P, 1)])
    versions.versions_bump(symbol_ids=[symbol.pk], changed={symbol.pk: {"1m": T0 + timedelta(minutes=50)}})
    before = counts()
    assert get(client, PAGE_1) == uncached(client, settings, PAGE_1)
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_hit": 1, "lookup_hit": 1, "filled": 1}
    # A bar inside PAGE_2 (prefetched, not read) changed: a miss, and the new close.
    bars_upsert(bars=[BarIn(symbol.pk, "1m", T0 + timedelta(minutes=25), 1, P, P, P, 7 * P, 1)])
    versions.versions_bump(symbol_ids=[symbol.pk], changed={symbol.pk: {"1m": T0 + timedelta(minutes=25)}})
    before = counts()
    page = get(client, PAGE_2)
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_miss": 1, "lookup_miss": 1, "filled": 1}
    assert orjson.loads(page)["results"][5]["close"] == 7
    assert page == uncached(client, settings, PAGE_2)
    # A bump that names nothing invalidates every page, prefetched ones too.
    versions.versions_bump(symbol_ids=[symbol.pk])
    before = counts()
    get(client, PAGE_3)
    assert prefetch.prefetches_wait()
    assert delta(before)["api_miss"] == 1


def test_none_when_the_cache_or_the_prefetch_is_off_or_redis_is_down(client, settings, symbol, redis_client):
    settings.API_HOT_CACHE_PREFETCH = False
    before = counts()
    get(client, LATEST)
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_miss": 1, "lookup_miss": 1}
    assert get(client, PAGE_1)
    assert delta(before)["api_miss"] == 2

    settings.API_HOT_CACHE_PREFETCH = True
    settings.API_HOT_CACHE = False
    redis_client.flushdb()
    get(client, LATEST)
    assert prefetch.prefetches_wait()
    assert redis_client.keys("md:cache:*") == []
    assert prefetch.prefetch("k", lambda: "filled") is None

    settings.API_HOT_CACHE = True
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    before = counts()
    get(client, PAGE_3)
    assert prefetch.prefetches_wait()
    assert delta(before) == {}


def test_prefetches_are_bounded_and_dropped_not_queued(client, symbol, redis_client):
    gate = threading.Event()
    before = counts()
    started = [prefetch.prefetch(("blocked", n), lambda: "cached" if gate.wait(10) else "failed") for n in range(6)]
    assert sum(f is not None for f in started) == prefetch.PREFETCH_IN_FLIGHT
    assert prefetch.prefetch(("blocked", 0), lambda: "filled") is None  # that one is in flight
    get(client, LATEST)  # a miss while every prefetch slot is taken: its prefetch is dropped
    gate.set()
    assert prefetch.prefetches_wait()
    assert delta(before) == {
        "api_miss": 1, "lookup_miss": 1, "cached": prefetch.PREFETCH_IN_FLIGHT, "busy": 1,
        "dropped": 6 - prefetch.PREFETCH_IN_FLIGHT + 1,
    }  # fmt: skip
    assert get(client, PAGE_1)
    assert delta(before)["api_miss"] == 2


def test_a_failing_prefetch_is_logged_and_swallowed(client, symbol):
    def fail() -> str:
        raise redis.ConnectionError("gone")

    before = counts()
    future = prefetch.prefetch("fails", fail)
    assert future is not None
    assert future.result(timeout=5) is None
    assert delta(before) == {"failed": 1}
    assert get(client, LATEST)


# THE FAST PATH


@pytest.fixture
def token(symbol, make_user, make_token) -> str:
    token = make_token(make_user(datasets=("XNAS.ITCH",)))
    # Django answers (the fast path's first token request here: it learns the headers) and
    # resolves the token, which this process then knows.
    call(http_app, "symbol=AAPL&limit=3", token=token)
    assert prefetch.prefetches_wait()
    return token


def test_the_fast_path_prefetches_the_page_before_a_miss(client, settings, token):
    before = counts()
    status, _, _ = call(http_app, LATEST, token=token)
    assert status == 200
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_miss": 1, "lookup_miss": 1, "filled": 1}
    before = counts()
    status, _, page_1 = call(http_app, PAGE_1, token=token)
    assert page_1 == uncached(client, settings, PAGE_1)
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_hit": 1, "lookup_hit": 1, "filled": 1}  # the first read prefetched PAGE_2
    before = counts()
    assert call(http_app, PAGE_2, token=token)[2] == uncached(client, settings, PAGE_2)
    assert prefetch.prefetches_wait()
    assert delta(before) == {"api_hit": 1, "lookup_hit": 1, "filled": 1}


def test_a_fast_path_miss_shares_a_prefetch_of_its_page_in_flight(client, settings, token):
    items = tuple(sorted((k, v) for k, _, v in (p.partition("=") for p in PAGE_2.split("&"))))
    query: dict[str, Any] = dict(answers.validated(s.OhlcvQuery, items))
    ref = symbol_ref(ticker="AAPL")
    slot = answers.ohlcv_slot(query, ref, "http://testserver/v1/ohlcv")
    assert slot is not None
    gate = threading.Event()

    def slow_fill() -> Any:
        gate.wait(10)
        return answers.ohlcv_prefetch_fill(query, ref, "http://testserver/v1/ohlcv", slot)

    before = counts()
    assert prefetch.prefetch((slot.stable, slot.clocked), slow_fill) is not None

    async def request_while_it_runs() -> tuple[int, dict[str, str], bytes]:
        task = asyncio.ensure_future(acall(http_app, PAGE_2, token=token))
        await asyncio.sleep(0.1)
        assert not task.done()  # waiting for the prefetch, not querying itself
        gate.set()
        return await task

    status, _, body = asyncio.run(request_while_it_runs())
    assert status == 200
    assert delta(before) == {"api_coalesced": 1, "lookup_miss": 1, "filled": 1}
    assert body == uncached(client, settings, PAGE_2)
