"""Version bumps that name what they changed: cached pages wholly before the change outlive it, nothing else does."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta

import orjson
import pytest

from marketdata.cache import versions
from marketdata.columns import micros
from marketdata.services.bars_trades import BarIn, bars_upsert
from ops import metrics

from .conftest import T0, P, body, minute_bars


def _hits() -> float:
    return metrics.API_CACHE.labels("ohlcv", "hit")._value.get()


@pytest.fixture
def write_spans() -> Callable[..., list[BarIn]]:
    """Write bars as the ingester may: upsert, then bump naming each symbol's earliest changed time per timeframe."""

    def write(bars: list[BarIn]) -> list[BarIn]:
        bars_upsert(bars=bars)
        changed: dict[int, dict[str, datetime]] = {}
        for bar in bars:
            spans = changed.setdefault(bar.symbol_id, {})
            spans[bar.timeframe] = min(bar.ts, spans.get(bar.timeframe, bar.ts))
        versions.versions_bump(symbol_ids=changed, changed=changed)
        return bars

    return write


def _uncached(client, settings, url: str) -> bytes:
    settings.API_HOT_CACHE = False
    try:
        return bytes(client.get(url).content)
    finally:
        settings.API_HOT_CACHE = True


OLD = "/v1/ohlcv?symbol=AAPL&start=2024-01-02T14:30:00Z&end=2024-01-02T14:40:00Z"
LATEST = "/v1/ohlcv?symbol=AAPL"


def test_a_new_bar_at_the_end_keeps_older_pages_and_replaces_the_latest_one_at_once(client, make_symbol, write_spans):
    symbol = make_symbol("AAPL")
    write_spans(minute_bars(symbol, 20))
    old, latest = client.get(OLD).content, client.get(LATEST).content
    write_spans([BarIn(symbol.pk, "1m", T0 + timedelta(minutes=20), 1, P, P, P, 7 * P, 1)])
    hits = _hits()
    assert client.get(OLD).content == old
    assert _hits() == hits + 1  # the page before the new bar: still cached
    fresh = body(client.get(LATEST))["results"]
    assert _hits() == hits + 1  # the latest page: recomputed
    assert fresh[-1] == {"ts": "2024-01-02T14:50:00Z", "open": 1, "high": 1, "low": 1, "close": 7, "volume": 1,
                         "final": True}  # fmt: skip
    assert len(fresh) == len(orjson.loads(latest)["results"]) + 1


def test_a_change_inside_a_cached_page_is_seen_at_once(client, make_symbol, write_spans):
    symbol = make_symbol("AAPL")
    write_spans(minute_bars(symbol, 20))
    client.get(OLD)
    write_spans([BarIn(symbol.pk, "1m", T0 + timedelta(minutes=9), 1, P, P, P, 9 * P, 1)])
    assert body(client.get(OLD))["results"][-1]["close"] == 9


def test_a_resampled_page_depends_on_the_bars_of_its_last_bucket_past_its_end(client, make_symbol, write_spans):
    symbol = make_symbol("AAPL")
    write_spans(minute_bars(symbol, 20))
    # end 14:42 is inside the 14:40 bucket, which the page holds: a bar at 14:44 changes it.
    url = "/v1/ohlcv?symbol=AAPL&tf=5m&start=2024-01-02T14:30:00Z&end=2024-01-02T14:42:00Z"
    before = body(client.get(url))["results"]
    write_spans([BarIn(symbol.pk, "1m", T0 + timedelta(minutes=14), 1, P, 999 * P, P, P, 1)])
    after = body(client.get(url))["results"]
    assert after[-1]["high"] == 999 != before[-1]["high"]


