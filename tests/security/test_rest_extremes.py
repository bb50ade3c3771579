"""REST at its extremes: every /v1 parameter pushed to its limits answers in the JSON envelope, never a 5xx.

Run with production-like access (anonymous off, a token and entitlements as the admin
makes them): the answers an attacker gets are the ones under test.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, quote_from_bytes

import orjson
import pytest
from django.conf import settings as django_settings
from django.test import Client, override_settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from marketdata.timeframes import ORIGIN
from tests.marketdata.api.conftest import (  # noqa: F401  (fixtures)
    clean_redis,
    make_token,
    make_user,
    minute_bars,
    write_bars,
)

pytestmark = pytest.mark.django_db

NO_RATES = {**django_settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"principal": None, "ip": None}}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


MAX_MICROS = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - ORIGIN) // timedelta(microseconds=1)
MIN_MICROS = (datetime(1, 1, 1, tzinfo=UTC) - ORIGIN) // timedelta(microseconds=1)


@pytest.fixture
def auth(make_symbol, write_bars, make_user, make_token, settings) -> dict[str, str]:  # noqa: F811
    """A trader entitled to XNAS.ITCH (AAPL, with bars) but not to GLBX.MDP3 (ESH4), anonymous access off."""
    settings.STREAMING_ALLOW_ANONYMOUS = False
    settings.REST_FRAMEWORK = NO_RATES
    aapl = make_symbol("AAPL", dataset="XNAS.ITCH")
    es = make_symbol("ESH4", dataset="GLBX.MDP3")
    write_bars(minute_bars(aapl, 5) + minute_bars(es, 5))
    return {"HTTP_AUTHORIZATION": f"Token {make_token(make_user(datasets=('XNAS.ITCH',)))}"}


def envelope_of(response: Any) -> dict[str, Any]:
    """The error object of a JSON error answer (asserting its shape)."""
    assert response["Content-Type"] == "application/json", response.content[:200]
    body = orjson.loads(response.content)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "field"}, body
    assert isinstance(body["error"]["message"], str)
    return body["error"]


# The three findings, then every parameter of every endpoint at its extremes.
EXTREMES = [
    # (path, raw query string, field named)
    ("/v1/ohlcv", "symbol=AAPL&end=9999-12-31T23:59:59Z", "end"),
    ("/v1/ohlcv", "symbol=AAPL&start=0001-01-01T00:00:00%2B01:00", "start"),
    ("/v1/symbols", "cursor=czE6AA", "cursor"),
    # ohlcv
    ("/v1/ohlcv", "symbol=AA%00PL", "symbol"),
    ("/v1/ohlcv", "symbol=AA%01PL", "symbol"),
    ("/v1/ohlcv", "symbol=AAPL%0A", "symbol"),
    ("/v1/ohlcv", "symbol=%FF%FE", "symbol"),
    ("/v1/ohlcv", "symbol=%C3%28", "symbol"),
    ("/v1/ohlcv", "symbol=" + "A" * 71, "symbol"),
    ("/v1/ohlcv", "symbol=" + "A" * 100_000, "symbol"),
    ("/v1/ohlcv", "symbol=%E2%80%8BAAPL", "symbol"),
    ("/v1/ohlcv", "symbol=AAPL&tf=1m%00", "tf"),
    ("/v1/ohlcv", "symbol=AAPL&tf=%FF", "tf"),
    ("/v1/ohlcv", "symbol=AAPL&start=0001-01-01T00:00:00Z", "start"),
    ("/v1/ohlcv", "symbol=AAPL&start=0001-01-01T00:00:00-01:00", "start"),
    ("/v1/ohlcv", "symbol=AAPL&start=9999-12-31T23:59:59.999999Z", "start"),
    ("/v1/ohlcv", "symbol=AAPL&start=1969-12-31T23:59:59Z", "start"),
    ("/v1/ohlcv", "symbol=AAPL&end=9999-12-31T23:59:59-01:00", "end"),
    ("/v1/ohlcv", "symbol=AAPL&end=9999-12-31T23:59:59%2B01:00", "end"),
    ("/v1/ohlcv", "symbol=AAPL&tf=1d&end=9999-12-31T00:00:00Z", "end"),
    ("/v1/ohlcv", "symbol=AAPL&tf=4h&start=0001-01-01T00:00:00Z&end=2024-01-02T00:00:00Z", "start"),
    ("/v1/ohlcv", "symbol=AAPL&end=253402300799999", "end"),
    ("/v1/ohlcv", "symbol=AAPL&end=9223372036001", "end"),
    ("/v1/ohlcv", "symbol=AAPL&end=253402300800000", "end"),
    ("/v1/ohlcv", "symbol=AAPL&start=" + "9" * 5000, "start"),
    ("/v1/ohlcv", "symbol=AAPL&start=-1", "start"),
    ("/v1/ohlcv", "symbol=AAPL&start=2024-01-02T14:30:00Z%00", "start"),
    ("/v1/ohlcv", "symbol=AAPL&start=2024-01-02T14:30:00%FFZ", "start"),
    ("/v1/ohlcv", "symbol=AAPL&limit=" + "9" * 40, "limit"),
    ("/v1/ohlcv", "symbol=AAPL&limit=-9223372036854775809", "limit"),
    ("/v1/ohlcv", "symbol=AAPL&limit=1%00", "limit"),
    ("/v1/ohlcv", "symbol=AAPL&limit=1e308", "limit"),
    ("/v1/ohlcv", "symbol=AAPL&limit=NaN", "limit"),
    ("/v1/ohlcv", f"symbol=AAPL&cursor={_b64(f'v1:{MAX_MICROS}'.encode())}", "cursor"),
    ("/v1/ohlcv", f"symbol=AAPL&cursor={_b64(f'v1:{MIN_MICROS}'.encode())}", "cursor"),
    ("/v1/ohlcv", f"symbol=AAPL&cursor={_b64(b'v1:' + b'9' * 150)}", "cursor"),
    ("/v1/ohlcv", f"symbol=AAPL&cursor={_b64(b'v1:0')}%01", "cursor"),
    ("/v1/ohlcv", f"symbol=AAPL&cursor={_b64(b'v1:0')}%FF", "cursor"),
    ("/v1/ohlcv", "symbol=AAPL&anomalies=include%00", "anomalies"),
    # trades
    ("/v1/trades", "symbol=AA%00PL", "symbol"),
    ("/v1/trades", "symbol=%FF", "symbol"),
    ("/v1/trades", "symbol=AAPL&start=0001-01-01T00:00:00%2B01:00", "start"),
    ("/v1/trades", "symbol=AAPL&end=9999-12-31T23:59:59Z", "end"),
    ("/v1/trades", "symbol=AAPL&end=99999999999999", "end"),
    ("/v1/trades", "symbol=AAPL&limit=0", "limit"),
    ("/v1/trades", "symbol=AAPL&limit=" + "1" * 1001, "limit"),
    ("/v1/trades", f"symbol=AAPL&cursor={_b64(f't1:{MAX_MICROS}:1:1:1'.encode())}", "cursor"),
    ("/v1/trades", f"symbol=AAPL&cursor={_b64(f't1:0:{2**70}:1:1'.encode())}", "cursor"),
    ("/v1/trades", f"symbol=AAPL&cursor={_b64(f't1:0:1:{2**63}:1'.encode())}", "cursor"),
    ("/v1/trades", f"symbol=AAPL&cursor={_b64(f't1:0:1:1:{2**40}'.encode())}", "cursor"),
    ("/v1/trades", "symbol=AAPL&cursor=" + _b64(b"t1:0:1:1:1\x00"), "cursor"),
    # latest
    ("/v1/latest", "symbols=AAPL,ES%00H4", "symbols"),
    ("/v1/latest", "symbols=AAPL,%01", "symbols"),
    ("/v1/latest", "symbols=AAPL,%FF", "symbols"),
    ("/v1/latest", "symbols=AAPL," + "B" * 71, "symbols"),
    ("/v1/latest", "symbols=" + ",".join(["A"] * 100_000), "symbols"),
    ("/v1/latest", "symbols=AAPL&tf=%00", "tf"),
    # leaderboard
    ("/v1/leaderboard", "metric=volume%00", "metric"),
    ("/v1/leaderboard", "metric=%FF", "metric"),
    ("/v1/leaderboard", "tf=1d%0A", "tf"),
    ("/v1/leaderboard", "limit=-1", "limit"),
    ("/v1/leaderboard", "limit=" + "9" * 30, "limit"),
    # symbols
    ("/v1/symbols", "dataset=XNAS.ITCH%00", "dataset"),
    ("/v1/symbols", "dataset=XNAS%01ITCH", "dataset"),
    ("/v1/symbols", "dataset=%FF", "dataset"),
    ("/v1/symbols", "active=true%00", "active"),
    ("/v1/symbols", "active=%FF", "active"),
    ("/v1/symbols", "search=AA%00", "search"),
    ("/v1/symbols", "search=AA%1B[2J", "search"),
    ("/v1/symbols", "search=%C0%AF", "search"),
    ("/v1/symbols", "search=" + "a" * 101, "search"),
    ("/v1/symbols", "limit=" + "9" * 30, "limit"),
    ("/v1/symbols", "limit=-0", "limit"),
    ("/v1/symbols", f"cursor={_b64(b's1:AA' + bytes([1]))}", "cursor"),
    ("/v1/symbols", f"cursor={_b64(b's1:' + b'A' * 71)}", "cursor"),
    ("/v1/symbols", f"cursor={_b64(b's1:AAPL')}%00", "cursor"),
    ("/v1/symbols", f"cursor={_b64(b's1:' + bytes([0xFF]))}", "cursor"),
]


@pytest.mark.parametrize(("path", "query", "field"), EXTREMES)
def test_a_parameter_at_its_extreme_is_a_400_in_the_envelope(client, auth, path, query, field):
    response = client.get(f"{path}?{query}", **auth)
    assert response.status_code == 400, response.content[:300]
    error = envelope_of(response)
    assert error["code"] == "invalid"
    assert error["field"] == field


def test_the_time_range_is_named_in_the_message(client, auth):
    response = client.get("/v1/ohlcv?symbol=AAPL&end=9999-12-31T23:59:59Z", **auth)
    assert envelope_of(response)["message"] == (
        "end is out of range: '9999-12-31T23:59:59Z'; times run from 1970-01-01T00:00:00Z to 2262-04-11T23:47:16Z"
    )


def test_times_at_the_edges_of_the_range_are_served(client, auth):
    for query in (
        "start=1970-01-01T00:00:00Z&end=2262-04-11T23:47:16Z",
        "start=0&end=9223372036000",
        "end=1970-01-01T00:00:00.001Z",
        "start=2262-04-11T23:47:15Z&end=2262-04-11T23:47:16Z&tf=1d",
        "start=1970-01-01T00:00:00Z&end=2262-04-11T23:47:16Z&tf=4h",
    ):
        response = client.get(f"/v1/ohlcv?symbol=AAPL&{query}", **auth)
        assert response.status_code == 200, (query, response.content)
        response = client.get(f"/v1/trades?symbol=AAPL&{query.replace('&tf=1d', '').replace('&tf=4h', '')}", **auth)
        assert response.status_code == 200, (query, response.content)


def test_a_next_page_after_a_range_reaching_the_end_of_time_is_served(client, auth):
    first = client.get("/v1/ohlcv?symbol=AAPL&start=0&end=2262-04-11T23:47:16Z&limit=2", **auth)
    assert first.status_code == 200
    following = orjson.loads(first.content)["next"]
    assert following is not None
    response = client.get(following, **auth)
    assert response.status_code == 200
    assert len(orjson.loads(response.content)["results"]) == 2


def test_the_ticker_rule_is_the_models(client, auth):
    # Inner spaces and punctuation are fine in a ticker (ICE's "BRN FMJ0024!"): unknown, not malformed.
    response = client.get("/v1/ohlcv?" + "symbol=" + quote("BRN FMJ0024!"), **auth)
    assert response.status_code == 404
    assert envelope_of(response)["code"] == "unknown_symbol"


def test_an_unknown_v1_path_is_a_404_in_the_envelope(client, auth):
    for path in ("/v1/nothing", "/v1/ohlcv/extra", "/v1/%00", "/v1"):
        response = client.get(path, **auth)
        assert response.status_code == 404, path
        assert envelope_of(response)["code"] == "not_found"


def test_a_host_not_allowed_is_a_400_in_the_envelope(client, auth, settings):
    settings.ALLOWED_HOSTS = ["testserver"]  # as production lists its own
    response = client.get("/v1/ohlcv?symbol=AAPL", HTTP_HOST="evil.example", **auth)  # builds its base url
    assert response.status_code == 400
    assert envelope_of(response)["code"] == "invalid"


# UNEXPECTED ERRORS


class Broken(RuntimeError):
    """A bug, as the service would meet one."""


def _explode(*args: Any, **kwargs: Any) -> Any:
    raise Broken("secret internals: SELECT * FROM marketdata_bar")


def _assert_internal_error(response: Any, request_id: str) -> None:
    assert response.status_code == 500
    error = envelope_of(response)
    assert error["code"] == "internal"
    assert error["field"] is None
    assert request_id in error["message"]
    assert response["X-Request-ID"] == request_id
    assert b"secret internals" not in response.content


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/v1/ohlcv?symbol=AAPL", "marketdata.api.answers.bar_page_text"),
        ("/v1/trades?symbol=AAPL", "marketdata.api.views.trade_list"),
        ("/v1/latest?symbols=AAPL", "marketdata.api.views.latest_bars"),
        ("/v1/leaderboard?tf=1m", "marketdata.api.views.leaderboard"),
        ("/v1/symbols", "marketdata.api.views.orjson.dumps"),
        ("/v1/ohlcv?symbol=AAPL", "marketdata.api.answers.symbol_ref"),
    ],
)
def test_a_bug_in_a_view_is_a_500_in_the_envelope_with_the_request_id(auth, settings, monkeypatch, path, target):
    settings.API_HOT_CACHE = False  # the leaderboard reads the database, not Redis
    monkeypatch.setattr(target, _explode)
    client = Client(raise_request_exception=False)
    response = client.get(path, HTTP_X_REQUEST_ID="req-500-view", **auth)
    _assert_internal_error(response, "req-500-view")


def test_a_bug_is_logged_with_its_traceback_as_django_logs_one(auth, monkeypatch, caplog):
    monkeypatch.setattr("marketdata.api.views.trade_list", _explode)
    with caplog.at_level("ERROR", logger="django.request"):
        Client(raise_request_exception=False).get("/v1/trades?symbol=AAPL", **auth)
    (record,) = [r for r in caplog.records if r.name == "django.request"]
    assert record.getMessage() == "Internal Server Error: /v1/trades"
    assert record.exc_info is not None
    assert record.exc_info[0] is Broken


class ExplodingMiddleware:
    """A middleware with a bug: fails every request before the view."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        _explode()


