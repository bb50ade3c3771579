"""Who may open the stream (SPEC section 5, Auth): tokens, sessions, entitlements, origins, the auth deadline.

Over Channels' WebsocketCommunicator on the full ASGI stack (the session middleware
included); test_e2e.py runs the same refusals through daphne with a real client.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client as DjangoClient
from django.test import override_settings
from django.utils import timezone

from marketdata.models import ApiToken, Entitlement, Symbol
from marketdata.services.api_tokens import api_token_create
from streaming import protocol
from tests.streaming.wsclient import Client, bar_data, publish

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("redis_client")]

STREAM = "bars:1m:AAPL"
GOOD_ORIGIN = "http://good.example"
PRODUCTION_LIKE = override_settings(
    STREAMING_ALLOW_ANONYMOUS=False, WS_AUTH_DEADLINE_S=1, WS_ALLOWED_ORIGINS=[GOOD_ORIGIN]
)


@pytest.fixture
def symbols(transactional_db: None) -> dict[str, Symbol]:
    return {
        "AAPL": Symbol.objects.create(ticker="AAPL", dataset="XNAS.ITCH"),
        "ESH4": Symbol.objects.create(ticker="ESH4", dataset="GLBX.MDP3"),
    }


@pytest.fixture
def make_user(symbols: dict[str, Symbol]):
    counter = iter(range(1_000_000))

    def make(*datasets: str, **fields: Any) -> Any:
        user = get_user_model().objects.create_user(f"user{next(counter)}", **fields)
        for dataset in datasets:
            Entitlement.objects.create(user=user, dataset=dataset)
        return user

    return make


async def _sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await sync_to_async(fn)(*args, **kwargs)


def token_of(user: Any, **kwargs: Any) -> str:
    return api_token_create(user=user, name="test", **kwargs)[1]


def session_of(user: Any) -> str:
    browser = DjangoClient()
    browser.force_login(user)
    return browser.cookies[settings.SESSION_COOKIE_NAME].value


def cookie(session: str) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", f"{settings.SESSION_COOKIE_NAME}={session}".encode())]


async def closed_with(client: Client) -> int | None:
    """Read until the server closes (bounded by recv's wait); its close code."""
    while (message := await client.recv())["type"] != "__closed__":
        pass
    return message["code"]


async def streams(client: Client) -> None:
    """The client may subscribe to STREAM and gets its messages."""
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM]})
    assert (await client.recv_type("subscribed", skip=("welcome", "heartbeat", "status")))["stream"] == STREAM
    publish(STREAM, [bar_data(0)])
    assert (await client.recv_type("bar"))["stream"] == STREAM


@PRODUCTION_LIKE
async def test_no_credentials_get_unauthenticated_errors_then_4001_at_the_deadline(symbols):
    client = Client()
    welcome = await client.connect()
    assert (welcome["authenticated"], welcome["limits"]["auth_deadline_s"]) == (False, 1)
    await client.send({"op": "ping", "id": 1})
    assert await client.recv() == {"type": "pong", "id": 1}  # ping needs no credentials
    for op in ("subscribe", "unsubscribe"):
        await client.send({"op": op, "id": 2, "streams": [STREAM]})
        error = await client.recv()
        assert (error["type"], error["id"], error["code"]) == ("error", 2, protocol.UNAUTHENTICATED)
    assert await closed_with(client) == protocol.CLOSE_UNAUTHENTICATED


@PRODUCTION_LIKE
@pytest.mark.parametrize("how", ["query", "token header", "bearer header", "auth op", "session"])
async def test_each_kind_of_credentials_opens_the_stream(make_user, how):
    user = await _sync(make_user, "XNAS.ITCH")
    token = await _sync(token_of, user)
    if how == "query":
        client = Client(f"/ws/v1/stream?token={token}")
    elif how == "token header":
        client = Client(headers=[(b"authorization", f"Token {token}".encode())])
    elif how == "bearer header":
        client = Client(headers=[(b"authorization", f"Bearer {token}".encode())])
    elif how == "session":
        client = Client(headers=cookie(await _sync(session_of, user)))
    else:
        client = Client()
    welcome = await client.connect()
    assert welcome["authenticated"] is (how != "auth op")
    if how == "auth op":
        await client.send({"op": "auth", "id": 4, "token": token})
        assert await client.recv() == {"type": "authenticated", "id": 4}
    await streams(client)
    await client.close()


@PRODUCTION_LIKE
async def test_authenticating_in_time_lifts_the_deadline(make_user):
    token = await _sync(token_of, await _sync(make_user, "XNAS.ITCH"))
    client = Client()
    await client.connect()
    await client.send({"op": "auth", "token": token})
    assert await client.recv() == {"type": "authenticated"}
    assert await client.nothing(2.5)  # past the deadline: still open, nothing sent
    await client.send({"op": "ping", "id": 1})
    assert await client.recv() == {"type": "pong", "id": 1}
    await client.close()


@PRODUCTION_LIKE
async def test_a_bad_auth_op_is_an_error_and_a_good_one_may_follow(make_user):
    token = await _sync(token_of, await _sync(make_user, "XNAS.ITCH"))
    client = Client()
    await client.connect()
    await client.send({"op": "auth", "id": 1, "token": "nope"})
    error = await client.recv()
    assert (error["type"], error["id"], error["code"]) == ("error", 1, protocol.UNAUTHENTICATED)
    await client.send({"op": "auth", "id": 2, "token": token})
    assert await client.recv() == {"type": "authenticated", "id": 2}
    await streams(client)
    await client.close()