def test_a_timeframe_preferred_to_the_base_invalidates_every_page(client, make_symbol, write_spans, settings):
    symbol = make_symbol("AAPL")
    write_spans(minute_bars(symbol, 600))  # 4h pages from 1m bars
    url = "/v1/ohlcv?symbol=AAPL&tf=4h&start=2024-01-02T12:00:00Z&end=2024-01-02T20:00:00Z"
    assert body(client.get(url))["results"]
    # 1h bars long after the page: 4h is built from 1h now (SPEC: the coarsest dividing base), and 1h has
    # nothing in the page's range.
    write_spans([BarIn(symbol.pk, "1h", T0 + timedelta(days=2), 1, P, P, P, P, 1)])
    assert client.get(url).content == _uncached(client, settings, url)
    assert body(client.get(url))["results"] == []


def test_a_bump_that_names_nothing_invalidates_everything(client, make_symbol, write_spans, write_bars):
    symbol = make_symbol("AAPL")
    write_spans(minute_bars(symbol, 20))
    client.get(OLD)
    bars_upsert(bars=[BarIn(symbol.pk, "1m", T0 + timedelta(minutes=3), 1, P, P, P, 4 * P, 1)])
    versions.versions_bump(symbol_ids=[symbol.pk])
    assert body(client.get(OLD))["results"][3]["close"] == 4


def test_a_version_bumped_around_the_log_is_a_miss(client, make_symbol, write_spans, redis_client):
    symbol = make_symbol("AAPL")
    write_spans(minute_bars(symbol, 20))
    client.get(OLD)
    write_spans([BarIn(symbol.pk, "1m", T0 + timedelta(minutes=30), 1, P, P, P, P, 1)])
    redis_client.incr(versions.version_key(symbol.pk))  # a writer that knows nothing of the log
    hits = _hits()
    client.get(OLD)
    assert _hits() == hits


def test_the_log_merges_its_oldest_records_and_stays_strict(make_symbol, write_spans, redis_client):
    symbol = make_symbol("AAPL")
    bars = minute_bars(symbol, versions.CHANGES_KEEP + 5)
    for bar in bars:
        write_spans([bar])
    log = versions.changes_parse(redis_client.get(versions.changes_key(symbol.pk)))
    assert log is not None
    assert len(log.records) == versions.CHANGES_KEEP
    version = int(redis_client.get(versions.version_key(symbol.pk)))
    assert log.records[-1][0] == version
    # The oldest record now stands for the first six bumps, at the earliest of their times.
    assert log.records[0] == (log.base + 1, {"1m": micros(bars[0].ts)})
    assert [r[0] for r in log.records[1:]] == list(range(version - versions.CHANGES_KEEP + 2, version + 1))


def test_cached_answers_equal_the_database_through_random_writes_and_reads(client, make_symbol, write_spans, settings):
    """Writes of several timeframes at random times, each followed by reads: cached == computed, always."""
    rng = random.Random(6)
    symbol = make_symbol("AAPL")
    write_spans(minute_bars(symbol, 120))
    urls = [
        LATEST, OLD, OLD.replace("14:40", "15:30"),
        "/v1/ohlcv?symbol=AAPL&tf=5m&start=2024-01-02T14:30:00Z&end=2024-01-02T14:52:00Z",
        "/v1/ohlcv?symbol=AAPL&tf=1h&end=2024-01-02T16:00:00Z",
        "/v1/ohlcv?symbol=AAPL&tf=4h",
        "/v1/ohlcv?symbol=AAPL&start=2024-01-02T15:00:00Z&limit=7",
        "/v1/ohlcv?symbol=AAPL&tf=15m&end=2024-01-02T15:10:00Z&anomalies=exclude",
    ]  # fmt: skip
    for step in range(40):
        for url in rng.sample(urls, 4):
            assert client.get(url).content == _uncached(client, settings, url), (step, url)
        tf = rng.choice(["1m", "1m", "1m", "1s", "1h"])
        minute = rng.randint(0, 200)
        ts = T0 + timedelta(minutes=minute)
        price = rng.randint(1, 500) * P
        write_spans([BarIn(symbol.pk, tf, ts, 1, price, price, price, price, step + 1, rng.choice([0, 0, 2]))])
    assert _hits() > 0


