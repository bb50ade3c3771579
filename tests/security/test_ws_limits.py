"""What one WebSocket client can cost, and what a closed one leaves behind (issue 17, findings 2, 4, 6).

- every close, whoever made it (the client, 4001, 4003, 4008, 4029, an error), releases the
  connection's Redis subscriptions and tasks, and logs no error;
- sockets are capped per user and per anonymous client IP (4029 with a reason), announced
  in `welcome`; failed authentication is throttled per IP;
- a subscribe's work ends with its connection; a resume past any real seq is a protocol
  error, not a Redis command in an error message.
Over the full ASGI stack with the real PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import override_settings

from marketdata.models import ApiToken, Entitlement, Symbol
from marketdata.services.api_tokens import api_token_create
from streaming import protocol
from streaming.consumers import ERR_IP_SOCKETS, ERR_USER_SOCKETS
from tests.streaming.wsclient import Client, bar_data, publish

pytestmark = [pytest.mark.django_db(transaction=True)]

AAPL, ESH4 = "bars:1m:AAPL", "bars:1m:ESH4"
SETTLE_S = 5.0
PRODUCTION_LIKE = override_settings(STREAMING_ALLOW_ANONYMOUS=False, WS_AUTH_DEADLINE_S=1)


@pytest.fixture
def symbols(transactional_db: None) -> dict[str, Symbol]:
    return {
        "AAPL": Symbol.objects.create(ticker="AAPL", dataset="XNAS.ITCH"),
        "ESH4": Symbol.objects.create(ticker="ESH4", dataset="GLBX.MDP3"),
    }


def make_user(*datasets: str) -> Any:
    user = get_user_model().objects.create_user(f"trader{time.monotonic_ns()}")
    for dataset in datasets:
        Entitlement.objects.create(user=user, dataset=dataset)
    return user


def token_of(user: Any) -> str:
    return api_token_create(user=user, name="test")[1]


async def _sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await sync_to_async(fn)(*args, **kwargs)


def layer_channels(client: redis.Redis) -> set[bytes | str]:
    """The pub/sub channels the gateway (this process) holds in Redis: its connections' and groups'."""
    return set(client.pubsub_channels(f"{settings.CHANNELS_PREFIX}*"))


def _tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


async def settled(redis_client: redis.Redis, channels: set[bytes | str], tasks: int) -> None:
    """Wait (bounded) until Redis holds no more channels and the loop no more tasks than before."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        if layer_channels(redis_client) <= channels and len(_tasks()) <= tasks:
            return
        await asyncio.sleep(0.05)
    left = [t.get_coro() for t in _tasks()]
    raise AssertionError(f"left behind: channels {layer_channels(redis_client) - channels}, tasks {left}")


async def until_closed(client: Client, wait: float = 6.0) -> int | None:
    deadline = time.monotonic() + wait
    while True:
        message = await client.recv(wait=max(0.1, deadline - time.monotonic()))
        if message["type"] == "__closed__":
            return message["code"]


async def _client_close(user: Any) -> int | None:
    client = Client(f"/ws/v1/stream?token={await _sync(token_of, user)}")
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [AAPL]})
    await client.recv_type("subscribed", skip=("status",))
    await client.close()
    return None


async def _auth_deadline(user: Any) -> int | None:
    client = Client()
    await client.connect()
    code = await until_closed(client)
    await client.close()
    return code


async def _revoked(user: Any) -> int | None:
    client = Client(f"/ws/v1/stream?token={await _sync(token_of, user)}")
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [AAPL]})
    await client.recv_type("subscribed", skip=("status",))
    await _sync(lambda: ApiToken.objects.filter(user=user).update(revoked=True))
    code = await until_closed(client)
    await client.close()
    return code


async def _entitlement_lost(user: Any) -> int | None:
    client = Client(f"/ws/v1/stream?token={await _sync(token_of, user)}")
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [AAPL]})
    await client.recv_type("subscribed", skip=("status",))
    await _sync(lambda: Entitlement.objects.filter(user=user).delete())
    code = await until_closed(client)
    await client.close()
    return code


