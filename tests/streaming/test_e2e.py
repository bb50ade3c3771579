"""End to end: the gateway (streaming.server, daphne) on loopback ports, real WebSocket clients.

The gateways run as subprocesses with the test settings, on pytest's test database and
the test Redis (same channels prefix), so they see what the tests commit and hear what
they publish. They start once per module, in parallel; every test flushes the database
and Redis as usual. No assertion here rests on a duration: waits are bounded, and
latency is only printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client as DjangoClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ingest.pipeline import BATCH_TRADES
from ingest.sources.replay import run_replay
from marketdata.models import Bar, Entitlement, Symbol
from marketdata.services.api_tokens import api_token_create
from marketdata.wire import trade_json
from streaming import protocol
from streaming.publish import Message, Publisher
from tests.chaos.stack import Proc, gateway_spawn, gateway_up, gateways_stop
from tests.ingest.dbnfile import bar as dbn_bar
from tests.ingest.dbnfile import metadata, write
from tests.streaming.wsclient import T0, bar_data

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("redis_client")]

ROOT = Path(__file__).resolve().parent.parent.parent
STREAM = "bars:1m:AAPL"
READY_S = 30.0  # a gateway's start, bounded
WAIT_S = 10.0  # any one message, bounded
GOOD_ORIGIN = "http://good.example"

# Each gateway's environment beyond the shared one.
GATEWAYS: dict[str, dict[str, str]] = {
    # Anonymous on; a small send queue and socket allowance, so a client that stops
    # reading overflows quickly (the slow-consumer test).
    "main": {"WS_SEND_QUEUE": "200", "WS_TRANSPORT_HIGH_BYTES": "16384"},
    # A second process on the same Redis (two gateways deliver the same seqs).
    "other": {},
    # Production-like access: credentials required, a one-second auth deadline, one origin.
    "auth": {"STREAMING_ALLOW_ANONYMOUS": "false", "WS_AUTH_DEADLINE_S": "1", "WS_ALLOWED_ORIGINS": GOOD_ORIGIN},
}


# -- gateways ------------------------------------------------------------------------


@dataclass
class Gateway(Proc):
    """One gateway subprocess on a loopback port."""

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/v1/stream"

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            return response.read().decode()

    def metric(self, name: str) -> float:
        """A sample of the gateway's /metrics, e.g. ``ws_closes_total{code="4008"}`` (0 when absent)."""
        for line in self.get("/metrics").splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        return 0.0


def _database_url() -> str:
    db = settings.DATABASES["default"]  # pytest-django has renamed it to the test database by now
    auth = quote(db["USER"] or "", safe="")
    if db.get("PASSWORD"):
        auth += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's settings for a child: the test database, Redis db and channels prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WS_", "STREAMING_", "PROMETHEUS_MULTIPROC"))}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=_database_url(),
        TEST_REDIS_URL=settings.REDIS_URL,
        CHANNELS_PREFIX=settings.CHANNELS_PREFIX,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def gateways(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Gateway]]:
    """Every gateway of GATEWAYS, started in parallel; stopped at the end of the module."""
    log_dir = tmp_path_factory.mktemp("gateways")
    spawned: list[Gateway] = []

    def spawn(name: str) -> Gateway:
        log = log_dir / f"{name}-{len(spawned)}.log"
        spawned.append(gateway_spawn(subprocess_env(GATEWAYS[name]), log, name=name, kind=Gateway))
        return spawned[-1]

    try:
        first = [spawn(name) for name in GATEWAYS]
        yield {g.name: gateway_up(g, partial(spawn, g.name), timeout=READY_S) for g in first}
    finally:
        gateways_stop(spawned)


# -- clients -------------------------------------------------------------------------


