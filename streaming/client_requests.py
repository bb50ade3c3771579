"""A connection's client messages: the inbox, then subscribe, unsubscribe, auth and ping, in order.

``ClientRequests`` is the part of ``streaming.consumers.StreamConsumer`` that serves what
the client asks for; it runs in the connection's request task (``_requests``), fed through
a bounded inbox by the receive loop, so a client cannot queue work faster than it is done
and nothing it asked for outlives the connection. Parsing and replies are
``streaming.protocol``'s; what a stream's delivery needs once it is open (the layer loop,
the send queue) is the consumer's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DatabaseError
from redis.exceptions import RedisError

from marketdata import access
from marketdata.auth_throttle import aauth_blocked, aauth_failed
from marketdata.errors import UnknownSymbolError, ValidationError
from marketdata.tokens import token_hash
from ops import metrics
from ops.admission import later_turn

from . import protocol
from .protocol import ProtocolError, Request
from .publish import message_frames
from .snapshot import snapshot
from .streams import Stream, group_name, stream_parse

if TYPE_CHECKING:
    from .hub import Credential, Hub

log = logging.getLogger("streaming.consumers")  # one logger for the connection's lines

UNAVAILABLE = "unavailable"  # Redis or the database failed while serving a request; try again
ERR_NO_ENTITLEMENT = "not entitled to any dataset"
ERR_AUTH_THROTTLED = "too many failed authentications from this address: retry after {seconds} s"
ERR_UNKNOWN_SYMBOL = "unknown symbol {ticker!r}"
ERR_SUBSCRIBE_UNAVAILABLE = "could not subscribe; try again"
ERR_INBOX_FULL = "more than {limit} messages waiting to be served: message ignored"
INBOX_SIZE = 32  # client messages waiting for the request task
OVER_RATE = object()  # in the inbox: a message refused by the rate limit
RESNAPSHOT_DEFAULT = 100  # items in a server-sent fresh snapshot for a stream subscribed without one


class Sub:
    """One stream of one connection."""

    __slots__ = ("dataset", "early", "group", "name", "next_at", "pending", "pending_t", "ready", "seq",
                 "snapshot_n", "stream", "throttle_s", "timer")  # fmt: skip

    def __init__(self, stream: Stream, dataset: str, throttle_ms: int, snapshot_n: int) -> None:
        self.stream = stream
        self.name = stream.name
        self.group = group_name(stream.name)
        self.dataset = dataset
        self.seq = 0  # the last seq given to the client (or conflated away)
        self.ready = False  # False until the snapshot is queued; frames wait in ``early``
        self.early: list[dict[str, Any]] = []
        self.throttle_s = throttle_ms / 1000
        self.snapshot_n = snapshot_n
        self.pending: str | None = None  # the latest frame waiting for its throttle interval
        self.pending_t: int | None = None
        self.next_at = 0.0
        self.timer: asyncio.TimerHandle | None = None


class ClientRequests:
    """Serving a connection's client messages (a base of StreamConsumer, which provides the rest)."""

    if TYPE_CHECKING:  # what the connection (StreamConsumer) provides
        hub: Hub
        subs: dict[str, Sub]
        inbox: asyncio.Queue[object]
        scope: dict[str, Any]
        loop: asyncio.AbstractEventLoop
        flow: asyncio.Lock
        channel_layer: Any
        channel_name: str
        allowed: set[str] | None
        authed: bool
        closed: bool
        ip: str
        window_start: float
        window_count: int

        def push(self, text: str) -> None: ...
        async def close(self, code: int, reason: str) -> None: ...
        async def _end(self, name: str) -> None: ...
        def _push_frames(self, frames: list[str], t: int | None, *, replay: bool = False) -> None: ...
        async def _apply(self, sub: Sub, first: int, frames: list[str], t: int | None) -> None: ...
        async def _token_user(self, token: str) -> Any: ...
        async def _set_user(self, user: Any, credential: Credential) -> None: ...
        async def _slot_take(self) -> str | None: ...
        async def _end_not_entitled(self) -> None: ...

    def _error(self, code: str, message: str, *, id: Any = None, stream: str | None = None) -> None:
        metrics.WS_CLIENT_ERRORS.labels(code).inc()
        self.push(protocol.error(code, message, id=id, stream=stream))

    async def _client_message(self, raw: str | bytes | None) -> None:
        """Count the message against the rate limit, then hand it to the request task."""
        now = self.loop.time()
        if now - self.window_start >= 1.0:
            self.window_start, self.window_count = now, 0
        self.window_count += 1
        limit = self.hub.limits.max_messages_per_s
        if self.window_count > limit * settings.WS_RATE_CLOSE_FACTOR:
            await self.close(protocol.CLOSE_RATE, "client message rate far over the limit")
            return
        try:
            # A message over the rate is answered in turn, after the messages before it.
            self.inbox.put_nowait(raw if self.window_count <= limit else OVER_RATE)
        except asyncio.QueueFull:
            self._error(protocol.RATE_LIMITED, ERR_INBOX_FULL.format(limit=INBOX_SIZE))

    async def _requests(self) -> None:
        """Serve client messages in order; cancelled with the connection, so no work outlives it."""
        while True:
            raw = await self.inbox.get()
            try:
                # A turn of the client's address (ops/admission.py): one address's sockets
                # are served one request at a time, not in front of other addresses.
                async with later_turn(self.scope):
                    await self._request(raw)
            except Exception:  # a bug: say so and close, rather than go silent on an open socket
                log.exception("client request failed")
                await self.close(1011, "internal error")
                return

    async def _request(self, raw: object) -> None:
        if raw is OVER_RATE:
            limit = self.hub.limits.max_messages_per_s
            self._error(protocol.RATE_LIMITED, f"more than {limit} messages in one second: message ignored")
            return
        assert raw is None or isinstance(raw, str | bytes)
        try:
            request = protocol.request_parse(raw, self.hub.limits)
        except ProtocolError as exc:
            self._error(exc.code, exc.message, id=exc.id, stream=exc.stream)
            return
        if request.op == "ping":
            self.push(protocol.pong(request.id))
        elif request.op == "auth":
            await self._auth(request)
        elif not self.authed:
            self._error(protocol.UNAUTHENTICATED, access.ERR_UNAUTHENTICATED, id=request.id)
        elif request.op == "subscribe":
            await self._subscribe(request)
        else:
            await self._unsubscribe(request)

    async def _auth(self, request: Request) -> None:
        assert request.token is not None
        retry = await aauth_blocked(self.ip)
        if retry is not None:
            self._error(protocol.RATE_LIMITED, ERR_AUTH_THROTTLED.format(seconds=retry), id=request.id)
            return
        try:
            user = await self._token_user(request.token)
        except DatabaseError:
            self._error(UNAVAILABLE, "could not check the token; try again", id=request.id)
            return
        if user is None:
            await aauth_failed(self.ip)
            self._error(protocol.UNAUTHENTICATED, access.ERR_BAD_TOKEN, id=request.id)
            return
        await self._set_user(user, ("token", token_hash(request.token)))
        if self.allowed == set():
            await self.close(protocol.CLOSE_REFUSED, ERR_NO_ENTITLEMENT)
            return
        refused = await self._slot_take()
        if refused:
            await self.close(protocol.CLOSE_RATE, refused)
            return
        # Another user's token: what the first one was entitled to is not carried over.
        await self._end_not_entitled()
        self.push(protocol.authenticated(request.id))

    async def _subscribe(self, request: Request) -> None:
        id = request.id
        parsed: list[tuple[str, Stream | ValidationError]] = []
        for name in request.streams:
            try:
                parsed.append((name, stream_parse(name)))
            except ValidationError as exc:
                parsed.append((name, exc))
        tickers = {stream.ticker for _, stream in parsed if isinstance(stream, Stream)}
        try:
            # One look-up for every symbol of the message, however many it names.
            refs = await self.hub.symbols(tickers) if tickers else {}
        except DatabaseError:
            refs = None
        for name, stream in parsed:
            if not isinstance(stream, Stream):
                self._error(protocol.INVALID_STREAM, str(stream), id=id, stream=name)
                continue
            if name not in self.subs and len(self.subs) >= self.hub.limits.max_streams:
                self._error(
                    protocol.TOO_MANY_STREAMS, f"at most {self.hub.limits.max_streams} streams", id=id, stream=name
                )
                continue
            if refs is None:
                self._error(UNAVAILABLE, "could not look the symbol up; try again", id=id, stream=name)
                continue
            ref = refs.get(stream.ticker)
            # A symbol of a dataset the client may not read is answered as one that does
            # not exist: what a client is refused must not tell it what exists.
            if ref is None or (self.allowed is not None and ref.dataset not in self.allowed):
                self._error(
                    protocol.UNKNOWN_SYMBOL, ERR_UNKNOWN_SYMBOL.format(ticker=stream.ticker), id=id, stream=name
                )
                continue
            resume = request.resume.get(name) if request.resume else None
            await self._open(stream, ref.dataset, request, resume)
            if self.closed:
                return

    async def _open(self, stream: Stream, dataset: str, request: Request, resume: int | None) -> None:
        """Register (join the group), then fetch (snapshot or replay), then go live."""
        name = stream.name
        old = self.subs.get(name)
        if old is not None and old.timer is not None:
            old.timer.cancel()
        sub = self.subs[name] = Sub(stream, dataset, request.throttle_ms, request.snapshot)
        try:
            if old is None:
                metrics.WS_SUBSCRIPTIONS.inc()
                await self.channel_layer.group_add(sub.group, self.channel_name)
            replayed: list[str] | None = None
            items: list[str] = []
            if resume is not None:
                seq, replayed = await self.hub.buffer.after(name, resume)
                if replayed is not None and len(replayed) > settings.WS_MAX_RESUME:
                    replayed = None
                if replayed is not None:
                    seq = resume + len(replayed)
            if replayed is None:
                n = request.snapshot if resume is None else (request.snapshot or RESNAPSHOT_DEFAULT)
                seq, items = await snapshot(self.hub.buffer, stream, n)
            state, state_message = await self.hub.feed_state(dataset)
        except (RedisError, OSError, DatabaseError, UnknownSymbolError) as exc:
            # The client learns what to do; the log (not the client) gets what failed inside.
            log.warning("subscribe failed", extra={"stream": name}, exc_info=True)
            if self.subs.get(name) is sub:
                await self._end(name)
            if isinstance(exc, UnknownSymbolError):
                self._error(protocol.UNKNOWN_SYMBOL, ERR_UNKNOWN_SYMBOL.format(ticker=stream.ticker),
                            id=request.id, stream=name)  # fmt: skip
            else:
                self._error(UNAVAILABLE, ERR_SUBSCRIBE_UNAVAILABLE, id=request.id, stream=name)
            return
        if self.subs.get(name) is not sub:  # unsubscribed, subscribed again or access lost meanwhile
            return
        async with self.flow:
            sub.seq = seq
            if replayed is not None:
                self._push_frames(replayed, None, replay=True)
                self.push(protocol.resumed(request.id, name, seq, None))
            elif resume is not None:
                self.push(protocol.resumed(request.id, name, seq, items))
            else:
                self.push(protocol.subscribed(request.id, name, seq, items))
            self.push(protocol.status(name, state, state_message))
            sub.ready = True
            early, sub.early = sub.early, []
            for message in early:
                await self._apply(sub, message["first"], message_frames(message), message.get("t"))

    async def _unsubscribe(self, request: Request) -> None:
        for name in request.streams:
            try:
                stream_parse(name)
            except ValidationError as exc:
                self._error(protocol.INVALID_STREAM, str(exc), id=request.id, stream=name)
                continue
            await self._end(name)
            self.push(protocol.unsubscribed(request.id, name))