def _unusable_tokens(make_user: Any) -> dict[str, str]:
    user = make_user("XNAS.ITCH")
    revoked = token_of(user)
    ApiToken.objects.filter(user=user).update(revoked=True)
    return {
        "unknown": "bad",
        "revoked": revoked,
        "expired": token_of(user, expires_at=timezone.now() - timedelta(seconds=1)),
        "inactive user": token_of(make_user("XNAS.ITCH", is_active=False)),
    }


@PRODUCTION_LIKE
async def test_unusable_tokens_are_closed_4001(make_user):
    tokens = await _sync(_unusable_tokens, make_user)
    for token in tokens.values():
        client = Client(f"/ws/v1/stream?token={token}")
        assert await client.connect() == {"type": "__closed__", "code": protocol.CLOSE_UNAUTHENTICATED}, token
    client = Client(headers=[(b"authorization", b"Token bad")])
    assert await client.connect() == {"type": "__closed__", "code": protocol.CLOSE_UNAUTHENTICATED}


@override_settings(STREAMING_ALLOW_ANONYMOUS=True)
async def test_a_bad_token_is_refused_even_where_anonymous_access_is_on(symbols):
    client = Client("/ws/v1/stream?token=bad")
    assert await client.connect() == {"type": "__closed__", "code": protocol.CLOSE_UNAUTHENTICATED}
    client = Client()
    assert (await client.connect())["authenticated"] is True
    await streams(client)
    await client.close()


@PRODUCTION_LIKE
async def test_entitlements_per_dataset(make_user):
    token = await _sync(token_of, await _sync(make_user, "GLBX.MDP3"))
    client = Client(f"/ws/v1/stream?token={token}")
    await client.connect()
    await client.send({"op": "subscribe", "id": 3, "streams": [STREAM, "bars:1m:ESH4"]})
    error = await client.recv()
    assert (await client.recv_type("subscribed"))["stream"] == "bars:1m:ESH4"
    # Refused exactly as a symbol that does not exist, so refusals tell nothing of what exists.
    await client.send({"op": "subscribe", "id": 3, "streams": ["bars:1m:ZZZZ"]})
    unknown = await client.recv_type("error")
    assert error == {**unknown, "stream": STREAM, "message": unknown["message"].replace("ZZZZ", "AAPL")}
    assert (error["type"], error["id"], error["code"]) == ("error", 3, "unknown_symbol")
    assert "XNAS" not in error["message"]
    await client.close()


@PRODUCTION_LIKE
async def test_staff_see_every_dataset(make_user):
    token = await _sync(token_of, await _sync(make_user, is_staff=True))
    client = Client(f"/ws/v1/stream?token={token}")
    await client.connect()
    await streams(client)
    await client.close()


@PRODUCTION_LIKE
async def test_no_entitlement_at_all_is_closed_4003(make_user):
    user = await _sync(make_user)
    token = await _sync(token_of, user)
    client = Client(f"/ws/v1/stream?token={token}")
    assert await client.connect() == {"type": "__closed__", "code": protocol.CLOSE_REFUSED}
    client = Client(headers=cookie(await _sync(session_of, user)))
    assert await client.connect() == {"type": "__closed__", "code": protocol.CLOSE_REFUSED}
    client = Client()
    await client.connect()
    await client.send({"op": "auth", "token": token})
    assert await closed_with(client) == protocol.CLOSE_REFUSED


@PRODUCTION_LIKE
async def test_origins_outside_ws_allowed_origins_are_closed_4003(make_user):
    token = await _sync(token_of, await _sync(make_user, "XNAS.ITCH"))
    for origin in ("http://evil.example", "https://good.example", "null"):
        client = Client(f"/ws/v1/stream?token={token}", headers=[(b"origin", origin.encode())])
        assert await client.connect() == {"type": "__closed__", "code": protocol.CLOSE_REFUSED}, origin
    client = Client(f"/ws/v1/stream?token={token}", headers=[(b"origin", GOOD_ORIGIN.encode())])
    assert (await client.connect())["authenticated"] is True
    await streams(client)
    await client.close()


@override_settings(WS_ALLOWED_ORIGINS=[], ALLOWED_HOSTS=["good.example"])
async def test_without_ws_allowed_origins_only_the_gateways_own_origin_is_allowed(symbols):
    # The gateway serves good.example:8000 over plain ws: another port or scheme on the
    # same host is another origin (another service there could hijack a trader's socket).
    host = [(b"host", b"good.example:8000")]
    cases = [
        ("http://good.example:8000", True),
        ("http://GOOD.example:8000/", True),
        ("http://good.example:3000", False),
        ("https://good.example:8000", False),
        ("http://good.example", False),
        ("http://evil.example:8000", False),
        ("null", False),
    ]
    for origin, allowed in cases:
        client = Client(headers=[*host, (b"origin", origin.encode())])
        welcome = await client.connect()
        assert (welcome["type"] == "welcome") is allowed, origin
        if allowed:
            await client.close()
        else:
            assert welcome["code"] == protocol.CLOSE_REFUSED
    # A Host the gateway does not serve makes no origin its own.
    client = Client(headers=[(b"host", b"evil.example:8000"), (b"origin", b"http://evil.example:8000")])
    assert (await client.connect())["code"] == protocol.CLOSE_REFUSED
