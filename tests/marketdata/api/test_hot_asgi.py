"""GET /v1/ohlcv through the gateway's ASGI application: the event loop's fast path and Django agree.

These run the real config.asgi HTTP application (the fast path in front of Django's WSGI
handler in worker threads), so the data must be committed: transactional tests.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import orjson
import pytest
from django.conf import settings as django_settings
from django.core.signals import request_started

from config.asgi import django_http_app, http_app
from marketdata.cache.local import EPOCH_KEY
from marketdata.models import ApiToken
from marketdata.services.bars_trades import BarIn
from ops import metrics

from .conftest import T0, P, minute_bars

pytestmark = pytest.mark.django_db(transaction=True)
CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"


def call(
    app: Any, query: str, *, token: str | None = None, headers: tuple = (), client: str = "10.0.0.9"
) -> tuple[int, dict[str, str], bytes]:
    """One GET /v1/ohlcv?<query> through an ASGI app: status, headers (lower-case), body."""
    return asyncio.run(acall(app, query, token=token, headers=headers, client=client))


async def acall(
    app: Any, query: str, *, token: str | None = None, headers: tuple = (), client: str = "10.0.0.9"
) -> tuple[int, dict[str, str], bytes]:
    """call(), in the running event loop."""
    raw = [(b"host", b"testserver"), *headers]
    if token is not None:
        raw.append((b"authorization", f"Token {token}".encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/v1/ohlcv", "raw_path": b"/v1/ohlcv", "query_string": query.encode(), "root_path": "",
        "headers": raw, "client": (client, 5000), "server": ("testserver", 80),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


@pytest.fixture(autouse=True)
def redis_not_down() -> None:
    """No test inherits another's pause after a Redis failure."""
    http_app._redis_down_until = 0.0


@pytest.fixture
def setup(make_symbol, make_user, make_token, write_bars):
    symbol = make_symbol("AAPL")
    write_bars(minute_bars(symbol, 30))
    return symbol, make_token(make_user(datasets=("XNAS.ITCH",)))


