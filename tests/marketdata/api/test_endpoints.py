"""/v1/trades, /v1/latest, /v1/leaderboard and /v1/symbols."""

from __future__ import annotations

from datetime import timedelta

import pytest

from marketdata.services.bars_trades import BarIn, TradeIn, trades_insert
from tests.marketdata.api.conftest import T0, P, body, minute_bars

pytestmark = pytest.mark.django_db


def _trades(symbol, n):
    # Several prints share a microsecond (and all but their ordinal): the cursor must tell them apart.
    out = []
    for i in range(n):
        ts = T0 + timedelta(milliseconds=250 * (i // 3))
        out.append(TradeIn(symbol.pk, ts, ts, 1 + i % 2, 1000 + i // 3, i % 3 // 2, 189_120_000_000 + i, 100 + i,
                           "ABN"[i % 3]))  # fmt: skip
    trades_insert(trades=out)
    return out


def test_trades_page_and_walk(client, make_symbol):
    trades = _trades(make_symbol("AAPL"), 50)
    whole = body(client.get("/v1/trades?symbol=AAPL&start=2024-01-02T14:30:00Z&limit=10000"))
    assert whole["results"][0] == {"ts": "2024-01-02T14:30:00Z", "price": 189.12, "size": 100, "side": "A"}
    in_key_order = sorted(trades, key=lambda t: (t.ts_event, t.publisher_id, t.sequence, t.ordinal))
    assert [t["size"] for t in whole["results"]] == [t.size for t in in_key_order]
    assert whole["results"][1]["price"] == 189.120000002  # same ts and publisher, next ordinal
    walked, url = [], "/v1/trades?symbol=AAPL&start=2024-01-02T14:30:00Z&limit=4"
    while url:
        page = body(client.get(url))
        walked += page["results"]
        url = page["next"]
    assert walked == whole["results"]
    latest = body(client.get("/v1/trades?symbol=AAPL&limit=5"))
    assert latest["results"] == whole["results"][-5:]
    assert latest["next"] is None
    window = body(client.get("/v1/trades?symbol=AAPL&start=1704205800250&end=2024-01-02T14:30:00.750Z"))
    assert [t["ts"] for t in window["results"]] == ["2024-01-02T14:30:00.250000Z"] * 3 + [
        "2024-01-02T14:30:00.500000Z"] * 3  # fmt: skip


def test_latest_gives_each_symbols_last_bar_in_the_order_asked(client, make_symbol, write_bars):
    aapl, msft, _ = make_symbol("AAPL"), make_symbol("MSFT"), make_symbol("IDLE")
    write_bars(minute_bars(aapl, 5) + minute_bars(msft, 8, publisher=2))
    response = client.get("/v1/latest?symbols=MSFT, AAPL,IDLE,MSFT&tf=1m")
    assert response.status_code == 200
    assert response.content.startswith(b'{"tf":"1m","results":{"MSFT":')
    results = body(response)["results"]
    assert list(results) == ["MSFT", "AAPL", "IDLE"]
    assert results["AAPL"]["ts"] == "2024-01-02T14:34:00Z"
    assert results["MSFT"]["ts"] == "2024-01-02T14:37:00Z"
    assert results["IDLE"] is None
    five = body(client.get("/v1/latest?symbols=MSFT&tf=5m"))["results"]["MSFT"]
    assert five["ts"] == "2024-01-02T14:35:00Z"
    assert five["volume"] == 105 + 106 + 107


def test_leaderboard_by_volume_and_by_change(client, make_symbol, write_bars):
    day1, day2 = T0, T0 + timedelta(days=1)
    rows = []
    for ticker, prev_close, close, volume in [("UP", 100, 110, 5), ("DOWN", 100, 90, 50), ("FLAT", 100, 100, 20)]:
        sid = make_symbol(ticker).pk
        rows.append(BarIn(sid, "1m", day1, 1, 100 * P, 100 * P, 100 * P, prev_close * P, 1))
        rows.append(BarIn(sid, "1m", day2, 1, 100 * P, 120 * P, 80 * P, close * P, volume))
    new = make_symbol("NEW").pk  # one day only: no previous close
    rows.append(BarIn(new, "1m", day2, 1, P, P, P, P, 1000))
    make_symbol("GONE", active=False)
    write_bars(rows)
    by_volume = body(client.get("/v1/leaderboard?metric=volume&tf=1d&limit=3"))
    assert by_volume["metric"] == "volume"
    assert [(r["rank"], r["symbol"], r["bar"]["volume"]) for r in by_volume["results"]] == [
        (1, "NEW", 1000), (2, "DOWN", 50), (3, "FLAT", 20)]  # fmt: skip
    assert by_volume["results"][0]["change_pct"] is None
    by_change = body(client.get("/v1/leaderboard?metric=change_pct"))["results"]
    assert [(r["symbol"], r["change_pct"], r["prev_close"]) for r in by_change] == [
        ("UP", 10, 100), ("FLAT", 0, 100), ("DOWN", -10, 100)]  # fmt: skip
    assert by_change[0]["bar"]["ts"] == "2024-01-03T00:00:00Z"
    assert by_change[0]["bar"]["close"] == 110


def test_symbols_filters_and_pages(client, make_symbol):
    make_symbol("AAPL", description="Apple Inc.")
    make_symbol("MSFT", description="Microsoft")
    make_symbol("BRN FMJ0024!", dataset="IFEU.IMPACT")
    make_symbol("OLD", active=False)
    everything = body(client.get("/v1/symbols"))
    assert [s["symbol"] for s in everything["results"]] == ["AAPL", "BRN FMJ0024!", "MSFT", "OLD"]
    assert everything["results"][0] == {"symbol": "AAPL", "dataset": "XNAS.ITCH", "active": True,
                                        "description": "Apple Inc."}  # fmt: skip
    assert [s["symbol"] for s in body(client.get("/v1/symbols?active=false"))["results"]] == ["OLD"]
    assert [s["symbol"] for s in body(client.get("/v1/symbols?dataset=IFEU.IMPACT"))["results"]] == ["BRN FMJ0024!"]
    assert [s["symbol"] for s in body(client.get("/v1/symbols?search=micro"))["results"]] == ["MSFT"]
    walked, url = [], "/v1/symbols?active=true&limit=2"
    while url:
        page = body(client.get(url))
        walked += [s["symbol"] for s in page["results"]]
        url = page["next"]
    assert walked == ["AAPL", "BRN FMJ0024!", "MSFT"]


def test_a_ticker_with_spaces_and_punctuation_is_served(client, make_symbol, write_bars):
    write_bars(minute_bars(make_symbol("BRN FMJ0024!", dataset="IFEU.IMPACT"), 3))
    page = body(client.get("/v1/ohlcv", {"symbol": "BRN FMJ0024!", "start": "2024-01-02T14:30:00Z", "limit": 2}))
    assert page["symbol"] == "BRN FMJ0024!"
    rest = body(client.get(page["next"]))
    assert [b["ts"] for b in rest["results"]] == ["2024-01-02T14:32:00Z"]
