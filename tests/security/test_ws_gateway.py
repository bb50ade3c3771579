"""The same limits through the real server (streaming.server, daphne) and real WebSocket clients.

- a socket over its user's cap is closed 4029 and the close frame says why (daphne drops
  an ASGI close's reason; the gateway's server sends it);
- a socket whose token is revoked through update() (no signal) is closed 4001;
- a gateway that shuts down leaves no pub/sub subscription in Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from websockets.exceptions import ConnectionClosed

from marketdata.models import ApiToken, Entitlement, Symbol
from marketdata.services.api_tokens import api_token_create
from streaming import protocol
from streaming.consumers import ERR_CREDENTIALS_GONE, ERR_USER_SOCKETS
from tests.chaos.stack import gateway_start
from tests.streaming.test_e2e import READY_S, Gateway, subprocess_env, ws_connect

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("redis_client")]

LIMIT = 2
ENV = {"STREAMING_ALLOW_ANONYMOUS": "false", "WS_MAX_CONNECTIONS_PER_USER": str(LIMIT)}


@pytest.fixture
def gateway(django_db_setup: None, tmp_path: Any) -> Iterator[Gateway]:
    started = gateway_start(subprocess_env(ENV), tmp_path / "limits.log", name="limits", timeout=READY_S, kind=Gateway)
    try:
        yield started
    finally:
        started.stop(timeout=10)


@pytest.fixture
def token(transactional_db: None) -> str:
    Symbol.objects.create(ticker="AAPL", dataset="XNAS.ITCH")
    user = get_user_model().objects.create_user(f"trader{time.monotonic_ns()}")
    Entitlement.objects.create(user=user, dataset="XNAS.ITCH")
    return api_token_create(user=user, name="test")[1]


async def closed(ws: Any, wait: float = 10.0) -> tuple[int | None, str | None]:
    """Read until the server closes: its close code and reason."""
    try:
        async with asyncio.timeout(wait):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (None, None)
    raise AssertionError("unreachable")


def channels() -> set[Any]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return set(client.pubsub_channels(f"{settings.CHANNELS_PREFIX}*"))
    finally:
        client.close()


async def test_over_the_cap_the_close_frame_says_why(gateway, token):
    held = [await ws_connect(gateway, f"?token={token}") for _ in range(LIMIT)]
    for client in held:
        assert (await client.recv())["type"] == "welcome"
    extra = await ws_connect(gateway, f"?token={token}")
    assert await closed(extra.ws) == (protocol.CLOSE_RATE, ERR_USER_SOCKETS.format(limit=LIMIT))
    for client in held:
        await client.close()


async def test_revoked_through_update_closes_the_real_socket_4001(gateway, token):
    client = await ws_connect(gateway, f"?token={token}")
    assert (await client.recv())["type"] == "welcome"
    await sync_to_async(lambda: ApiToken.objects.update(revoked=True))()
    assert await closed(client.ws) == (protocol.CLOSE_UNAUTHENTICATED, ERR_CREDENTIALS_GONE)


async def test_a_gateway_shutting_down_leaves_no_subscription(gateway, token):
    before = channels()
    clients = [await ws_connect(gateway, f"?token={token}") for _ in range(LIMIT)]
    for client in clients:
        assert (await client.recv())["type"] == "welcome"
        await client.send({"op": "subscribe", "id": 1, "streams": ["bars:1m:AAPL"]})
        await client.recv_type("subscribed")
    assert len(channels() - before) >= LIMIT + 1  # each socket's channel and the stream's group
    await asyncio.to_thread(gateway.stop, 10)
    # The process has exited: Redis holds none of its subscriptions.
    assert gateway.proc.poll() is not None
    assert channels() <= before
    for client in clients:
        assert (await closed(client.ws))[0] in (1001, 1006, None)