class Started:
    """Counts Django's request_started: a request the fast path answers never starts Django's cycle."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, **kwargs: Any) -> None:
        self.count += 1

    def __enter__(self) -> Started:
        request_started.connect(self)
        return self

    def __exit__(self, *exc: object) -> None:
        request_started.disconnect(self)


QUERY = "symbol=AAPL&tf=1m&limit=10"


def teach(token: str) -> None:
    """The fast path's first token request of a host and scheme (after a settings change too) is Django's.

    Django's answer teaches it the headers of a 200 and makes the token known here.
    """
    assert call(http_app, "symbol=AAPL&tf=1m&limit=1", token=token)[0] == 200


def test_a_known_token_is_answered_in_the_event_loop_as_django_answers(setup):
    _, token = setup
    teach(token)
    with Started() as started:
        django = call(django_http_app, QUERY, token=token)  # Django resolves and remembers the token
        missed = call(http_app, QUERY, token=token)  # computed by the fast path (this process knows the token)
        hit = call(http_app, QUERY, token=token, headers=((b"x-request-id", b"chart-42"),))
    assert started.count == 1
    for status, headers, body in (missed, hit):
        assert status == 200
        assert body == django[2]
        assert {k: v for k, v in headers.items() if k != "x-request-id"} == {
            k: v for k, v in django[1].items() if k != "x-request-id"
        }
    assert hit[1]["x-request-id"] == "chart-42"
    assert len(orjson.loads(hit[2])["results"]) == 10


def test_a_bar_written_after_a_cached_read_is_seen_at_once(setup, write_bars):
    symbol, token = setup
    call(django_http_app, QUERY, token=token)
    for _ in range(2):
        call(http_app, QUERY, token=token)
    write_bars([BarIn(symbol.pk, "1m", T0 + timedelta(minutes=30), 1, P, P, P, 77 * P, 1)])
    status, _, body = call(http_app, QUERY, token=token)
    assert status == 200
    assert orjson.loads(body)["results"][-1]["close"] == 77


def test_rate_limits_count_each_request_once_and_refuse_with_retry_after(setup, settings, redis_client):
    _, token = setup
    settings.REST_FRAMEWORK = {
        **django_settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"principal": "4/min", "ip": None},
    }
    answers = [call(http_app, QUERY, token=token) for _ in range(2)]
    # Another process changed a token: the next request is counted by the fast path, which then hands it
    # to Django (the epoch changed), which must not count it again.
    redis_client.set(EPOCH_KEY, "changed elsewhere")
    answers += [call(http_app, QUERY, token=token) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 200, 429, 429]
    _status, headers, body = answers[-1]
    assert 1 <= int(headers["retry-after"]) <= 60
    assert orjson.loads(body)["error"]["code"] == "rate_limited"


def test_an_ip_over_its_failed_authentication_limit_is_refused_as_django_refuses_it(setup, settings):
    _, token = setup
    settings.AUTH_FAILURES_PER_IP = "3/min"  # a settings change: the fast path learns its headers again
    teach(token)
    for _ in range(3):
        assert call(http_app, QUERY, token="mdg_not-a-token", client="10.0.0.66")[0] == 401
    with Started() as started:
        fast = call(http_app, QUERY, token=token, client="10.0.0.66")
        django = call(django_http_app, QUERY, token=token, client="10.0.0.66")
        other_ip = call(http_app, QUERY, token=token)
    # The blocked IP's request went to Django (the fast path declined it); the other IP's was answered in the loop.
    assert started.count == 2
    assert fast[0] == django[0] == 429
    assert abs(int(fast[1]["retry-after"]) - int(django[1]["retry-after"])) <= 1
    assert orjson.loads(fast[2])["error"]["code"] == orjson.loads(django[2])["error"]["code"] == "rate_limited"
    assert other_ip[0] == 200


def test_a_token_revoked_through_the_orm_is_refused_at_once(setup):
    _, token = setup
    for _ in range(2):
        assert call(http_app, QUERY, token=token)[0] == 200
    row = ApiToken.objects.get()
    row.revoked = True
    row.save()
    status, _headers, body = call(http_app, QUERY, token=token)
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == "unauthenticated"


def test_refusals_and_bad_parameters_are_djangos(setup, make_user, make_token):
    _, token = setup
    call(http_app, QUERY, token=token)
    assert call(http_app, "symbol=AAPL&limit=0", token=token)[0] == 400
    assert call(http_app, "symbol=NOPE", token=token)[0] == 404
    other = make_token(make_user(datasets=("GLBX.MDP3",)))
    call(http_app, QUERY, token=other)
    status, _, body = call(http_app, QUERY, token=other)
    assert status == 404
    assert orjson.loads(body)["error"] == {
        "code": "unknown_symbol",
        "message": "unknown symbol 'AAPL'",
        "field": "symbol",
    }
    assert call(http_app, QUERY, token="not-a-token")[0] == 401


EXTREME_QUERIES = [
    "symbol=AAPL&end=9999-12-31T23:59:59Z", "symbol=AAPL&start=0001-01-01T00:00:00%2B01:00",
    "symbol=AAPL&start=1970-01-01T00:00:00Z&end=2262-04-11T23:47:16Z&tf=4h", "symbol=AA%00PL", "symbol=AAPL%01",
    "symbol=%FF", "symbol=AAPL&tf=1m&foo=%FF", "symbol=AAPL&limit=" + "9" * 40, "symbol=AAPL&limit=-1",
    "symbol=AAPL&cursor=djE6MjUyNDU1NDQzMTk5OTk5OTk5", "symbol=AAPL&cursor=djE6MA%01",
    "symbol=AAPL&start=" + "9" * 5000, "symbol=AAPL&tf=1m%00", "symbol=AAPL&anomalies=%C3%28", "symbol=" + "A" * 71,
]  # fmt: skip


@pytest.mark.parametrize("query", EXTREME_QUERIES)
def test_extreme_parameters_answer_as_django_does(setup, query):
    _, token = setup
    call(django_http_app, QUERY, token=token)  # the token and the symbol are known to the fast path now
    fast = call(http_app, query, token=token)
    django = call(django_http_app, query, token=token)
    assert fast[0] == django[0] < 500
    assert fast[2] == django[2]
    assert fast[1]["content-type"] == "application/json"


def test_a_symbol_not_entitled_answers_as_an_unknown_one_on_both_paths(setup, make_symbol, make_user, make_token):
    make_symbol("ESH4", dataset="GLBX.MDP3")
    token = make_token(make_user(datasets=("XNAS.ITCH",)))
    call(django_http_app, QUERY, token=token)
    call(django_http_app, "symbol=ESH4", token=token)  # ESH4 is known to this process now
    answers = {app: call(app, "symbol=ESH4&tf=1m", token=token) for app in (http_app, django_http_app)}
    assert {a[0] for a in answers.values()} == {404}
    assert (
        answers[http_app][2]
        == answers[django_http_app][2]
        == call(django_http_app, "symbol=ESH5", token=token)[2].replace(b"ESH5", b"ESH4")
    )


def test_a_bug_in_the_fast_path_is_a_500_in_the_envelope_with_the_request_id(setup, monkeypatch):
    from marketdata.api import hot

    _, token = setup
    for _ in range(2):
        assert call(http_app, QUERY, token=token)[0] == 200  # cached; the next is a hit served by the fast path

    def broken(*args: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(hot, "cache_read", broken)
    with Started() as started:
        status, headers, body = call(http_app, QUERY, token=token, headers=((b"x-request-id", b"chart-500"),))
    assert started.count == 0
    assert status == 500
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == "chart-500"
    error = orjson.loads(body)["error"]
    assert error["code"] == "internal"
    assert "chart-500" in error["message"]
    assert b"secret" not in body


def test_with_redis_down_the_answer_comes_from_the_database(setup, settings):
    _, token = setup
    good = call(http_app, QUERY, token=token)
    redis_url = settings.REDIS_URL
    settings.REDIS_URL = CLOSED_PORT_REDIS
    errors = metrics.CACHE_ERRORS.labels("get")._value.get()
    for _ in range(3):
        status, _, body = call(http_app, QUERY, token=token)
        assert (status, body) == (200, good[2])
    assert metrics.CACHE_ERRORS.labels("get")._value.get() > errors
    # Redis back: after the pause the fast path serves again.
    settings.REDIS_URL = redis_url
    http_app._redis_down_until = 0.0
    teach(token)  # a settings change: the fast path learns its headers again
    with Started() as started:
        assert call(http_app, QUERY, token=token)[2] == good[2]
    assert started.count == 0


def test_requests_are_counted_by_route(setup):
    _, token = setup
    call(http_app, QUERY, token=token)
    before = metrics.HTTP_REQUESTS.labels("v1/ohlcv", "GET", "2xx")._value.get()
    hits = metrics.API_CACHE.labels("ohlcv", "hit")._value.get()
    for _ in range(3):
        call(http_app, QUERY, token=token)
    assert metrics.HTTP_REQUESTS.labels("v1/ohlcv", "GET", "2xx")._value.get() == before + 3
    assert metrics.API_CACHE.labels("ohlcv", "hit")._value.get() >= hits + 2


def test_concurrent_misses_of_one_page_share_one_query(setup, monkeypatch):
    import time

    from marketdata.api import hot

    _, token = setup
    answer = hot._answer

    def slow_answer(*args: Any) -> Any:
        # The query outlasts the other four's Redis reads, however busy the machine: a read
        # returning after the shared query ended would (rightly) run its own, and miss.
        time.sleep(0.3)
        return answer(*args)

    monkeypatch.setattr(hot, "_answer", slow_answer)
    call(django_http_app, QUERY, token=token)  # the token and the symbol are known in this process now
    other = "symbol=AAPL&tf=1m&limit=11"  # a page nobody has read
    misses = metrics.API_CACHE.labels("ohlcv", "miss")._value.get()
    coalesced = metrics.API_CACHE.labels("ohlcv", "coalesced")._value.get()

    async def together() -> list[tuple[int, dict[str, str], bytes]]:
        return await asyncio.gather(*(acall(http_app, other, token=token) for _ in range(5)))

    answers = asyncio.run(together())
    expected = call(django_http_app, other, token=token)[2]
    assert [(status, body) for status, _, body in answers] == [(200, expected)] * 5
    assert metrics.API_CACHE.labels("ohlcv", "miss")._value.get() == misses + 1
    assert metrics.API_CACHE.labels("ohlcv", "coalesced")._value.get() == coalesced + 4


def test_the_gateway_keeps_what_it_loaded_out_of_the_collectors_walks():
    # config.asgi (imported above, as the gateway imports it) froze what was loaded by then:
    # an oldest-generation collection no longer walks Django and the modules (~70 ms stalls).
    import gc
    import sys

    import config.asgi  # noqa: F401
    from ops import runtime

    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold()[0] == runtime.GC_THRESHOLD
    assert sys.getswitchinterval() == pytest.approx(runtime.SWITCH_INTERVAL_S)


# ONE REQUEST PATH: the same requests through the fast path and Django, compared whole.

PARITY_CASES = [
    ("a cached page", QUERY, "good", ()),
    ("a page with the client's request id", QUERY, "good", ((b"x-request-id", b"client-7"),)),
    ("another page", "symbol=AAPL&tf=1m&limit=3&anomalies=exclude", "good", ()),
    ("a bad parameter", "symbol=AAPL&limit=0", "good", ()),
    ("an unknown symbol", "symbol=NOPE", "good", ()),
    ("a symbol not entitled", "symbol=ESH4", "good", ()),
    ("a bad token", QUERY, "mdg_not-a-token", ()),
    ("a malformed Authorization header", QUERY, None, ((b"authorization", b"Token a b"),)),
    ("no credentials", QUERY, None, ()),
    ("a token in the query", QUERY + "&token={good}", None, ()),
]


@pytest.mark.parametrize(("case", "query", "credential", "headers"), PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_the_fast_path_answers_every_request_exactly_as_django(setup, make_symbol, case, query, credential, headers):
    """Status, every header and the bytes; the request id too where the client gave one."""
    _, good = setup
    make_symbol("ESH4", dataset="GLBX.MDP3")
    teach(good)
    call(django_http_app, "symbol=ESH4", token=good)  # ESH4 known to this process: the fast path could serve it
    token = good if credential == "good" else credential
    query = query.format(good=good)
    call(http_app, query, token=token, headers=headers)  # both answer from the cache that this fills
    with Started() as started:
        fast = call(http_app, query, token=token, headers=headers, client="10.0.0.21")
    django = call(django_http_app, query, token=token, headers=headers, client="10.0.0.22")
    assert fast[0] == django[0]
    assert fast[2] == django[2]
    given = dict(headers).get(b"x-request-id")
    strip = set() if given else {"x-request-id"}
    fast_headers = {k: v for k, v in fast[1].items() if k not in strip}
    assert fast_headers == {k: v for k, v in django[1].items() if k not in strip}
    if case in ("a cached page", "a page with the client's request id", "another page", "a token in the query"):
        assert started.count == 0, "answered in the event loop"


# Every middleware of MIDDLEWARE, and why its request side cannot answer a token GET of /v1/ohlcv
# differently from the fast path (which answers without Django's request side).
REQUEST_SIDE_CHECKED = {
    "ops.checks.StartupChecks": "production settings: runs once at start, then out of the chain",
    "ops.middleware.RequestContextMiddleware": "the request id: the fast path binds its own",
    "ops.middleware.MetricsMiddleware": "response side: the fast path counts and times the route itself",
    "django.middleware.security.SecurityMiddleware": "the HTTPS redirect: checked per request (_prepare)",
    "config.csp.CSPMiddleware": "response side: headers learned from Django's answer",
    "whitenoise.middleware.WhiteNoiseMiddleware": "static paths only",
    "marketdata.routers.PrimaryPinMiddleware": "pins reads after a session's write, never a token GET's",
    "django.contrib.sessions.middleware.SessionMiddleware": "nothing for a token GET",
    "django.middleware.common.CommonMiddleware": "DISALLOWED_USER_AGENTS and PREPEND_WWW turn the fast path off",
    "django.middleware.csrf.CsrfViewMiddleware": "nothing for a GET",
    "django.contrib.auth.middleware.AuthenticationMiddleware": "DRF's token authentication comes first",
    "django.contrib.messages.middleware.MessageMiddleware": "nothing for a token GET",
    "django.middleware.clickjacking.XFrameOptionsMiddleware": "response side: headers learned from Django's answer",
    "axes.middleware.AxesMiddleware": "login requests only",
}


def test_every_middleware_s_request_side_was_checked_for_the_fast_path():
    """A middleware added needs the same check, in marketdata.api.hot, before it joins REQUEST_SIDE_CHECKED."""
    assert set(django_settings.MIDDLEWARE) <= REQUEST_SIDE_CHECKED.keys()