def test_a_bug_in_a_middleware_is_a_500_in_the_envelope_with_the_request_id(auth):
    middleware = [*django_settings.MIDDLEWARE, f"{__name__}.ExplodingMiddleware"]
    with override_settings(MIDDLEWARE=middleware):
        client = Client(raise_request_exception=False)
        response = client.get("/v1/ohlcv?symbol=AAPL", HTTP_X_REQUEST_ID="req-500-mw", **auth)
        _assert_internal_error(response, "req-500-mw")
        # Outside /v1 Django's own page stays (the admin and the chart page are HTML).
        assert "json" not in client.get("/login/")["Content-Type"]


def test_an_internal_error_without_a_request_id_header_carries_a_fresh_one(auth, monkeypatch):
    monkeypatch.setattr("marketdata.api.views.trade_list", _explode)
    response = Client(raise_request_exception=False).get("/v1/trades?symbol=AAPL", **auth)
    assert response.status_code == 500
    request_id = response["X-Request-ID"]
    assert len(request_id) == 32
    assert request_id in envelope_of(response)["message"]


# HYPOTHESIS: anything at all in every parameter of every endpoint

# Each endpoint's parameters, with a request that is answered 200 to start from.
PARAMS = {
    "/v1/ohlcv": ("symbol", "tf", "start", "end", "limit", "cursor", "anomalies"),
    "/v1/trades": ("symbol", "start", "end", "limit", "cursor"),
    "/v1/latest": ("symbols", "tf"),
    "/v1/leaderboard": ("metric", "tf", "limit"),
    "/v1/symbols": ("dataset", "active", "search", "limit", "cursor"),
    "/v1/schema": ("format", "lang"),
}
BASE = {"/v1/ohlcv": {"symbol": "AAPL"}, "/v1/trades": {"symbol": "AAPL"}, "/v1/latest": {"symbols": "AAPL"}}
GOOD = [
    "AAPL", "ESH4", "AAPL,ESH4", "1m", "1d", "4h", "volume", "change_pct", "include", "exclude", "true", "XNAS.ITCH",
    "GLBX.MDP3", "10", "2024-01-02T14:30:00Z", "1704205800000", _b64(b"v1:0"), _b64(b"t1:0:1:1:0"), _b64(b"s1:A"),
]  # fmt: skip
EDGES = [
    "0001-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59-01:00",
    "1970-01-01T00:00:00Z", "2262-04-11T23:47:16.854775Z", "2262-04-11T23:47:16.854776Z", "0", "-0", "-1",
    "253402300799999", "253402300800000", "9223372036854", "9223372036855", str(2**63), str(-(2**63) - 1), "1e400",
    "NaN", "inf", "\x00", "\x7f", "\u202e", "\ud800", "\ufffd", "%", "%%", "&", "=", " ", "\t", "A" * 10_000,
    _b64(f"v1:{MAX_MICROS}".encode()), _b64(f"v1:{MIN_MICROS}".encode()), _b64(f"t1:{MAX_MICROS}:1:1:1".encode()),
    _b64(f"t1:0:{2**64}:{-(2**64)}:{2**16}".encode()), _b64(b"s1:\x00"), _b64(b"s1:\xff"), "czE6AA",
]  # fmt: skip