async def _message_rate(user: Any) -> int | None:
    client = Client(f"/ws/v1/stream?token={await _sync(token_of, user)}")
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [AAPL]})
    for i in range(settings.WS_MAX_MESSAGES_PER_S * settings.WS_RATE_CLOSE_FACTOR + 1):
        await client.send({"op": "ping", "id": i})
    code = await until_closed(client)
    await client.close()
    return code


async def _slow_consumer(user: Any) -> int | None:
    # A socket that never drains: the transport extension says it holds a lot.
    client = Client(
        f"/ws/v1/stream?token={await _sync(token_of, user)}",
        extensions={"marketdata.transport": {"buffered": lambda: 10**9}},
    )
    connected, _ = await client.comm.connect(timeout=5)
    assert connected
    await client.send({"op": "subscribe", "id": 1, "streams": [AAPL]})
    await asyncio.sleep(0.5)
    for i in range(6):
        publish(AAPL, [bar_data(i * 10 + j) for j in range(10)])
    code = await until_closed(client)
    await client.close()
    return code


async def _over_the_cap(user: Any) -> int | None:
    token = await _sync(token_of, user)
    first = Client(f"/ws/v1/stream?token={token}")
    await first.connect()
    second = Client(f"/ws/v1/stream?token={token}")
    code = (await second.connect())["code"]
    await second.close()
    await first.close()
    return code


@PRODUCTION_LIKE
@override_settings(WS_MAX_CONNECTIONS_PER_USER=1, WS_SEND_QUEUE=50, WS_MAX_MESSAGES_PER_S=5)
@pytest.mark.parametrize(
    ("close", "code"),
    [
        (_client_close, None),
        (_auth_deadline, protocol.CLOSE_UNAUTHENTICATED),
        (_revoked, protocol.CLOSE_UNAUTHENTICATED),
        (_entitlement_lost, protocol.CLOSE_REFUSED),
        (_message_rate, protocol.CLOSE_RATE),
        (_slow_consumer, protocol.CLOSE_SLOW_CONSUMER),
        (_over_the_cap, protocol.CLOSE_RATE),
    ],
)
async def test_every_kind_of_close_releases_subscriptions_and_tasks(symbols, redis_client, caplog, close, code):
    user = await _sync(make_user, "XNAS.ITCH")
    # Warm up: the channel layer's reader and the hub are per process, not per connection.
    await _client_close(await _sync(make_user, "XNAS.ITCH"))
    await asyncio.sleep(1.5)  # the hub's timer ends with its last connection
    channels, tasks = layer_channels(redis_client), len(_tasks())
    caplog.set_level(logging.WARNING)
    for _ in range(3):  # a leak would grow with each
        assert await close(user) == code
        await settled(redis_client, channels, tasks)
        await _sync(lambda: ApiToken.objects.filter(user=user).update(revoked=False))
        await _sync(lambda: Entitlement.objects.get_or_create(user=user, dataset="XNAS.ITCH"))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or "cleaning-up" in r.getMessage()]
    assert not errors, [r.getMessage() for r in errors]


@PRODUCTION_LIKE
async def test_sixty_sockets_left_to_the_auth_deadline_leave_nothing(symbols, redis_client, caplog):
    await _client_close(await _sync(make_user, "XNAS.ITCH"))  # the process's own reader and hub
    await asyncio.sleep(1.5)
    channels, tasks = layer_channels(redis_client), len(_tasks())
    clients = [Client(client=(f"10.0.0.{i}", 4000)) for i in range(60)]
    for client in clients:
        await client.connect()
    assert len(layer_channels(redis_client)) >= len(channels) + 60
    codes = await asyncio.gather(*(until_closed(c, wait=8) for c in clients))
    assert set(codes) == {protocol.CLOSE_UNAUTHENTICATED}
    for client in clients:
        await client.close()
    await asyncio.sleep(1.5)
    await settled(redis_client, channels, tasks)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@PRODUCTION_LIKE
