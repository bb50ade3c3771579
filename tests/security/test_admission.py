"""Fair admission (ops/admission.py): one client address queues behind itself, not in front of others.

The middleware's rules with an application whose requests finish when the test says so,
then the gateway as deployed (config.asgi.application) with the real PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.testing import HttpCommunicator
from django.test import override_settings

from config.asgi import application
from ops.admission import CLOSE_TOO_MANY, Admission, later_turn
from tests.streaming.wsclient import Client

pytestmark = [pytest.mark.django_db(transaction=True)]


class Held:
    """An ASGI app whose HTTP requests answer 200 only when released; WebSockets are accepted at once."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release: dict[str, asyncio.Event] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        name = scope["path"]
        self.started.append(name)
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await self.release.setdefault(name, asyncio.Event()).wait()
            return
        await self.release.setdefault(name, asyncio.Event()).wait()
        if name.endswith("boom"):
            raise RuntimeError("the application failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def finish(self, name: str) -> None:
        self.release.setdefault(name, asyncio.Event()).set()


def http(path: str, ip: str = "10.0.0.1") -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "headers": [], "client": (ip, 50000), "query_string": b""}


async def request(app: Admission, path: str, ip: str = "10.0.0.1") -> list[dict[str, Any]]:
    """Run one request through the middleware; the messages it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(http(path, ip), receive, send)
    return sent


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_address_is_served_in_flight_at_once_and_the_rest_in_order() -> None:
    held = Held()
    app = Admission(held, in_flight=2, queue=10)
    tasks = [asyncio.create_task(request(app, f"/r{i}")) for i in range(5)]
    await settle()
    assert held.started == ["/r0", "/r1"]
    held.finish("/r1")
    await settle()
    assert held.started == ["/r0", "/r1", "/r2"]
    for name in ("/r0", "/r2", "/r3", "/r4"):
        held.finish(name)
        await settle()
    assert held.started == ["/r0", "/r1", "/r2", "/r3", "/r4"]
    for task in tasks:
        assert (await task)[0]["status"] == 200
    assert app.addresses == {}, "an idle address is forgotten"


async def test_other_addresses_do_not_wait_for_a_busy_one() -> None:
    held = Held()
    app = Admission(held, in_flight=1, queue=10)
    busy = [asyncio.create_task(request(app, f"/busy{i}", "10.0.0.1")) for i in range(3)]
    other = asyncio.create_task(request(app, "/other", "10.0.0.2"))
    await settle()
    assert held.started == ["/busy0", "/other"]
    for name in ("/other", "/busy0", "/busy1", "/busy2"):
        held.finish(name)
    await asyncio.gather(*busy, other)


async def test_over_the_queue_an_http_request_is_refused_429_with_retry_after() -> None:
    held = Held()
    app = Admission(held, in_flight=1, queue=1)
    first, second = asyncio.create_task(request(app, "/a")), asyncio.create_task(request(app, "/b"))
    await settle()
    refused = await request(app, "/c")
    assert held.started == ["/a"], "the refused request never reached the application"
    start, body = refused
    assert start["status"] == 429
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"1"
    assert headers[b"content-type"] == b"application/json"
    error = json.loads(body["body"])["error"]
    assert error["code"] == "rate_limited"
    assert "at most 1 served and 1 waiting" in error["message"]
    held.finish("/a")
    held.finish("/b")
    await asyncio.gather(first, second)
    assert app.addresses == {}


async def test_over_the_queue_a_websocket_is_closed_4029_with_a_reason() -> None:
    held = Held()
    app = Admission(held, in_flight=1, queue=0)
    first = asyncio.create_task(request(app, "/a"))
    await settle()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [], "client": ("10.0.0.1", 50001)}
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[1]["code"] == CLOSE_TOO_MANY
    assert "too many requests in flight" in sent[1]["reason"]
    held.finish("/a")
    await first


async def test_a_websocket_holds_its_turn_only_until_its_handshake_ends() -> None:
    held = Held()
    app = Admission(held, in_flight=1, queue=10)
    accepted: list[str] = []

    async def socket(path: str) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            accepted.append(path)

        await app({"type": "websocket", "path": path, "headers": [], "client": ("10.0.0.1", 1)}, receive, send)

    sockets = [asyncio.create_task(socket(f"/ws{i}")) for i in range(3)]
    await settle()
    assert accepted == ["/ws0", "/ws1", "/ws2"], "three open sockets, handshaken one after another"
    for i in range(3):
        held.finish(f"/ws{i}")
    await asyncio.gather(*sockets)
    assert app.addresses == {}


async def test_a_failing_request_gives_its_turn_back() -> None:
    held = Held()
    app = Admission(held, in_flight=1, queue=10)
    failing = asyncio.create_task(request(app, "/boom"))
    after = asyncio.create_task(request(app, "/after"))
    await settle()
    held.finish("/boom")
    with pytest.raises(RuntimeError):
        await failing
    held.finish("/after")
    assert (await after)[0]["status"] == 200
    assert app.addresses == {}


async def test_a_waiting_request_whose_client_left_leaves_nothing_behind() -> None:
    held = Held()
    app = Admission(held, in_flight=1, queue=10)
    first = asyncio.create_task(request(app, "/a"))
    gone = asyncio.create_task(request(app, "/gone"))
    last = asyncio.create_task(request(app, "/last"))
    await settle()
    gone.cancel()
    await settle()
    assert len(app.addresses["10.0.0.1"].waiting) == 1
    held.finish("/a")
    await settle()
    assert held.started == ["/a", "/last"], "the turn skipped the request that left"
    held.finish("/last")
    await asyncio.gather(first, last)
    assert gone.cancelled()
    assert app.addresses == {}


async def test_a_turn_handed_to_a_request_as_it_leaves_is_passed_on() -> None:
    held = Held()
    tasks: dict[str, asyncio.Task[Any]] = {}

    class LeavesAtHandover(Admission):
        def release(self, key: str, address: Any) -> None:
            super().release(key, address)
            if not tasks["/gone"].done():
                tasks["/gone"].cancel()  # its turn was just handed over; it has not run yet

    app = LeavesAtHandover(held, in_flight=1, queue=10)
    for name in ("/a", "/gone", "/last"):
        tasks[name] = asyncio.create_task(request(app, name))
    await settle()
    held.finish("/a")
    await settle()
    assert held.started == ["/a", "/last"]
    held.finish("/last")
    await asyncio.gather(tasks["/a"], tasks["/last"])
    assert tasks["/gone"].cancelled()
    assert app.addresses == {}


async def test_a_request_that_left_and_was_passed_over_before_it_knew_leaves_nothing_behind() -> None:
    held = Held()
    app = Admission(held, in_flight=1, queue=10)
    first = asyncio.create_task(request(app, "/a"))
    gone = asyncio.create_task(request(app, "/gone"))
    last = asyncio.create_task(request(app, "/last"))
    await settle()
    held.finish("/a")  # /a wakes first, and hands its turn over before /gone's handler runs:
    gone.cancel()  # /gone's turn is cancelled at once, so the handover passes it over, to /last
    await settle()
    assert gone.cancelled(), "it ends cancelled, not with an error of the middleware"
    assert held.started == ["/a", "/last"]
    held.finish("/last")
    await asyncio.gather(first, last)
    assert app.addresses == {}


async def test_zero_in_flight_turns_admission_off() -> None:
    held = Held()
    app = Admission(held, in_flight=0, queue=0)
    tasks = [asyncio.create_task(request(app, f"/r{i}")) for i in range(3)]
    await settle()
    assert held.started == ["/r0", "/r1", "/r2"]
    for i in range(3):
        held.finish(f"/r{i}")
    await asyncio.gather(*tasks)
    assert app.addresses == {}


# THE GATEWAY AS DEPLOYED


async def test_later_work_of_a_socket_of_a_busy_address_waits_and_others_do_not() -> None:
    """A busy address's socket waits for its turn after the handshake; another address's does not; no refusal."""
    held, done = Held(), []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await held(scope, receive, send)
            return
        await receive()
        await send({"type": "websocket.accept"})
        await held.release.setdefault("go" + scope["client"][0], asyncio.Event()).wait()
        async with later_turn(scope):
            done.append(scope["client"][0])

    admission = Admission(app, in_flight=1, queue=0)

    def socket(ip: str) -> asyncio.Task[None]:
        connect = iter([{"type": "websocket.connect"}])

        async def receive() -> dict[str, Any]:
            return next(connect)

        async def send(message: dict[str, Any]) -> None:
            pass

        return asyncio.create_task(admission({**http("/ws", ip), "type": "websocket"}, receive, send))

    sockets = [socket("10.0.0.1"), socket("10.0.0.2")]
    await settle()  # both accepted: their handshakes' turns are over
    busy = asyncio.create_task(request(admission, "/busy", "10.0.0.1"))
    await settle()
    held.finish("go10.0.0.1")
    held.finish("go10.0.0.2")
    await settle()
    assert done == ["10.0.0.2"], "the busy address's socket waits (not refused, though the queue is 0)"
    held.finish("/busy")
    await asyncio.wait_for(asyncio.gather(busy, *sockets), 5)
    assert done == ["10.0.0.2", "10.0.0.1"]
    assert admission.addresses == {}


async def test_later_work_takes_no_turn_without_admission() -> None:
    async with later_turn({"type": "websocket"}):
        pass
    done = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        async with later_turn(scope):
            done.append(scope["path"])

    connect = iter([{"type": "websocket.connect"}])

    async def receive() -> dict[str, Any]:
        return next(connect)

    async def send(message: dict[str, Any]) -> None:
        pass

    await Admission(app, in_flight=0, queue=0)({**http("/ws"), "type": "websocket"}, receive, send)
    assert done == ["/ws"]


def test_the_gateway_is_served_through_admission() -> None:
    assert isinstance(application, Admission)


PEER = ("192.0.2.7", 40000)


@override_settings(ADMISSION_IN_FLIGHT_PER_IP=1, STREAMING_ALLOW_ANONYMOUS=True)
async def test_open_sockets_do_not_hold_their_address_s_turn() -> None:
    """With one handshake at a time per address, sockets still open one after another, and a request follows."""
    clients = []
    try:
        for _ in range(3):
            client = Client(client=PEER)
            assert (await client.connect())["type"] == "welcome"
            clients.append(client)
        response = await peer_get("/healthz")
        assert response["status"] == 200
    finally:
        for client in clients:
            await client.close()


@override_settings(ADMISSION_IN_FLIGHT_PER_IP=1, ADMISSION_QUEUE_PER_IP=0)
async def test_the_gateway_refuses_over_the_queue_with_the_error_envelope() -> None:
    """A request whose body has not all come holds the address's one turn; the next is refused before Django."""
    scope = {**HttpCommunicator(application, "POST", "/v1/ohlcv").scope, "client": PEER}
    held = ApplicationCommunicator(application, scope)
    await held.send_input({"type": "http.request", "body": b"", "more_body": True})
    try:
        assert await held.receive_nothing(0.2)
        response = await peer_get("/healthz")
        assert response["status"] == 429
        assert dict(response["headers"])[b"retry-after"] == b"1"
        assert json.loads(response["body"])["error"]["code"] == "rate_limited"
        other = HttpCommunicator(application, "GET", "/healthz")
        other.scope["client"] = ("192.0.2.8", 40000)
        assert (await other.get_response(timeout=10))["status"] == 200, "another address is served"
    finally:
        await held.send_input({"type": "http.request", "body": b"", "more_body": False})
        assert (await held.receive_output(10))["type"] == "http.response.start"
        await held.wait(10)
    assert (await peer_get("/healthz"))["status"] == 200, "the turn came back"


