"""Every bad parameter is a 400 in the error envelope naming the field; unknown symbols are 404."""

from __future__ import annotations

import base64

import pytest

from marketdata.selectors.paging import cursor_encode
from marketdata.selectors.trades import TradeOut, trade_cursor_encode
from tests.marketdata.api.conftest import T0, body, minute_bars

pytestmark = pytest.mark.django_db

BAR_CURSOR = cursor_encode(T0)
TRADE_CURSOR = trade_cursor_encode(TradeOut(T0, 1, 1, 0, 1, 1, "B"))
FOREIGN = base64.urlsafe_b64encode(b"v2:123").decode()

BAD = [
    # (path, query, field, text the message must hold)
    ("/v1/ohlcv", "", "symbol", "required"),
    ("/v1/ohlcv", "symbol=AAPL&limit=0", "limit", "between 1 and 10000"),
    ("/v1/ohlcv", "symbol=AAPL&limit=10001", "limit", "between 1 and 10000"),
    ("/v1/ohlcv", "symbol=AAPL&limit=ten", "limit", "between 1 and 10000"),
    ("/v1/ohlcv", "symbol=AAPL&limit=-5", "limit", "between 1 and 10000"),
    ("/v1/ohlcv", "symbol=AAPL&tf=7m", "tf", "unknown timeframe '7m'"),
    ("/v1/ohlcv", "symbol=AAPL&tf=1M", "tf", "unknown timeframe"),
    ("/v1/ohlcv", "symbol=AAPL&start=2024-01-02T14:30:00", "start", "start has no UTC offset"),
    ("/v1/ohlcv", "symbol=AAPL&end=2024-01-02 14:30:00", "end", "end has no UTC offset"),
    ("/v1/ohlcv", "symbol=AAPL&start=yesterday", "start", "start is not a time"),
    ("/v1/ohlcv", "symbol=AAPL&end=2024-13-45T00:00:00Z", "end", "end is not a time"),
    ("/v1/ohlcv", "symbol=AAPL&start=99999999999999999999", "start", "start is out of range"),
    ("/v1/ohlcv", "symbol=AAPL&start=2024-01-02T15:00:00Z&end=2024-01-02T15:00:00Z", "start", "before end"),
    ("/v1/ohlcv", "symbol=AAPL&start=2024-01-03T00:00:00Z&end=2024-01-02T00:00:00Z", "start", "before end"),
    ("/v1/ohlcv", "symbol=AAPL&cursor=garbage!!", "cursor", "cursor"),
    ("/v1/ohlcv", f"symbol=AAPL&cursor={FOREIGN}", "cursor", "cursor"),
    ("/v1/ohlcv", f"symbol=AAPL&cursor={TRADE_CURSOR}", "cursor", "cursor"),
    ("/v1/ohlcv", "symbol=AAPL&anomalies=hide", "anomalies", "'hide' is not one of include exclude"),
    ("/v1/trades", "", "symbol", "required"),
    ("/v1/trades", "symbol=AAPL&limit=0", "limit", "between 1 and 10000"),
    ("/v1/trades", "symbol=AAPL&start=2024-01-02T14:30", "start", "start has no UTC offset"),
    ("/v1/trades", "symbol=AAPL&start=1704205800000&end=1704205800000", "start", "before end"),
    ("/v1/trades", f"symbol=AAPL&cursor={BAR_CURSOR}", "cursor", "trades cursor"),
    ("/v1/latest", "", "symbols", "required"),
    ("/v1/latest", "symbols=,,", "symbols", "names no symbol"),
    ("/v1/latest", "symbols=" + ",".join(f"S{i}" for i in range(101)), "symbols", "more than 100"),
    ("/v1/latest", "symbols=AAPL&tf=2h", "tf", "unknown timeframe '2h'"),
    ("/v1/leaderboard", "metric=turnover", "metric", "'turnover' is not one of volume change_pct"),
    ("/v1/leaderboard", "tf=1w", "tf", "unknown timeframe"),
    ("/v1/leaderboard", "limit=0", "limit", "between 1 and 1000"),
    ("/v1/leaderboard", "limit=1001", "limit", "between 1 and 1000"),
    ("/v1/symbols", "active=maybe", "active", "valid boolean"),
    ("/v1/symbols", "limit=100000", "limit", "between 1 and 10000"),
    ("/v1/symbols", f"cursor={BAR_CURSOR}", "cursor", "symbols cursor"),
]