@override_settings(WS_MAX_CONNECTIONS_PER_USER=3)
async def test_sockets_per_user_are_capped_across_tokens_and_freed_on_close(symbols, redis_client):
    user = await _sync(make_user, "XNAS.ITCH")
    tokens = [await _sync(token_of, user) for _ in range(2)]
    clients = [Client(f"/ws/v1/stream?token={tokens[i % 2]}") for i in range(3)]
    welcomes = [await c.connect() for c in clients]
    assert welcomes[0]["limits"]["max_connections_per_user"] == 3
    extra = Client(f"/ws/v1/stream?token={tokens[1]}")
    await extra.connect()
    message = await extra.comm.receive_output(5) if extra.closed_code is None else None
    assert extra.closed_code == protocol.CLOSE_RATE or (message and message["code"] == protocol.CLOSE_RATE)
    await extra.close()
    # Another user is not affected; a closed socket frees its place.
    other = Client(f"/ws/v1/stream?token={await _sync(token_of, await _sync(make_user, 'XNAS.ITCH'))}")
    assert (await other.connect())["type"] == "welcome"
    await clients[0].close()
    again = Client(f"/ws/v1/stream?token={tokens[0]}")
    assert (await again.connect())["type"] == "welcome"
    for client in (*clients[1:], other, again):
        await client.close()


@PRODUCTION_LIKE
@override_settings(WS_MAX_CONNECTIONS_PER_USER=2)
async def test_the_refusal_over_the_cap_says_why(symbols, redis_client):
    token = await _sync(token_of, await _sync(make_user, "XNAS.ITCH"))
    held = [Client(f"/ws/v1/stream?token={token}") for _ in range(2)]
    for client in held:
        await client.connect()
    extra = Client(f"/ws/v1/stream?token={token}")
    connected, _ = await extra.comm.connect(timeout=5)
    assert connected
    close = await extra.comm.receive_output(5)
    assert close == {"type": "websocket.close", "code": 4029, "reason": ERR_USER_SOCKETS.format(limit=2)}
    for client in (*held, extra):
        await client.close()


@PRODUCTION_LIKE
@override_settings(WS_MAX_ANON_CONNECTIONS_PER_IP=2, WS_AUTH_DEADLINE_S=10)
async def test_sockets_without_credentials_are_capped_per_client_ip(symbols, redis_client):
    held = [Client(client=("10.1.1.1", 5000 + i)) for i in range(2)]
    for client in held:
        assert (await client.connect())["limits"]["max_anon_connections_per_ip"] == 2
    extra = Client(client=("10.1.1.1", 6000))
    connected, _ = await extra.comm.connect(timeout=5)
    assert connected
    close = await extra.comm.receive_output(5)
    assert close == {"type": "websocket.close", "code": 4029, "reason": ERR_IP_SOCKETS.format(limit=2)}
    # Another address is not affected; a spoofed X-Forwarded-For is not trusted by default.
    other = Client(client=("10.1.1.2", 5000), headers=[(b"x-forwarded-for", b"10.9.9.9")])
    assert (await other.connect())["type"] == "welcome"
    spoofed = Client(client=("10.1.1.1", 7000), headers=[(b"x-forwarded-for", b"10.9.9.9")])
    await spoofed.comm.connect(timeout=5)
    assert (await spoofed.comm.receive_output(5))["code"] == 4029
    # Authenticating moves a socket from its address's count to its user's.
    token = await _sync(token_of, await _sync(make_user, "XNAS.ITCH"))
    await held[0].send({"op": "auth", "id": 1, "token": token})
    assert await held[0].recv() == {"type": "authenticated", "id": 1}
    third = Client(client=("10.1.1.1", 8000))
    assert (await third.connect())["type"] == "welcome"
    for client in (*held, extra, other, spoofed, third):
        await client.close()


