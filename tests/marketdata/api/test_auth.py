"""Authentication, entitlements and rate limits of the REST API."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from marketdata.cache.local import local_caches_clear
from marketdata.models import ApiToken
from tests.marketdata.api.conftest import body, minute_bars

pytestmark = pytest.mark.django_db

ENDPOINTS = ["/v1/ohlcv?symbol=AAPL", "/v1/trades?symbol=AAPL", "/v1/latest?symbols=AAPL", "/v1/leaderboard",
             "/v1/symbols"]  # fmt: skip


@pytest.fixture
def symbols(make_symbol, write_bars):
    aapl = make_symbol("AAPL", dataset="XNAS.ITCH")
    es = make_symbol("ESH4", dataset="GLBX.MDP3")
    write_bars(minute_bars(aapl, 3) + minute_bars(es, 3))
    return aapl, es


@pytest.fixture
def closed(settings):
    settings.STREAMING_ALLOW_ANONYMOUS = False


@pytest.mark.parametrize("url", ENDPOINTS)
def test_anonymous_is_refused_when_settings_do_not_allow_it(client, symbols, closed, url):
    response = client.get(url)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Token realm="api"'
    error = body(response)["error"]
    assert error["code"] == "unauthenticated"
    assert error["field"] is None
    assert "Token" in error["message"]


@pytest.mark.parametrize("url", ENDPOINTS)
def test_anonymous_sees_every_dataset_where_allowed(client, symbols, settings, url):
    settings.STREAMING_ALLOW_ANONYMOUS = True
    assert client.get(url).status_code == 200
    assert client.get(url.replace("AAPL", "ESH4")).status_code == 200


def test_a_token_in_the_header_or_the_query(client, symbols, closed, make_user, make_token):
    token = make_token(make_user(datasets=("XNAS.ITCH",)))
    assert client.get("/v1/ohlcv?symbol=AAPL", HTTP_AUTHORIZATION=f"Token {token}").status_code == 200
    assert client.get("/v1/ohlcv?symbol=AAPL", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200
    assert client.get(f"/v1/ohlcv?symbol=AAPL&token={token}").status_code == 200


@pytest.mark.parametrize("how", ["unknown", "revoked", "expired", "inactive user", "malformed"])
def test_a_bad_token_is_refused_even_where_anonymous_is_allowed(client, symbols, settings, make_user, make_token, how):
    settings.STREAMING_ALLOW_ANONYMOUS = True
    user = make_user(staff=True)
    token = make_token(user)
    header = f"Token {token}"
    if how == "unknown":
        header = "Token mdg_not-a-token"
    elif how == "revoked":
        ApiToken.objects.update(revoked=True)
    elif how == "expired":
        ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    elif how == "inactive user":
        user.is_active = False
        user.save()
    else:
        header = f"Token {token} extra"
    response = client.get("/v1/ohlcv?symbol=AAPL", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert body(response)["error"]["code"] == "unauthenticated"
    if how != "malformed":
        query = token if how != "unknown" else "mdg_not-a-token"
        assert client.get(f"/v1/ohlcv?symbol=AAPL&token={query}").status_code == 401


def test_a_token_that_has_not_expired_yet_works(client, symbols, closed, make_user, make_token):
    token = make_token(make_user(staff=True), expires_at=timezone.now() + timedelta(hours=1))
    assert client.get(f"/v1/ohlcv?symbol=AAPL&token={token}").status_code == 200


def test_last_used_at_is_written_at_most_once_a_minute(client, symbols, closed, make_user, make_token):
    token = make_token(make_user(staff=True))
    client.get(f"/v1/symbols?token={token}")
    first = ApiToken.objects.get().last_used_at
    assert first is not None
    client.get(f"/v1/symbols?token={token}")
    assert ApiToken.objects.get().last_used_at == first
    ApiToken.objects.update(last_used_at=first - timedelta(minutes=2))
    local_caches_clear()  # the minute passing also ends this process's few-second token look-up
    client.get(f"/v1/symbols?token={token}")
    again = ApiToken.objects.get().last_used_at
    assert again is not None
    assert again > first


def test_entitlements_allow_their_datasets_and_refuse_others(client, symbols, closed, make_user, make_token):
    token = make_token(make_user(datasets=("XNAS.ITCH",)))
    auth = {"HTTP_AUTHORIZATION": f"Token {token}"}
    assert client.get("/v1/ohlcv?symbol=AAPL", **auth).status_code == 200
    for url in ("/v1/ohlcv?symbol=ESH4", "/v1/trades?symbol=ESH4", "/v1/latest?symbols=AAPL,ESH4"):
        response = client.get(url, **auth)
        assert response.status_code == 404, url
        field = "symbols" if "latest" in url else "symbol"
        assert body(response) == {
            "error": {"code": "unknown_symbol", "message": "unknown symbol 'ESH4'", "field": field}
        }
    response = client.get("/v1/symbols?dataset=GLBX.MDP3", **auth)
    assert response.status_code == 403
    assert body(response) == {
        "error": {"code": "not_entitled", "message": "not entitled to dataset 'GLBX.MDP3'", "field": None}
    }
    listed = body(client.get("/v1/symbols", **auth))["results"]
    assert [s["symbol"] for s in listed] == ["AAPL"]
    board = body(client.get("/v1/leaderboard?tf=1m", **auth))["results"]
    assert [r["symbol"] for r in board] == ["AAPL"]


# Every request naming a symbol, with the parameters a chart sends.
SYMBOL_URLS = [
    "/v1/ohlcv?symbol={t}", "/v1/ohlcv?symbol={t}&tf=5m&start=2024-01-02T14:30:00Z&end=2024-01-02T15:30:00Z&limit=10",
    "/v1/ohlcv?symbol={t}&tf=1d&anomalies=exclude", "/v1/trades?symbol={t}", "/v1/trades?symbol={t}&start=0&limit=5",
    "/v1/latest?symbols={t}", "/v1/latest?symbols=AAPL,{t}&tf=1h", "/v1/latest?symbols={t},AAPL,ZZZZ",
]  # fmt: skip


def _answers(client, auth, ticker):
    out = []
    for url in SYMBOL_URLS:
        response = client.get(url.format(t=ticker), **auth)
        headers = {k: v for k, v in response.items() if k != "X-Request-ID"}
        out.append((url, response.status_code, headers, response.content))
    return out


def test_a_symbol_not_entitled_answers_exactly_as_an_unknown_one(client, symbols, closed, make_user, make_token):
    auth = {"HTTP_AUTHORIZATION": f"Token {make_token(make_user(datasets=('XNAS.ITCH',)))}"}
    not_entitled = _answers(client, auth, "ESH4")
    assert {status for _, status, _, _ in not_entitled} == {404}
    es = symbols[1]
    es.ticker = "ESH4-RENAMED"  # the very same ticker, now unknown (its bars protect it from deletion)
    es.save()
    assert _answers(client, auth, "ESH4") == not_entitled


def test_symbols_of_datasets_not_entitled_are_never_listed(client, symbols, closed, make_user, make_token):
    auth = {"HTTP_AUTHORIZATION": f"Token {make_token(make_user(datasets=('XNAS.ITCH',)))}"}
    seen = set()
    for query in ("", "search=ESH", "search=GLBX", "active=true", "limit=1", "cursor=czE6QQ", "dataset=XNAS.ITCH"):
        response = client.get(f"/v1/symbols?{query}", **auth)
        assert response.status_code == 200, query
        seen |= {(s["symbol"], s["dataset"]) for s in body(response)["results"]}
    assert seen == {("AAPL", "XNAS.ITCH")}
    # Asking for a dataset by name tells nothing of what it holds: one answer for any not entitled.
    refused = client.get("/v1/symbols?dataset=GLBX.MDP3", **auth)
    made_up = client.get("/v1/symbols?dataset=NOPE.NONE", **auth)
    assert refused.status_code == made_up.status_code == 403
    assert body(refused)["error"]["message"].replace("GLBX.MDP3", "X") == body(made_up)["error"]["message"].replace(
        "NOPE.NONE", "X"
    )


def test_a_user_without_entitlements_sees_nothing(client, symbols, closed, make_user, make_token):
    token = make_token(make_user())
    assert client.get(f"/v1/ohlcv?symbol=AAPL&token={token}").status_code == 404
    assert body(client.get(f"/v1/symbols?token={token}"))["results"] == []
    assert body(client.get(f"/v1/leaderboard?token={token}"))["results"] == []


def test_staff_see_every_dataset(client, symbols, closed, make_user, make_token):
    token = make_token(make_user(staff=True))
    for ticker in ("AAPL", "ESH4"):
        assert client.get(f"/v1/ohlcv?symbol={ticker}&token={token}").status_code == 200
    assert len(body(client.get(f"/v1/symbols?token={token}"))["results"]) == 2


def test_a_session_works_like_a_token(client, symbols, closed, make_user):
    client.force_login(make_user(datasets=("GLBX.MDP3",)))
    assert client.get("/v1/ohlcv?symbol=ESH4").status_code == 200
    assert client.get("/v1/ohlcv?symbol=AAPL").status_code == 404


def test_a_cached_answer_is_still_refused_to_the_unentitled(client, symbols, closed, make_user, make_token):
    allowed = make_token(make_user(datasets=("XNAS.ITCH",)))
    refused = make_token(make_user(datasets=("GLBX.MDP3",)))
    for _ in range(2):
        assert client.get(f"/v1/ohlcv?symbol=AAPL&token={allowed}").status_code == 200
    assert client.get(f"/v1/ohlcv?symbol=AAPL&token={refused}").status_code == 404


def _rates(settings, **rates):
    settings.REST_FRAMEWORK = {
        **django_settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"principal": None, "ip": None, **rates},
    }


def test_429_with_retry_after_per_token(client, symbols, settings, make_user, make_token):
    _rates(settings, principal="3/min")
    user = make_user(staff=True)
    first, second = make_token(user), make_token(user)
    codes = [client.get(f"/v1/symbols?token={first}").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    refused = client.get(f"/v1/ohlcv?symbol=AAPL&token={first}")
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 60
    error = body(refused)["error"]
    assert error["code"] == "rate_limited"
    assert f"retry in {refused['Retry-After']} s" in error["message"]
    # Another token has its own allowance.
    assert client.get(f"/v1/symbols?token={second}").status_code == 200


def test_429_with_retry_after_per_ip(client, symbols, settings):
    _rates(settings, ip="2/hour")
    assert [client.get("/v1/symbols", REMOTE_ADDR="10.1.1.1").status_code for _ in range(3)] == [200, 200, 429]
    refused = client.get("/v1/symbols", REMOTE_ADDR="10.1.1.1")
    assert 1 <= int(refused["Retry-After"]) <= 3600
    assert client.get("/v1/symbols", REMOTE_ADDR="10.1.1.2").status_code == 200


def test_rate_limits_let_requests_through_when_redis_is_down(client, symbols, settings):
    _rates(settings, ip="1/hour")
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    assert [client.get("/v1/symbols").status_code for _ in range(3)] == [200, 200, 200]