class WsClient:
    """A protocol client over a real WebSocket connection (the websockets library)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, body: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(body))

    async def recv(self, wait: float = WAIT_S) -> dict[str, Any]:
        # Prices as Decimal: the exact stored values are compared.
        return json.loads(await asyncio.wait_for(self.ws.recv(), wait), parse_float=Decimal)

    async def recv_type(
        self, kind: str, wait: float = WAIT_S, skip: tuple[str, ...] = ("welcome", "heartbeat", "status")
    ) -> dict[str, Any]:
        """The next message of a type; welcome, heartbeats and status may come first."""
        while True:
            message = await self.recv(wait)
            if message["type"] == kind:
                return message
            assert message["type"] in skip, message

    async def subscribe(self, streams: list[str], **options: Any) -> list[dict[str, Any]]:
        """Subscribe; the `subscribed` replies, one per stream."""
        await self.send({"op": "subscribe", "id": 1, "streams": streams, **options})
        return [await self.recv_type("subscribed") for _ in streams]

    async def close_code(self, wait: float = WAIT_S) -> int | None:
        """Read until the server closes; its close code (None when the TCP connection just ended)."""
        try:
            async with asyncio.timeout(wait):
                while True:
                    await self.ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.ws.close()


async def ws_connect(gateway: Gateway, query: str = "", **kwargs: Any) -> WsClient:
    kwargs = {"open_timeout": WAIT_S, "close_timeout": 2, "ping_interval": None, "compression": None,
              "proxy": None, **kwargs}  # fmt: skip
    return WsClient(await connect(gateway.url + query, **kwargs))


@pytest.fixture
async def clients() -> AsyncIterator[list[WsClient]]:
    """Connections a test opens, closed whatever happens."""
    opened: list[WsClient] = []
    yield opened
    for client in opened:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.ws.close(), 5)


@pytest.fixture
def open_client(gateways: dict[str, Gateway], clients: list[WsClient]):
    async def open_(name: str = "main", query: str = "", **kwargs: Any) -> WsClient:
        client = await ws_connect(gateways[name], query, **kwargs)
        clients.append(client)
        return client

    return open_


@pytest.fixture
def publisher() -> Iterator[Publisher]:
    p = Publisher()
    yield p
    p.close()


@pytest.fixture
def symbols(transactional_db: None) -> dict[str, Symbol]:
    return {
        "AAPL": Symbol.objects.create(ticker="AAPL", dataset="XNAS.ITCH"),
        "MSFT": Symbol.objects.create(ticker="MSFT", dataset="XNAS.ITCH"),
        "ESH4": Symbol.objects.create(ticker="ESH4", dataset="GLBX.MDP3"),
    }


def bars(stream: str, first: int, n: int) -> list[Message]:
    return [Message(stream, "bar", bar_data(i)) for i in range(first, first + n)]


async def collect(client: WsClient, kind: str, upto: int) -> list[dict[str, Any]]:
    """Stream messages until seq ``upto`` (heartbeats and status skipped)."""
    out: list[dict[str, Any]] = []
    while not out or out[-1]["seq"] < upto:
        out.append(await client.recv_type(kind))
    return out


async def wait_metric(gateway: Gateway, name: str, value: float, wait: float = WAIT_S) -> None:
    """Poll a gateway metric until it has a value (bounded)."""
    deadline = time.monotonic() + wait
    while (seen := await asyncio.to_thread(gateway.metric, name)) != value:
        assert time.monotonic() < deadline, f"{name} is {seen}, not {value}, after {wait} s"
        await asyncio.sleep(0.05)


# -- snapshot + stream, through the ingester ----------------------------------------


def _stored_bars() -> dict[str, tuple]:
    rows = Bar.objects.filter(symbol__ticker="AAPL", timeframe="1m").order_by("ts")
    return {
        r.ts.strftime("%Y-%m-%dT%H:%M:%SZ"): (r.open, r.high, r.low, r.close, r.volume)
        for r in rows.only("ts", "open", "high", "low", "close", "volume")
    }


def _as_stored(data: dict[str, Any]) -> tuple:
    def fixed(price: Decimal | int) -> int:
        value = Decimal(price) * 10**9
        assert value == int(value), price
        return int(value)

    return (fixed(data["open"]), fixed(data["high"]), fixed(data["low"]), fixed(data["close"]), data["volume"])


async def test_bars_replayed_through_the_ingester_snapshot_then_stream(gateways, open_client, tmp_path):
    T = 1704205800  # T0 in epoch seconds
    header = metadata(symbols={"AAPL": 7})
    history = write(tmp_path / "history.dbn", header, [dbn_bar(7, T + 60 * i, 100 + i) for i in range(5)])
    recent = write(tmp_path / "recent.dbn", header, [dbn_bar(7, T + 60 * i, 100 + i) for i in range(5, 9)])
    live = write(
        tmp_path / "live.dbn.zst", header, [dbn_bar(7, T + 60 * i, 100 + i, volume=50 + i) for i in range(9, 30)],
        zstd=True,
    )  # fmt: skip
    # Stored only (the snapshot's older part comes from the database), then stored and
    # published (its newer part from the replay buffer).
    await sync_to_async(run_replay)(paths=[history], speed=None, loop=False, symbols=None, publish=False,
                                    install_signals=False)  # fmt: skip
    await sync_to_async(run_replay)(paths=[recent], speed=None, loop=False, symbols=None, install_signals=False)

    client = await open_client()
    (reply,) = await client.subscribe([STREAM], snapshot=100)
    assert reply["seq"] == 4
    assert [b["close"] for b in reply["snapshot"]] == list(range(100, 109))

    # The real command, in its own process, while the client listens.
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "manage.py", "ingest", "replay", str(live), "--max"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    stream = await collect(client, "bar", 4 + 21)
    assert [m["seq"] for m in stream] == list(range(5, 26))  # no gap, no duplicate after the snapshot
    received = {b["ts"]: b for b in reply["snapshot"]}
    for message in stream:
        received[message["data"]["ts"]] = message["data"]  # a later message for a ts replaces it
    stored = await sync_to_async(_stored_bars)()
    assert len(stored) == 30
    assert {ts: _as_stored(b) for ts, b in received.items()} == stored
    assert all(b["final"] for b in received.values())


async def test_clients_subscribing_while_bars_are_published_miss_nothing(gateways, symbols, open_client, publisher):
    """Register, then fetch: whenever a client subscribes, snapshot + stream are every message once."""
    published = bars(STREAM, 0, 600)

    def publish_all() -> None:
        first = n = 0
        while first < len(published):
            size = 1 + n % 4  # batches of 1 to 4 messages
            publisher.publish(published[first : first + size])
            first, n = first + size, n + 1
            time.sleep(0.002)

    async def subscriber(delay: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        await asyncio.sleep(delay)
        client = await open_client()
        (reply,) = await client.subscribe([STREAM], snapshot=1000)
        stream = [] if reply["seq"] == len(published) else await collect(client, "bar", len(published))
        return reply, stream

    publishing = asyncio.create_task(asyncio.to_thread(publish_all))
    results = await asyncio.gather(*(subscriber(i * 0.04) for i in range(8)))
    await publishing
    everything = [json.loads(m.data, parse_float=Decimal) for m in published]
    for reply, stream in results:
        assert [m["seq"] for m in stream] == list(range(reply["seq"] + 1, len(published) + 1))
        assert reply["snapshot"] + [m["data"] for m in stream] == everything
    assert len({reply["seq"] for reply, _ in results}) > 1  # they did subscribe at different points


# -- resume, throttle ------------------------------------------------------------------


async def test_resume_recovers_a_gap_then_goes_live(gateways, symbols, open_client, publisher):
    client = await open_client()
    (reply,) = await client.subscribe([STREAM])
    assert reply["seq"] == 0
    publisher.publish(bars(STREAM, 0, 3))
    held = await collect(client, "bar", 3)
    await client.close()

    publisher.publish(bars(STREAM, 3, 2))  # missed while away
    publisher.publish(bars(STREAM, 5, 3))
    again = await open_client()
    await again.recv_type("welcome")
    await again.send({"op": "subscribe", "id": 7, "streams": [STREAM], "resume": {STREAM: held[-1]["seq"]}})
    replayed = [await again.recv_type("bar") for _ in range(5)]
    assert [m["seq"] for m in replayed] == [4, 5, 6, 7, 8]
    assert [m["data"]["close"] for m in replayed] == [103, 104, 105, 106, 107]
    assert await again.recv_type("resumed") == {"type": "resumed", "id": 7, "stream": STREAM, "recovered": True,
                                                 "seq": 8}  # fmt: skip
    publisher.publish(bars(STREAM, 8, 1))
    assert (await again.recv_type("bar"))["seq"] == 9


async def test_resume_older_than_the_buffer_gets_recovered_false_and_a_snapshot(
    gateways, symbols, open_client, publisher
):
    # 1,400 messages published 20 minutes ago, then 100 now: the trim as seq 1,500 is
    # reached (one every TRIM_EVERY = 500 seqs) keeps the last 1,000 (everything else it
    # holds is older than 10 minutes), so seq 6 is gone.
    from streaming.publish import BUFFER_MIN_MESSAGES, TRIM_EVERY

    old_count = 1400
    assert (old_count + 100) % TRIM_EVERY == 0
    assert old_count + 100 - BUFFER_MIN_MESSAGES > 6
    old = int((time.time() - 20 * 60) * 1000)
    for first in range(0, old_count, 100):
        publisher.publish(bars(STREAM, first, 100), now_ms=old)
    publisher.publish(bars(STREAM, old_count, 100))
    client = await open_client()
    await client.send({"op": "subscribe", "id": 2, "streams": [STREAM], "resume": {STREAM: 5}, "snapshot": 10})
    reply = await client.recv_type("resumed")
    assert (reply["id"], reply["recovered"], reply["seq"]) == (2, False, 1500)
    assert [b["close"] for b in reply["snapshot"]] == list(range(1590, 1600))
    publisher.publish(bars(STREAM, 1500, 1))
    assert (await client.recv_type("bar"))["seq"] == 1501
    # A resume the buffer still reaches is recovered.
    await client.send({"op": "subscribe", "id": 3, "streams": [STREAM], "resume": {STREAM: 1490}})
    replayed = [await client.recv_type("bar") for _ in range(11)]
    assert [m["seq"] for m in replayed] == list(range(1491, 1502))
    reply = await client.recv_type("resumed")
    assert (reply["id"], reply["recovered"], reply["seq"]) == (3, True, 1501)


async def test_throttle_conflates_to_the_latest_message(gateways, symbols, open_client, publisher):
    conflated = gateways["main"].metric("ws_messages_conflated_total")
    client = await open_client()
    await client.subscribe([STREAM], throttle_ms=1000)
    publisher.publish(bars(STREAM, 0, 10))  # one batch: only its latest message goes
    first = await client.recv_type("bar")
    assert (first["seq"], first["data"]["close"]) == (10, 109)
    for start in (10, 15, 20):  # within the next interval: held, each replacing the last
        publisher.publish(bars(STREAM, start, 5))
    second = await client.recv_type("bar")
    assert (second["seq"], second["data"]["close"]) == (25, 124)
    with pytest.raises(TimeoutError):
        await client.recv_type("bar", wait=1.2)
    assert gateways["main"].metric("ws_messages_conflated_total") == conflated + 9 + 14


# -- fan-out ---------------------------------------------------------------------------


async def test_two_gateway_processes_deliver_the_same_seqs(gateways, symbols, open_client, publisher):
    stream = "bars:1m:MSFT"
    one, two = await open_client("main"), await open_client("other")
    assert (await one.recv_type("welcome"))["authenticated"] is True  # anonymous access is on there
    assert (await one.subscribe([stream]))[0]["seq"] == (await two.subscribe([stream]))[0]["seq"] == 0
    for first in range(0, 60, 6):
        publisher.publish(bars(stream, first, 6))
    seen_one, seen_two = await collect(one, "bar", 60), await collect(two, "bar", 60)
    assert [m["seq"] for m in seen_one] == list(range(1, 61))
    assert [(m["seq"], m["data"]) for m in seen_one] == [(m["seq"], m["data"]) for m in seen_two]


async def test_a_client_that_stops_reading_is_closed_4008_and_another_is_unaffected(
    gateways, symbols, open_client, publisher
):
    gateway = gateways["main"]  # WS_SEND_QUEUE 200, WS_TRANSPORT_HIGH_BYTES 16384
    stream = "trades:AAPL"
    fast = await open_client()
    await fast.subscribe([stream])
    received: list[dict[str, Any]] = []
    pad = "x" * 4000
    batch = 50

    async def step(n: int) -> float:
        """Publish 50 messages of ~4 KB; seconds until the fast client has the last of them."""
        ts = T0 + timedelta(seconds=n)
        datas = [trade_json(ts, (100 + j) * 10**9, 1, "B")[:-1] + f',"pad":"{pad}"}}' for j in range(batch)]
        started = time.perf_counter()
        await asyncio.to_thread(publisher.publish, [Message(stream, "trade", d) for d in datas])
        received.extend(await collect(fast, "trade", len(received) + batch))
        return time.perf_counter() - started

    alone = [await step(n) for n in range(5)]

    # The slow client: a small receive buffer, and websockets stops reading its socket
    # once one message waits unread.
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", gateway.port))
    slow = await open_client(sock=raw, max_queue=1)
    await slow.subscribe([stream])
    slow_before = gateway.metric("ws_slow_consumer_closes_total")
    closes_before = gateway.metric('ws_closes_total{code="4008"}')

    # Publish in steps (each one the fast client reads whole) until the gateway gives up
    # on the slow client: its socket, the server's socket and WS_SEND_QUEUE fill first.
    beside: list[float] = []
    for n in range(5, 200):
        beside.append(await step(n))
        if gateway.metric("ws_slow_consumer_closes_total") > slow_before:
            break
    else:
        raise AssertionError(f"the slow client was not closed after {len(received)} messages")
    after = [await step(n) for n in range(200, 205)]  # the fast client goes on

    assert [m["seq"] for m in received] == list(range(1, len(received) + 1))
    assert gateway.metric("ws_slow_consumer_closes_total") == slow_before + 1
    assert gateway.metric('ws_closes_total{code="4008"}') == closes_before + 1
    # The close frame sits behind everything the slow client never read; the server drops
    # the connection when the closing handshake times out. Reading now, the client sees
    # either the close frame (4008) or the dropped connection.
    code = await slow.close_code(wait=30)
    assert code in (protocol.CLOSE_SLOW_CONSUMER, None)
    await wait_metric(gateway, "ws_connections", 1)  # the fast one; the slow one's resources are released
    # Its pub/sub subscription too: of the connections' own channels, only the fast one's is left.
    held = redis.Redis.from_url(settings.REDIS_URL).pubsub_channels(f"{settings.CHANNELS_PREFIX}specific.*")
    assert len(held) == 1, held

    def ms(xs: list[float]) -> str:
        return f"median {statistics.median(xs) * 1000:.1f} ms, max {max(xs) * 1000:.1f} ms"

    print(
        f"\nslow client closed after {len(beside)} steps of {batch} messages of ~4 KB (close frame seen: {code}); "
        f"fast client, publish to the last message of a step: alone {ms(alone)}; beside the slow client "
        f"{ms(beside)}; after it {ms(after)}"
    )


async def test_a_batch_larger_than_the_send_queue_reaches_a_client_that_keeps_up(
    gateways, symbols, open_client, publisher
):
    gateway = gateways["other"]  # WS_SEND_QUEUE at its default, 2,000
    stream = "trades:AAPL"
    client = await open_client("other")
    assert (await client.recv_type("welcome"))["limits"]["send_queue"] < BATCH_TRADES
    await client.subscribe([stream])
    slow_before = gateway.metric("ws_slow_consumer_closes_total")
    # The ingester's largest batch: one channel message of 5,000 frames for one stream.
    publisher.publish(
        [Message(stream, "trade", trade_json(T0, (100 + i) * 10**9, 1, "B")) for i in range(BATCH_TRADES)]
    )
    received = await collect(client, "trade", BATCH_TRADES)
    assert [m["seq"] for m in received] == list(range(1, BATCH_TRADES + 1))
    assert gateway.metric("ws_slow_consumer_closes_total") == slow_before


async def test_connections_and_subscriptions_are_released_however_clients_go(gateways, symbols, open_client, publisher):
    gateway = gateways["other"]
    await wait_metric(gateway, "ws_connections", 0)  # what earlier tests opened is gone
    polite, rude = await open_client("other"), await open_client("other")
    await polite.subscribe([STREAM, "trades:AAPL"])
    await rude.subscribe([STREAM])
    await wait_metric(gateway, "ws_connections", 2)
    await wait_metric(gateway, "ws_subscriptions", 3)

    await polite.close()  # a closing handshake
    transport = rude.ws.transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # a reset, no closing handshake
    await wait_metric(gateway, "ws_connections", 0)
    await wait_metric(gateway, "ws_subscriptions", 0)

    # The process still serves: a new client streams.
    client = await open_client("other")
    (reply,) = await client.subscribe([STREAM])
    publisher.publish(bars(STREAM, 0, 1))
    assert (await client.recv_type("bar"))["seq"] == reply["seq"] + 1


# -- access --------------------------------------------------------------------------


@dataclass
class Users:
    tokens: dict[str, str] = field(default_factory=dict)
    sessions: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def users(symbols: dict[str, Symbol]) -> Users:
    """Users entitled to XNAS.ITCH, to GLBX.MDP3 only, and to nothing; a token and a session each."""
    out = Users()
    for name, datasets in {"nasdaq": ["XNAS.ITCH"], "cme": ["GLBX.MDP3"], "nothing": []}.items():
        user = get_user_model().objects.create_user(username=name, password="pw-" + name)
        for dataset in datasets:
            Entitlement.objects.create(user=user, dataset=dataset)
        out.tokens[name] = api_token_create(user=user, name="e2e")[1]
        browser = DjangoClient()
        browser.force_login(user)
        out.sessions[name] = browser.cookies[settings.SESSION_COOKIE_NAME].value
    return out


async def test_without_valid_credentials_closed_4001(gateways, users, open_client):
    client = await open_client("auth")
    welcome = await client.recv()
    assert (welcome["type"], welcome["authenticated"], welcome["limits"]["auth_deadline_s"]) == ("welcome", False, 1)
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM]})
    error = await client.recv_type("error")
    assert (error["id"], error["code"]) == (1, "unauthenticated")
    assert await client.close_code() == protocol.CLOSE_UNAUTHENTICATED  # at the auth deadline
    client = await open_client("auth", "?token=bad")
    assert await client.close_code() == protocol.CLOSE_UNAUTHENTICATED
    client = await open_client("auth", additional_headers={"Authorization": "Token bad"})
    assert await client.close_code() == protocol.CLOSE_UNAUTHENTICATED


async def test_a_token_or_a_session_opens_the_stream(gateways, users, open_client, publisher):
    token, session = users.tokens["nasdaq"], users.sessions["nasdaq"]
    by_query = await open_client("auth", f"?token={token}")
    by_header = await open_client("auth", additional_headers={"Authorization": f"Token {token}"})
    by_session = await open_client("auth", additional_headers={"Cookie": f"sessionid={session}"})
    by_op = await open_client("auth")
    for client in (by_query, by_header, by_session):
        assert (await client.recv_type("welcome"))["authenticated"] is True
    assert (await by_op.recv_type("welcome"))["authenticated"] is False
    await by_op.send({"op": "auth", "id": "a", "token": token})
    assert await by_op.recv() == {"type": "authenticated", "id": "a"}
    everyone = (by_query, by_header, by_session, by_op)
    for client in everyone:
        await client.subscribe([STREAM])
    publisher.publish(bars(STREAM, 0, 1))
    for client in everyone:
        assert (await client.recv_type("bar"))["seq"] == 1


async def test_entitlements_per_dataset_and_none_at_all_closed_4003(gateways, users, open_client):
    client = await open_client("auth", f"?token={users.tokens['cme']}")
    await client.send({"op": "subscribe", "id": 3, "streams": [STREAM, "bars:1m:ESH4"]})
    error = await client.recv_type("error")
    # Answered as an unknown symbol: a refusal must not tell what exists.
    assert (error["id"], error["code"], error["stream"]) == (3, "unknown_symbol", STREAM)
    assert (await client.recv_type("subscribed"))["stream"] == "bars:1m:ESH4"

    client = await open_client("auth", f"?token={users.tokens['nothing']}")
    assert await client.close_code() == protocol.CLOSE_REFUSED
    client = await open_client("auth", additional_headers={"Cookie": f"sessionid={users.sessions['nothing']}"})
    assert await client.close_code() == protocol.CLOSE_REFUSED
    client = await open_client("auth")
    await client.recv_type("welcome")
    await client.send({"op": "auth", "token": users.tokens["nothing"]})
    assert await client.close_code() == protocol.CLOSE_REFUSED


async def test_origin_refused_4003_and_the_allowed_one_works(gateways, users, open_client):
    token = users.tokens["nasdaq"]
    client = await open_client("auth", f"?token={token}", origin="http://evil.example")
    assert await client.close_code() == protocol.CLOSE_REFUSED
    client = await open_client("auth", f"?token={token}", origin=GOOD_ORIGIN)
    assert (await client.recv_type("welcome"))["authenticated"] is True
    await client.subscribe([STREAM])