@pytest.mark.parametrize(("path", "query", "field", "text"), BAD)
def test_a_bad_parameter_is_a_400_naming_the_field(client, make_symbol, path, query, field, text):
    make_symbol("AAPL")
    response = client.get(f"{path}?{query}")
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/json"
    error = body(response)["error"]
    assert set(body(response)) == {"error"}
    assert set(error) == {"code", "message", "field"}
    assert error["code"] == "invalid"
    assert error["field"] == field
    assert text in error["message"]


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [("/v1/ohlcv", "symbol=ZZZZ", "symbol"), ("/v1/trades", "symbol=ZZZZ", "symbol"),
     ("/v1/latest", "symbols=AAPL,ZZZZ", "symbols")],
)  # fmt: skip
def test_an_unknown_symbol_is_a_404(client, make_symbol, path, query, field):
    make_symbol("AAPL")
    response = client.get(f"{path}?{query}")
    assert response.status_code == 404
    assert body(response) == {"error": {"code": "unknown_symbol", "message": "unknown symbol 'ZZZZ'", "field": field}}


def test_parameters_are_checked_before_the_symbol(client):
    response = client.get("/v1/ohlcv?symbol=ZZZZ&tf=7m")
    assert response.status_code == 400
    assert body(response)["error"]["field"] == "tf"


def test_empty_parameters_count_as_absent(client, make_symbol):
    make_symbol("AAPL")
    response = client.get("/v1/symbols?dataset=&active=&search=")
    assert response.status_code == 200
    assert [s["symbol"] for s in body(response)["results"]] == ["AAPL"]
    assert client.get("/v1/ohlcv?symbol=AAPL&start=&end=&cursor=").status_code == 200


def test_other_methods_are_refused_in_the_envelope(client, make_symbol):
    make_symbol("AAPL")
    response = client.post("/v1/ohlcv?symbol=AAPL")
    assert response.status_code == 405
    assert body(response)["error"]["code"] == "method_not_allowed"


def test_json_whatever_the_accept_header(client, make_symbol, write_bars):
    write_bars(minute_bars(make_symbol("AAPL"), 2))
    for accept in ("text/html", "application/xml", "*/*"):
        response = client.get("/v1/ohlcv?symbol=AAPL", HTTP_ACCEPT=accept)
        assert response.status_code == 200
        assert response["Content-Type"] == "application/json"
        bad = client.get("/v1/ohlcv?symbol=AAPL&limit=0", HTTP_ACCEPT=accept)
        assert bad.status_code == 400
        assert body(bad)["error"]["field"] == "limit"


@pytest.mark.parametrize(
    "start",
    ["2024-01-02T14:32:00Z", "2024-01-02T14:32:00z", "2024-01-02T14:32:00+00:00", "2024-01-02T16:32:00+02:00",
     "2024-01-02T09:32:00-05:00", "2024-01-02T14:32:00.000Z", "1704205920000"],
)  # fmt: skip
def test_start_in_every_accepted_form_means_the_same_instant(client, make_symbol, write_bars, start):
    write_bars(minute_bars(make_symbol("AAPL"), 5))
    response = client.get("/v1/ohlcv", {"symbol": "AAPL", "start": start, "end": "1704206040000"})
    assert response.status_code == 200, response.content
    assert [b["ts"] for b in body(response)["results"]] == ["2024-01-02T14:32:00Z", "2024-01-02T14:33:00Z"]