def test_the_first_bars_of_a_symbol_replace_its_cached_empty_pages(client, make_symbol, write_spans):
    symbol = make_symbol("AAPL")
    assert body(client.get(LATEST))["results"] == []
    assert body(client.get(LATEST))["results"] == []  # cached empty
    write_spans(minute_bars(symbol, 3))
    assert len(body(client.get(LATEST))["results"]) == 3


def _log_model(keep: int) -> Callable[..., str | None]:
    """The log's rule, whole: every record parsed, appended, the two oldest merged past ``keep``."""
    state: dict[str, object] = {"version": 0, "log": None}

    def step(spans: dict[str, int] | None) -> str | None:
        state["version"] = version = int(state["version"]) + 1  # type: ignore[call-overload]
        if spans is None:  # a writer that knows nothing of the log
            return state["log"]  # type: ignore[return-value]
        base, records = 0, []
        if state["log"] is not None:
            parsed = versions.changes_parse(str(state["log"]).encode())
            assert parsed is not None
            base, records = parsed.base, parsed.records
        if (records[-1][0] if records else base if state["log"] is not None else None) != version - 1:
            base, records = version - 1, []
        records.append((version, dict(spans)))
        while len(records) > keep:
            (old, a), (_, b) = records[0], records[1]
            records[0:2] = [(old, {**a, **{tf: min(t, a.get(tf, t)) for tf, t in b.items()}})]
        text = ";".join(f"{v}:" + ",".join(f"{tf}={t}" for tf, t in s.items()) for v, s in records)
        state["log"] = f"{base}|{text}"
        return state["log"]  # type: ignore[return-value]

    return step


@pytest.mark.parametrize("keep", [1, 2, 3, versions.CHANGES_KEEP])
def test_the_bump_script_keeps_the_log_the_rule_describes(make_symbol, redis_client, monkeypatch, keep):
    """The script appends and merges only the oldest two records; whatever the order of bumps,
    timeframes and plain version increments, its text is the one parsing the whole log gives."""
    monkeypatch.setattr(versions, "CHANGES_KEEP", keep)
    rng = random.Random(keep)
    symbol = make_symbol("AAPL")
    model = _log_model(keep)
    for step in range(150):
        if rng.random() < 0.05:
            redis_client.incr(versions.version_key(symbol.pk))
            expected = model(None)
        elif rng.random() < 0.1:
            versions.versions_bump(symbol_ids=[symbol.pk])
            expected = model({versions.ANY_CHANGE: 0})
        else:
            # One timeframe (the usual bump: the script merges two such records without parsing) or two.
            tfs = rng.sample(["1s", "1m", "1h"], rng.randint(1, 2))
            times = {tf: T0 + timedelta(seconds=rng.randint(0, 10**6)) for tf in tfs}
            versions.versions_bump(symbol_ids=[symbol.pk], changed={symbol.pk: times})
            expected = model({tf: micros(ts) for tf, ts in sorted(times.items())})
        assert int(redis_client.get(versions.version_key(symbol.pk))) == step + 1
        raw = redis_client.get(versions.changes_key(symbol.pk))
        assert (raw.decode() if raw else None) == expected, step


def test_a_log_the_script_did_not_write_is_started_again(make_symbol, redis_client, monkeypatch):
    monkeypatch.setattr(versions, "CHANGES_KEEP", 2)
    symbol = make_symbol("AAPL")
    versions.versions_bump(symbol_ids=[symbol.pk])
    # Not all records, yet ending at the version before.
    redis_client.set(versions.changes_key(symbol.pk), b"0|x;y;1:*=0")
    redis_client.set(versions.version_key(symbol.pk), 1)
    versions.versions_bump(symbol_ids=[symbol.pk])  # three records past a keep of two: the merge finds no record
    assert redis_client.get(versions.changes_key(symbol.pk)) == b"1|2:*=0"
    assert int(redis_client.get(versions.version_key(symbol.pk))) == 2
