"""/v1/ohlcv: exact prices, anomalies, the cursor walk, resampling, and the hot cache."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.utils import timezone

from marketdata.services.bars_trades import BarIn
from marketdata.timeframes import OHLCV, resample
from marketdata.wire import price_text, ts_text
from ops import metrics
from tests.marketdata.api.conftest import T0, P, body, minute_bars

pytestmark = pytest.mark.django_db

CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"


def _walk(client, first_url):
    """Follow `next` to the end; return every bar and the number of pages."""
    bars, pages, url = [], 0, first_url
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.content
        page = body(response)
        bars += page["results"]
        pages += 1
        url = page["next"]
    return bars, pages


def _hits():
    return metrics.CACHE_REQUESTS.labels("hit")._value.get()


def test_bar_objects_carry_exact_prices_and_flags(client, make_symbol, write_bars):
    symbol = make_symbol("AAPL")
    write_bars([
        BarIn(symbol.pk, "1m", T0, 1, 189_120_000_000, 189_300_000_001, 100_000_000, 300_000_000, 0, 1),
        BarIn(symbol.pk, "1m", T0 + timedelta(minutes=1), 1, 1, 10**15, 1, 10**15, 5_000_000, 2),
        BarIn(symbol.pk, "1m", T0 + timedelta(minutes=2), 1, 7 * P, 7 * P, 7 * P, 7 * P, 1, 0),
    ])  # fmt: skip
    response = client.get("/v1/ohlcv?symbol=AAPL&start=2024-01-02T14:30:00Z")
    assert response.status_code == 200
    text = response.content.decode()
    # The JSON text itself: shortest exact decimals, never binary noise such as 0.30000000000000004.
    assert (
        '{"ts":"2024-01-02T14:30:00Z","open":189.12,"high":189.300000001,"low":0.1,"close":0.3,"volume":0,'
        '"final":true,"anomalies":["halt_zero_volume"]}'
    ) in text
    assert '"open":0.000000001,"high":1000000,"low":0.000000001,"close":1000000,"volume":5000000,' in text
    assert '"anomalies":["volume_spike"]' in text
    assert '{"ts":"2024-01-02T14:32:00Z","open":7,"high":7,"low":7,"close":7,"volume":1,"final":true}' in text
    page = body(response)
    assert page["symbol"] == "AAPL"
    assert page["tf"] == "1m"
    assert page["next"] is None


def test_anomalies_are_included_by_default_and_can_be_excluded(client, make_symbol, write_bars):
    write_bars(minute_bars(make_symbol("AAPL"), 10, anomalies={2: 1, 7: 2}))
    url = "/v1/ohlcv?symbol=AAPL&start=2024-01-02T14:30:00Z"
    shown = body(client.get(url))["results"]
    assert len(shown) == 10
    assert [b.get("anomalies") for b in shown if "anomalies" in b] == [["halt_zero_volume"], ["volume_spike"]]
    kept = body(client.get(url + "&anomalies=exclude"))["results"]
    assert [b["ts"] for b in kept] == [b["ts"] for i, b in enumerate(shown) if i not in (2, 7)]
    # Excluded before aggregation: the 5m bar holding minute 2 is built from the other four.
    five = body(client.get(url + "&tf=5m&anomalies=exclude"))["results"]
    assert five[0]["volume"] == sum(100 + i for i in (0, 1, 3, 4))
    assert "anomalies" not in five[0]


@pytest.mark.parametrize(("tf", "limit"), [("1m", 7), ("5m", 3), ("15m", 1), ("1h", 2)])
def test_walking_the_cursor_returns_exactly_one_large_query(client, make_symbol, write_bars, tf, limit):
    symbol = make_symbol("AAPL")
    rng = random.Random(7)
    minutes = sorted(rng.sample(range(600), 240))  # gaps, like a real session
    bars = [BarIn(symbol.pk, "1m", T0 + timedelta(minutes=m), pub, (100 + m) * P, (101 + m) * P, (99 + m) * P,
                  (100 + m) * P + pub, 10 + m, 0) for m in minutes for pub in (1, 2)]  # fmt: skip
    write_bars(bars)
    window = "start=2024-01-02T14:00:00Z&end=2024-01-02T23:00:00Z"
    whole = body(client.get(f"/v1/ohlcv?symbol=AAPL&tf={tf}&{window}&limit=10000"))
    assert whole["next"] is None
    walked, pages = _walk(client, f"/v1/ohlcv?symbol=AAPL&tf={tf}&{window}&limit={limit}")
    assert walked == whole["results"]
    assert pages == -(-len(walked) // limit)  # no empty last page
    assert len(walked) > 2 * limit


def test_next_is_an_absolute_url_without_the_callers_token(client, make_symbol, write_bars, make_user, make_token):
    write_bars(minute_bars(make_symbol("AAPL"), 5))
    token = make_token(make_user(staff=True))
    page = body(client.get(f"/v1/ohlcv?symbol=AAPL&start=2024-01-02T14:30:00Z&limit=2&token={token}"))
    assert page["next"].startswith("http://testserver/v1/ohlcv?")
    assert "token" not in page["next"]
    assert token not in page["next"]


@pytest.mark.parametrize("tf", ["5m", "15m", "30m", "1h", "4h", "1d"])
def test_resampled_bars_equal_the_websockets_resampling_of_the_same_bars(client, make_symbol, write_bars, tf):
    symbol = make_symbol("AAPL")
    rng = random.Random(tf)
    start = T0 - timedelta(hours=20)
    bars = []
    for m in sorted(rng.sample(range(3 * 24 * 60), 900)):
        for pub in rng.sample([1, 2, 3], rng.randint(1, 2)):
            o = rng.randint(50, 150) * 10_000_000 + rng.randint(0, 9)  # nano-dollar digits
            c = rng.randint(50, 150) * 10_000_000
            bars.append(BarIn(symbol.pk, "1m", start + timedelta(minutes=m), pub, o, max(o, c) + 3, min(o, c) - 3,
                              c, rng.randint(0, 10**6), rng.choice([0, 0, 0, 1, 2])))  # fmt: skip
    write_bars(bars)
    expected = resample([OHLCV(b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.publisher_id)
                         for b in bars], tf)  # fmt: skip
    served, _ = _walk(client, f"/v1/ohlcv?symbol=AAPL&tf={tf}&start={ts_text(start - timedelta(days=1))}&limit=500")
    now = timezone.now()
    assert served == [
        {"ts": ts_text(b.ts), "open": _num(b.open), "high": _num(b.high), "low": _num(b.low), "close": _num(b.close),
         "volume": b.volume, "final": True, **({"anomalies": _flags(b.anomalies)} if b.anomalies else {})}
        for b in expected
    ]  # fmt: skip
    assert all(b.ts < now for b in expected)


def _num(value: int) -> float | int:
    import orjson

    return orjson.loads(price_text(value))


def _flags(bits: int) -> list[str]:
    return [name for bit, name in ((1, "halt_zero_volume"), (2, "volume_spike")) if bits & bit]


def test_a_forming_bucket_is_not_final(client, make_symbol, write_bars):
    symbol = make_symbol("AAPL")
    now = timezone.now().replace(second=0, microsecond=0)
    write_bars([BarIn(symbol.pk, "1m", now - timedelta(minutes=i), 1, P, P, P, P, 1) for i in range(3)])
    latest = body(client.get("/v1/ohlcv?symbol=AAPL&tf=1d"))["results"][-1]
    assert latest["final"] is False
    stored = body(client.get("/v1/ohlcv?symbol=AAPL&tf=1m"))["results"]
    assert [b["final"] for b in stored] == [True, True, True]


def test_without_start_the_latest_page_comes_back_even_for_old_data(client, make_symbol, write_bars):
    write_bars(minute_bars(make_symbol("AAPL"), 300))
    five = body(client.get("/v1/ohlcv?symbol=AAPL&tf=5m&limit=3"))
    assert [b["ts"] for b in five["results"]] == ["2024-01-02T19:15:00Z", "2024-01-02T19:20:00Z",
                                                  "2024-01-02T19:25:00Z"]  # fmt: skip
    assert five["next"] is None


def test_a_cached_page_is_served_from_redis(client, make_symbol, write_bars, clean_redis):
    write_bars(minute_bars(make_symbol("AAPL"), 20))
    url = "/v1/ohlcv?symbol=AAPL&start=2024-01-02T14:30:00Z&end=2024-01-02T15:00:00Z&limit=5"
    before = _hits()
    first = client.get(url)
    second = client.get(url)
    assert _hits() == before + 1
    assert second.content == first.content
    assert any(b":ohlcv|1m|" in key for key in clean_redis.keys("md:cache:*"))
    # Every parameter is part of the key: another limit is another answer.
    assert len(body(client.get(url.replace("limit=5", "limit=6")))["results"]) == 6


@pytest.mark.parametrize("tf", ["1m", "5m"])
def test_a_bar_written_after_a_cached_read_is_seen_at_once(client, make_symbol, write_bars, tf):
    symbol = make_symbol("AAPL")
    write_bars(minute_bars(symbol, 10))
    urls = [f"/v1/ohlcv?symbol=AAPL&tf={tf}", f"/v1/ohlcv?symbol=AAPL&tf={tf}&start=2024-01-02T14:30:00Z",
            f"/v1/latest?symbols=AAPL&tf={tf}"]  # fmt: skip
    for url in urls:
        client.get(url)
        client.get(url)  # now cached
    changed = BarIn(symbol.pk, "1m", T0 + timedelta(minutes=9), 1, 5 * P, 6 * P, 4 * P, 555_555_555_555, 42)
    new = BarIn(symbol.pk, "1m", T0 + timedelta(minutes=10), 1, 5 * P, 6 * P, 4 * P, 123_456_789_123, 7)
    write_bars([changed, new])  # bars_upsert, then versions_bump: what the ingester does after its commit
    latest_page = body(client.get(urls[0]))["results"]
    forward = body(client.get(urls[1]))["results"]
    latest = body(client.get(urls[2]))["results"]["AAPL"]
    for bars in (latest_page, forward):
        assert bars[-1]["close"] == 123.456789123
    if tf == "1m":
        assert latest_page[-2]["close"] == 555.555555555
        assert latest == latest_page[-1]
    assert latest["close"] == 123.456789123


def test_with_redis_unreachable_answers_come_from_the_database(client, make_symbol, write_bars, settings):
    symbol = make_symbol("AAPL")
    write_bars(minute_bars(symbol, 30, anomalies={4: 2}))
    urls = ["/v1/ohlcv?symbol=AAPL&tf=5m", "/v1/ohlcv?symbol=AAPL&start=2024-01-02T14:30:00Z&limit=7",
            "/v1/latest?symbols=AAPL", "/v1/leaderboard", "/v1/symbols", "/v1/trades?symbol=AAPL"]  # fmt: skip
    with_redis = [client.get(url).content for url in urls]
    errors = metrics.CACHE_ERRORS.labels("get")._value.get()
    settings.REDIS_URL = CLOSED_PORT_REDIS
    without = [client.get(url) for url in urls]
    assert [r.status_code for r in without] == [200] * len(urls)
    assert [r.content for r in without] == with_redis
    assert metrics.CACHE_ERRORS.labels("get")._value.get() > errors
    # A bar written while Redis is down (its version bump is lost) is served all the same.
    from marketdata.services.bars_trades import bars_upsert

    bars_upsert(bars=[BarIn(symbol.pk, "1m", T0 + timedelta(minutes=30), 1, P, P, P, 3 * P, 1)])
    assert body(client.get("/v1/latest?symbols=AAPL"))["results"]["AAPL"]["close"] == 3


def test_final_pages_outlive_the_bucket_edge_and_forming_ones_do_not(client, make_symbol, write_bars, clean_redis):
    symbol = make_symbol("AAPL")
    now = timezone.now().replace(second=0, microsecond=0)
    # The current minute's bar is in today's bucket whatever the time: the 1d bar is forming.
    write_bars([BarIn(symbol.pk, "1m", now - timedelta(minutes=i), 1, P, P, P, P, 1) for i in range(3)])
    client.get("/v1/ohlcv?symbol=AAPL&tf=1m")  # stored bars: all final
    client.get("/v1/ohlcv?symbol=AAPL&tf=1d")  # today's bar is forming
    keys = sorted(k.decode() for k in clean_redis.keys("md:cache:*"))
    assert [k.rsplit("|", 1)[1] for k in keys if "|1m|" in k] == ["final"]
    clocked = [k.rsplit("|", 1)[1] for k in keys if "|1d|" in k]
    assert clocked == [str(int(now.replace(hour=0, minute=0).timestamp()))]
    hits = metrics.API_CACHE.labels("ohlcv", "hit")._value.get()
    assert body(client.get("/v1/ohlcv?symbol=AAPL&tf=1d"))["results"][-1]["final"] is False
    assert metrics.API_CACHE.labels("ohlcv", "hit")._value.get() == hits + 1
