"""Fair admission: one client address cannot fill the gateway's event loop with its work.

An ASGI middleware around the whole gateway (HTTP and WebSocket). Per client address
(``ops.clientip``: the peer, or the trusted proxy header), at most
``ADMISSION_IN_FLIGHT_PER_IP`` requests or WebSocket handshakes are served at once; the
next ones wait, first come first served, and up to ``ADMISSION_QUEUE_PER_IP`` of them may
wait. Over that, an HTTP request is answered 429 with ``Retry-After`` and the JSON error
envelope, a WebSocket closed 4029 with a reason, before any of the product's work.

Why: asyncio runs every ready callback of an iteration before it looks at the sockets
again. 100 requests in flight from one flooding address put hundreds of callbacks in each
iteration, and a well-behaved client's handshake, welcome and subscribe each waited for a
whole iteration: 300 ms where a quiet gateway answers in 5 (bench/abuse.py). Waiting
here is a future per request, no callback until its turn, so an iteration holds at most
the in-flight work of each address. The flooder is not refused (its requests are served
at the rate the gateway can serve them); it is only made to queue behind itself.

A WebSocket counts from its handshake until the application accepts or closes it. What an
open socket asks for afterwards (a subscribe, an auth) and its teardown take a turn of the
same address too, through ``later_turn(scope)``: they wait in the same queue but are never
refused (the consumer's own limits bound them: streams, message rate, the inbox, the
per-user and per-address socket caps). Without that, 10 sockets of one address each
sending a 100-stream subscribe, or 100 sockets closed at their auth deadline at once,
filled an iteration as a flood of handshakes did. Delivery of published frames takes no
turn: it is never made to wait behind its own address's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from django.conf import settings

from ops import metrics
from ops.clientip import scope_client_ip

# ASGI's callables, as loosely typed as the servers and frameworks that call them.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
App = Callable[[Any, Any, Any], Awaitable[None]]

RETRY_AFTER_S = 1
CLOSE_TOO_MANY = 4029
REFUSAL = "too many requests in flight from this client address: at most {n} served and {q} waiting"
HANDSHAKE_DONE = frozenset({"websocket.accept", "websocket.close", "websocket.http.response.start"})
SCOPE_KEY = "marketdata.admission"  # in a WebSocket's scope: its address's turns after the handshake


class _Address:
    """One client address's turns: how many are being served, and who waits, in order."""

    __slots__ = ("serving", "waiting")

    def __init__(self) -> None:
        self.serving = 0
        self.waiting: deque[asyncio.Future[None]] = deque()


class Admission:
    """The middleware (see the module's docstring). ``in_flight`` and ``queue`` default to the settings."""

    def __init__(self, app: App, in_flight: int | None = None, queue: int | None = None) -> None:
        self.app = app
        self._in_flight, self._queue = in_flight, queue
        self.addresses: dict[str, _Address] = {}

    @property
    def in_flight(self) -> int:
        return self._in_flight if self._in_flight is not None else int(settings.ADMISSION_IN_FLIGHT_PER_IP)

    @property
    def queue(self) -> int:
        return self._queue if self._queue is not None else int(settings.ADMISSION_QUEUE_PER_IP)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        in_flight = self.in_flight
        if kind not in ("http", "websocket") or in_flight <= 0:
            await self.app(scope, receive, send)
            return
        key = scope_client_ip(scope)
        address = self.addresses.get(key)
        if address is None:
            address = self.addresses[key] = _Address()
        if address.serving < in_flight:
            address.serving += 1
        elif len(address.waiting) >= self.queue:
            self._forget_if_idle(key, address)
            metrics.ADMISSION_REFUSED.labels(kind).inc()
            await self._refuse(kind, receive, send)
            return
        else:
            metrics.ADMISSION_WAITED.labels(kind).inc()
            await self._wait_turn(key, address)
        turn = _Turn(self, key, address)
        if kind == "websocket":
            scope[SCOPE_KEY] = _Later(self, key)
        try:
            await self.app(scope, receive, turn.watch(send) if kind == "websocket" else send)
        finally:
            turn.end()

    async def take(self, key: str) -> _Address:
        """A turn of the address, waiting for it in order if it must; never refused (see ``later_turn``)."""
        address = self.addresses.get(key)
        if address is None:
            address = self.addresses[key] = _Address()
        if address.serving < self.in_flight:
            address.serving += 1
        else:
            await self._wait_turn(key, address)
        return address

    async def _wait_turn(self, key: str, address: _Address) -> None:
        """Wait until a finishing request hands this one its turn (its count already taken over)."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        address.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release(key, address)  # handed a turn just as it went: pass it on
            else:
                if turn in address.waiting:  # a release may have passed over it already
                    address.waiting.remove(turn)
                self._forget_if_idle(key, address)
            raise

    def release(self, key: str, address: _Address) -> None:
        """One request of the address is done: the next waiting one takes its turn, else the count drops."""
        while address.waiting:
            turn = address.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        address.serving -= 1
        self._forget_if_idle(key, address)

    def _forget_if_idle(self, key: str, address: _Address) -> None:
        if address.serving <= 0 and not address.waiting and self.addresses.get(key) is address:
            del self.addresses[key]

    async def _refuse(self, kind: str, receive: Receive, send: Send) -> None:
        reason = REFUSAL.format(n=self.in_flight, q=self.queue)
        if kind == "websocket":
            if (await receive()).get("type") == "websocket.connect":
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "code": CLOSE_TOO_MANY, "reason": reason})
            return
        body = orjson.dumps({"error": {"code": "rate_limited", "message": reason, "field": None}})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Turn:
    """One admitted request's turn, given back once: when it ends or, for a WebSocket, when its handshake does."""

    __slots__ = ("address", "admission", "ended", "key")

    def __init__(self, admission: Admission, key: str, address: _Address) -> None:
        self.admission, self.key, self.address = admission, key, address
        self.ended = False

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.admission.release(self.key, self.address)

    def watch(self, send: Send) -> Send:
        async def watched(message: Message) -> None:
            if not self.ended and message.get("type") in HANDSHAKE_DONE:
                self.end()
            await send(message)

        return watched


class _Later:
    """An admitted WebSocket's address, for the turns its work takes after the handshake."""

    __slots__ = ("admission", "key")

    def __init__(self, admission: Admission, key: str) -> None:
        self.admission, self.key = admission, key

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        address = await self.admission.take(self.key)
        try:
            yield
        finally:
            self.admission.release(self.key, address)


def later_turn(scope: Scope) -> contextlib.AbstractAsyncContextManager[None]:
    """A turn of the socket's address for work after its handshake (no wait without admission).

    Take it only once the handshake's own turn has ended (the socket accepted or closed):
    with one turn per address, waiting for a second while holding the first never ends.
    """
    later = scope.get(SCOPE_KEY)
    return later.turn() if later is not None and later.admission.in_flight > 0 else contextlib.nullcontext()