@PRODUCTION_LIKE
@override_settings(AUTH_FAILURES_PER_IP="3/min")
async def test_failed_authentication_is_throttled_per_ip(symbols, redis_client):
    for i in range(3):
        client = Client(f"/ws/v1/stream?token=bad{i}", client=("10.2.2.2", 5000 + i))
        assert (await client.connect())["code"] == protocol.CLOSE_UNAUTHENTICATED
        await client.close()
    token = await _sync(token_of, await _sync(make_user, "XNAS.ITCH"))
    # Over the limit, even a good token waits: the address is refused before any look-up.
    blocked = Client(f"/ws/v1/stream?token={token}", client=("10.2.2.2", 6000))
    await blocked.comm.connect(timeout=5)
    close = await blocked.comm.receive_output(5)
    assert close["code"] == protocol.CLOSE_RATE
    assert "retry after" in close["reason"]
    await blocked.close()
    # The auth op counts too, and is refused with rate_limited.
    client = Client(client=("10.2.2.2", 7000), headers=[])
    # (anonymous is off, so the socket opens unauthenticated with the deadline running)
    await client.connect()
    await client.send({"op": "auth", "id": 1, "token": token})
    reply = await client.recv()
    assert (reply["type"], reply["code"]) == ("error", protocol.RATE_LIMITED)
    await client.close()
    fine = Client(f"/ws/v1/stream?token={token}", client=("10.2.2.3", 5000))
    assert (await fine.connect())["type"] == "welcome"
    await fine.close()


async def test_a_resume_past_any_real_seq_is_a_protocol_error(symbols, redis_client):
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [AAPL], "resume": {AAPL: 2**64 - 1}})
    error = await client.recv()
    assert (error["type"], error["code"], error["message"]) == ("error", protocol.BAD_JSON, protocol.ERR_RESUME)
    await client.send({"op": "subscribe", "id": 2, "streams": [AAPL], "resume": {AAPL: protocol.MAX_SEQ}})
    reply = await client.recv_type("resumed")
    assert "XRANGE" not in str(reply).upper()
    await client.close()


async def test_a_subscribe_naming_a_hundred_unknown_symbols_ends_with_its_connection(symbols, redis_client):
    await _client_close(await _sync(make_user, "XNAS.ITCH"))  # the process's own reader and hub
    await asyncio.sleep(1.5)
    channels, tasks = layer_channels(redis_client), len(_tasks())
    for _ in range(5):
        client = Client()
        await client.connect()
        await client.send({"op": "subscribe", "id": 1, "streams": [f"bars:1m:NOPE{i}" for i in range(100)]})
        await client.close()
    await asyncio.sleep(1.5)
    await settled(redis_client, channels, tasks)
    # Served in full when the client stays: one error per name.
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [f"bars:1m:NOPE{i}" for i in range(100)]})
    errors = [await client.recv() for _ in range(100)]
    assert {e["code"] for e in errors} == {protocol.UNKNOWN_SYMBOL}
    await client.close()


def slow_writes(app: Any, seconds: float) -> Any:
    """The ASGI app behind a server that takes ``seconds`` to write each frame (a busy process)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> Any:
        async def slow_send(message: dict[str, Any]) -> None:
            if message["type"] == "websocket.send":
                await asyncio.sleep(seconds)
            await send(message)

        return await app(scope, receive, slow_send)

    return wrapped


@override_settings(WS_SEND_QUEUE=100)
async def test_a_client_that_keeps_up_is_not_closed_for_a_burst_the_server_writes_slowly(symbols, redis_client):
    # The client's socket is always drained (buffered 0), but the server takes 2 ms a
    # frame: six batches of 100 published back to back queue up 600 messages, six times
    # WS_SEND_QUEUE. That backlog is the server's; the client gets every message.
    from channels.testing import WebsocketCommunicator

    from config.asgi import application

    client = Client()
    client.comm = WebsocketCommunicator(slow_writes(application, 0.002), "/ws/v1/stream")
    client.comm.scope["extensions"] = {"marketdata.transport": {"buffered": lambda: 0}}
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [AAPL]})
    await client.recv_type("subscribed", skip=("status",))
    for n in range(6):
        publish(AAPL, [bar_data(n * 100 + j) for j in range(100)])
    seqs: list[int] = []
    while len(seqs) < 600:
        message = await client.recv(wait=10)
        assert message["type"] != "__closed__", message
        if message["type"] == "bar":
            seqs.append(message["seq"])
    assert seqs == list(range(1, 601))
    await client.close()