def _encoded(value: str) -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


anything = st.one_of(
    st.sampled_from(GOOD + EDGES).map(_encoded),
    st.binary(max_size=24).map(lambda raw: quote_from_bytes(raw, safe="")),
    st.text(max_size=24).map(_encoded),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
)
# Near the ends of datetime's range and of the served one, in every offset form.
edge_times = st.builds(
    lambda year, rest, offset: f"{year:04d}-{rest}{offset}",
    st.sampled_from([1, 1970, 2262, 9999]),
    st.sampled_from(["01-01T00:00:00", "12-31T23:59:59.999999", "04-11T23:47:16.854775"]),
    st.sampled_from(["Z", "+01:00", "-01:00", "+23:59"]),
)
times = st.one_of(
    edge_times.map(_encoded),
    edge_times.map(_encoded),
    st.builds(
        lambda when, offset: when.isoformat() + offset,
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)),
        st.sampled_from(["Z", "+01:00", "-01:00"]),
    ).map(_encoded),
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
    st.sampled_from(["0", "9223372036000", "9223372036001", "253402300799999", "253402300800000"]),
)
extreme_int = st.sampled_from([MIN_MICROS, MAX_MICROS, 0, -1, 2**15, 2**31, 2**63, 2**64, -(2**63) - 1]) | st.integers()
cursors = st.one_of(
    st.builds(lambda n: _b64(f"v1:{n}".encode()), extreme_int),
    st.builds(
        lambda a, b, c, d: _b64(f"t1:{a}:{b}:{c}:{d}".encode()), extreme_int, extreme_int, extreme_int, extreme_int
    ),
    st.builds(lambda raw: _b64(b"s1:" + raw), st.binary(max_size=80)),
    st.binary(max_size=40).map(_b64),
)
limits = st.integers(min_value=-(2**70), max_value=2**70).map(str) | st.sampled_from(
    ["0", "1", "10000", "10001", "1.0"]
)
BY_NAME = {"start": times, "end": times, "cursor": cursors, "limit": limits}