@override_settings(ADMISSION_IN_FLIGHT_PER_IP=1, STREAMING_ALLOW_ANONYMOUS=True)
async def test_an_open_socket_s_subscribe_waits_while_its_address_is_busy() -> None:
    """The gateway serves a socket's requests in its address's turns: held while a request of the address is."""
    client = Client(client=PEER)
    assert (await client.connect())["type"] == "welcome"
    scope = {**HttpCommunicator(application, "POST", "/v1/ohlcv").scope, "client": PEER}
    held = ApplicationCommunicator(application, scope)
    await held.send_input({"type": "http.request", "body": b"", "more_body": True})
    try:
        await client.send({"op": "ping", "id": 7})
        assert await client.nothing(0.3), "the ping waits for the address's turn"
    finally:
        await held.send_input({"type": "http.request", "body": b"", "more_body": False})
        assert (await held.receive_output(10))["type"] == "http.response.start"
        await held.wait(10)
    try:
        assert (await client.recv())["type"] == "pong"
    finally:
        await client.close()
    assert application.addresses == {}, "the socket's turns and its teardown's were all given back"


async def peer_get(path: str) -> dict[str, Any]:
    communicator = HttpCommunicator(application, "GET", path)
    communicator.scope["client"] = PEER
    return await communicator.get_response(timeout=10)
