"""/v1/leaderboard from the Redis sets the ingester keeps: always the SQL statement's answer, exactly."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from itertools import product

import pytest
import redis

from marketdata.cache import leaderboards, versions
from marketdata.models import Symbol
from marketdata.services.bars_trades import BarIn
from ops import metrics
from tests.marketdata.api.conftest import T0, P, body

pytestmark = pytest.mark.django_db

TFS = ["1m", "5m", "1h", "1d"]
LIMITS = [1, 2, 3, 4, 10]


def _bar(symbol: Symbol, minute: int, close: int, volume: int, publisher: int = 1) -> BarIn:
    return BarIn(symbol.pk, "1m", T0 + timedelta(minutes=minute), publisher, close, close, close, close, volume)


@pytest.fixture
def ingest(write_bars):
    """Write bars as the ingester does: upsert, bump the versions, then keep the leaderboards."""
    refresher = leaderboards.LeaderboardRefresher(every_s=0)

    def write(bars: list[BarIn]) -> None:
        write_bars(bars)
        refresher.changed({b.symbol_id for b in bars})

    return write


def _both(client, settings, url: str) -> tuple[object, object]:
    hits = metrics.API_CACHE.labels("leaderboard", "hit")._value.get()
    settings.API_HOT_CACHE = True
    hot = body(client.get(url))
    assert metrics.API_CACHE.labels("leaderboard", "hit")._value.get() == hits + 1, url
    settings.API_HOT_CACHE = False
    sql = body(client.get(url))
    settings.API_HOT_CACHE = True
    return hot, sql


def _assert_equal_everywhere(client, settings) -> None:
    for metric, tf, limit in product(["volume", "change_pct"], TFS, LIMITS):
        url = f"/v1/leaderboard?metric={metric}&tf={tf}&limit={limit}"
        hot, sql = _both(client, settings, url)
        assert hot == sql, url


def _stamps_current(redis_client: redis.Redis, symbols: list[Symbol]) -> bool:
    """Whether the ingester's refresh left every row at its symbol's version (nothing for a reader to redo)."""
    for tf in TFS:
        for s in symbols:
            stamp = redis_client.hget(f"md:lb:{tf}:v", str(s.pk))
            if stamp is None or int(stamp) != int(redis_client.get(versions.version_key(s.pk)) or 0):
                return False
    return True


def test_redis_and_sql_leaderboards_are_equal_through_ties_corrections_late_bars_and_deactivation(
    client, settings, make_symbol, ingest, redis_client
):
    settings.STREAMING_ALLOW_ANONYMOUS = True
    # Tickers whose order is not their creation order; volumes and changes that tie.
    names = ["MSFT", "AAPL", "BRK/B", "ZZZ", "AMZN", "NEW"]
    syms = [make_symbol(n, dataset="GLBX.MDP3" if n == "ZZZ" else "XNAS.ITCH") for n in names]
    msft, aapl, brk, zzz, amzn, new = syms
    ingest(
        [
            *[_bar(msft, 0, 100 * P, 10), _bar(msft, 1, 110 * P, 500)],  # +10%, volume 500
            *[_bar(aapl, 0, 200 * P, 10), _bar(aapl, 1, 220 * P, 500)],  # +10%, volume 500: ties MSFT twice
            *[_bar(brk, 0, 300 * P, 10), _bar(brk, 1, 330 * P, 700)],  # +10%, more volume
            *[_bar(zzz, 0, 3 * P, 10), _bar(zzz, 1, 1 * P, 500)],  # -66.6667%
            *[_bar(amzn, 0, 7 * P, 10), _bar(amzn, 3, 7_000_000_001, 500)],  # a gap; tiny change
            _bar(new, 2, 5 * P, 900),  # no previous bar: no change_pct
        ]
    )
    assert _stamps_current(redis_client, syms)
    _assert_equal_everywhere(client, settings)

    # A correction of the latest bar (same ts, new close and volume), and a second publisher's bar of it.
    ingest([_bar(aapl, 1, 90 * P, 700), _bar(msft, 1, 100 * P, 1, publisher=2)])
    assert _stamps_current(redis_client, syms)
    _assert_equal_everywhere(client, settings)

    # A late bar older than the latest: between the previous bar and the latest (a new previous
    # close), and one before everything (changes nothing a leaderboard shows).
    ingest([_bar(amzn, 2, 6 * P, 5), _bar(brk, -30, 1 * P, 1)])
    assert _stamps_current(redis_client, syms)
    _assert_equal_everywhere(client, settings)

    # A deactivated symbol leaves both at once (no version bump, no refresh: it is read per request).
    Symbol.objects.filter(pk=brk.pk).update(active=False)
    _assert_equal_everywhere(client, settings)
    assert "BRK/B" not in [r["symbol"] for r in body(client.get("/v1/leaderboard?tf=1m&limit=10"))["results"]]

    # Entitlements: only the caller's datasets, in both.
    settings.STREAMING_ALLOW_ANONYMOUS = False
    settings.API_HOT_CACHE = True
    assert client.get("/v1/leaderboard").status_code == 401


def test_rows_nobody_refreshed_are_recomputed_by_the_reader(client, settings, make_symbol, write_bars, redis_client):
    settings.STREAMING_ALLOW_ANONYMOUS = True
    a, b = make_symbol("AAA"), make_symbol("BBB")
    # Written and bumped, but no ingester refreshed the leaderboards (a lost update, an empty Redis).
    write_bars([_bar(a, 0, P, 5), _bar(a, 1, 2 * P, 5), _bar(b, 0, P, 9), _bar(b, 1, P, 9)])
    _assert_equal_everywhere(client, settings)
    assert _stamps_current(redis_client, [a, b])  # the readers stored what they computed
    write_bars([_bar(b, 2, 3 * P, 1)])  # bumped, not refreshed: the old row is never served
    _assert_equal_everywhere(client, settings)
    assert body(client.get("/v1/leaderboard?tf=1m&metric=change_pct"))["results"][0]["symbol"] == "BBB"


def test_with_redis_down_the_leaderboard_comes_from_the_database(client, settings, make_symbol, ingest):
    settings.STREAMING_ALLOW_ANONYMOUS = True
    a = make_symbol("AAA")
    ingest([_bar(a, 0, P, 5), _bar(a, 1, 2 * P, 6)])
    settings.API_HOT_CACHE = False
    sql = client.get("/v1/leaderboard?tf=1m").content
    settings.API_HOT_CACHE = True
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    misses = metrics.API_CACHE.labels("leaderboard", "miss")._value.get()
    assert client.get("/v1/leaderboard?tf=1m").content == sql
    assert metrics.API_CACHE.labels("leaderboard", "miss")._value.get() == misses + 1


@pytest.mark.django_db(transaction=True)  # the refresher's thread reads committed bars only
def test_the_ingesters_background_refresher_refreshes_a_symbol_once_it_is_quiet_and_close_the_rest(
    make_symbol, write_bars, redis_client, monkeypatch
):
    calls: list[tuple[str, set[int]]] = []
    refresh = leaderboards.leaderboard_refresh

    def recorded(*, symbol_ids, tfs=None):
        calls.append((threading.current_thread().name, set(symbol_ids)))
        refresh(symbol_ids=symbol_ids, tfs=tfs)

    monkeypatch.setattr(leaderboards, "leaderboard_refresh", recorded)
    now = [100.0]  # the refresher's clock, moved by the test only
    aapl, msft = make_symbol("AAPL"), make_symbol("MSFT")
    refresher = leaderboards.LeaderboardRefresher(every_s=0.05, quiet_s=0.1, background=True, clock=lambda: now[0])
    try:
        write_bars([_bar(aapl, 0, 100 * P, 10)])
        write_bars([_bar(msft, 0, 200 * P, 20)])
        refresher.changed({aapl.pk, msft.pk})
        now[0] += 0.09
        write_bars([_bar(aapl, 1, 101 * P, 10)])
        refresher.changed({aapl.pk})  # AAPL keeps changing; MSFT has gone quiet
        time.sleep(0.3)  # the thread looks every 0.05 s, and its clock stands still
        assert calls == []
        now[0] += 0.02  # MSFT quiet for 0.11 s, AAPL for 0.02 s
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert calls == [("leaderboard-refresh", {msft.pk})]
    finally:
        refresher.close()  # refreshes AAPL now, then the thread ends

    assert calls == [("leaderboard-refresh", {msft.pk}), ("leaderboard-refresh", {aapl.pk})]
    assert _stamps_current(redis_client, [aapl, msft])
    assert refresher._thread is not None
    assert not refresher._thread.is_alive()