def values(name: str) -> st.SearchStrategy[str]:
    special = BY_NAME.get(name)
    return anything if special is None else st.one_of(special, special, anything)


def _queries(path: str) -> st.SearchStrategy[str]:
    """A valid request of ``path`` with one to three parameters replaced (or added twice)."""
    names = st.sampled_from(PARAMS[path])
    changes = st.lists(names.flatmap(lambda name: st.tuples(st.just(name), values(name))), min_size=1, max_size=3)

    def query(items: list[tuple[str, str]]) -> str:
        changed = {name for name, _ in items}
        kept = [(name, quote(value)) for name, value in BASE.get(path, {}).items() if name not in changed]
        return "&".join(f"{name}={value}" for name, value in kept + items)

    return changes.map(query)


@pytest.mark.parametrize("path", sorted(PARAMS))
def test_anything_in_any_parameter_is_never_a_5xx_and_errors_are_envelopes(auth, path):
    client = Client(raise_request_exception=False)

    @hypothesis_settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(query=_queries(path))
    def check(query: str) -> None:
        response = client.get(f"{path}?{query}", **auth)
        assert response.status_code < 500, (query, response.content[:300])
        assert response["Content-Type"].startswith(("application/json", "application/vnd.oai.openapi")), query
        if response.status_code >= 400:
            assert response.status_code in (400, 404), (query, response.content[:300])
            envelope_of(response)

    check()
