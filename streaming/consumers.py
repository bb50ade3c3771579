"""The WebSocket gateway: protocol v1 at /ws/v1/stream (SPEC section 5, docs/WEBSOCKET.md).

One StreamConsumer per connection, three tasks:
- the ASGI receive loop (client messages: subscribe, unsubscribe, ping, auth);
- the channel-layer loop: the pub/sub layer hands it each published batch of a stream
  this connection joined; it drops seqs already sent, fills a gap from the replay
  buffer (or sends a fresh snapshot when the buffer no longer reaches back), conflates
  under throttle_ms, and appends frames to the connection's send queue. It never reads
  the database;
- the sender: drains the send queue into the socket. When the client stops reading,
  the socket's buffer fills and the queue grows; past WS_SEND_QUEUE the connection is
  closed with 4008, so a slow client costs only its own bounded memory.

Frames are forwarded as the exact text the publisher built (streaming.publish): the
gateway parses no message on the hot path. It skips Channels' per-dispatch
close_old_connections (measured at about half the server time of a forwarding
consumer): the only database calls go through database_sync_to_async, which does its
own connection housekeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from channels.consumer import AsyncConsumer
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError
from django.http.request import split_domain_port, validate_host
from redis.exceptions import RedisError

from marketdata import access
from marketdata.errors import UnknownSymbolError, ValidationError
from ops import metrics
from ops.middleware import websocket_bind

from . import protocol
from .hub import Hub, hub_get
from .protocol import ProtocolError, Request
from .publish import message_frames
from .server import TRANSPORT_EXTENSION
from .snapshot import snapshot
from .streams import Stream, group_name, stream_parse

log = logging.getLogger(__name__)

UNAVAILABLE = "unavailable"  # Redis or the database failed while serving a request; try again
RESNAPSHOT_DEFAULT = 100  # items in a server-sent fresh snapshot for a stream subscribed without one
CONGESTED_POLL_S = 0.01
FLUSH_TURNS = 2


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


def origin_allowed(origin: str | None) -> bool:
    """Browsers send Origin; other clients need not. Allowed: WS_ALLOWED_ORIGINS, else ALLOWED_HOSTS."""
    if origin is None:
        return True
    allowed = settings.WS_ALLOWED_ORIGINS
    if allowed:
        return "*" in allowed or origin.rstrip("/") in allowed
    netloc = urlsplit(origin).netloc
    if not netloc:
        return False
    domain, _port = split_domain_port(netloc)
    return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def token_of(scope: dict[str, Any]) -> str | None:
    """An API token from ?token= or Authorization: Token (or Bearer) ..."""
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    if query.get("token"):
        return query["token"][0]
    header = _header(scope, b"authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
    return None


class StreamConsumer(AsyncConsumer):
    """One client connection (see the module docstring)."""

    hub: Hub
    heartbeat_at: float
    auth_deadline: float | None
    sent: int
    log_ids: dict[str, str] = {}

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        self.scope = scope
        self.base_send = send
        self.hub = hub_get()
        self.loop = asyncio.get_running_loop()
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = ""
        self.subs: dict[str, Sub] = {}
        self.outbox: deque[str] = deque()
        self.marks: deque[tuple[int, int]] = deque()  # (pushed count, publish ms) for latency
        self.pushed = 0
        self.popped = 0
        self.credit = 0  # replayed frames in the queue, allowed beyond WS_SEND_QUEUE
        self.wake = asyncio.Event()
        self.flow = asyncio.Lock()  # frames of the layer loop vs. a subscribe completing
        self.user: Any = None
        self.allowed: set[str] | None = set()
        self.authed = False
        self.auth_deadline = None
        self.heartbeat_at = math.inf
        self.sent = 0
        self.accepted = False
        self.closed = False  # nothing more is queued
        self.close_sent = False
        self.window_start = 0.0
        self.window_count = 0
        self.tasks: list[asyncio.Task] = []
        extension = scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
        self.buffered: Callable[[], int] | None = extension["buffered"] if extension else None
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    if not self.closed:
                        text = message.get("text")
                        await self._client_message(text if text is not None else message.get("bytes"))
                elif kind == "websocket.connect":
                    await self._connect()
                elif kind == "websocket.disconnect":
                    break
        finally:
            await self._cleanup()

    # -- connection -------------------------------------------------------------------

    async def _connect(self) -> None:
        scope = self.scope
        # Every log line of this connection carries its request and trace ids: bound before
        # its tasks exist (a task copies the context it starts in), while what outlives the
        # connection (the channel layer's reader, the hub's timer) starts without them.
        unbound = contextvars.copy_context()
        self.log_ids = websocket_bind(scope)
        if not origin_allowed(_header(scope, b"origin")):
            await self._refuse(protocol.CLOSE_REFUSED, "origin not allowed")
            return
        token = token_of(scope)
        if token is not None:
            user = await database_sync_to_async(access.user_from_token)(token)
            if user is None:
                await self._refuse(protocol.CLOSE_UNAUTHENTICATED, access.ERR_BAD_TOKEN)
                return
            await self._set_user(user)
        else:
            user = scope.get("user")
            if user is not None and user.is_authenticated:
                await self._set_user(user)
            elif access.anonymous_allowed():
                self.authed, self.allowed = True, None
        if self.authed and self.user is not None and self.allowed == set():
            await self._refuse(protocol.CLOSE_REFUSED, "not entitled to any dataset")
            return
        await self.base_send({"type": "websocket.accept"})
        self.accepted = True
        if not self.authed:
            self.auth_deadline = self.loop.time() + self.hub.limits.auth_deadline_s
        self.channel_name = await self.loop.create_task(self.channel_layer.new_channel(), context=unbound.copy())
        self.tasks = [self.loop.create_task(self._sender()), self.loop.create_task(self._layer_loop())]
        self.heartbeat_at = self.loop.time() + settings.WS_HEARTBEAT_S
        unbound.run(self.hub.register, self)
        self.push(protocol.welcome(self.hub.limits, settings.WS_HEARTBEAT_S, authenticated=self.authed))

    async def _set_user(self, user: Any) -> None:
        self.user = user
        self.allowed = await database_sync_to_async(access.datasets_allowed)(user)
        self.authed = True
        self.auth_deadline = None

    async def _refuse(self, code: int, reason: str) -> None:
        """Accept only to say why in a close code (a refused handshake is a bare HTTP 403)."""
        await self.base_send({"type": "websocket.accept"})
        self.accepted = True
        await self.close(code, reason)

    def _stop(self, code: int, reason: str) -> None:
        """Queue nothing more and drop what is queued (counted when a slow consumer is closed)."""
        if self.closed:
            return
        self.closed = True
        if code == protocol.CLOSE_SLOW_CONSUMER:
            metrics.WS_SLOW_CLOSES.inc()
            metrics.WS_DROPPED.labels("closed").inc(len(self.outbox))
        self.outbox.clear()
        metrics.WS_CLOSES.labels(str(code)).inc()
        log.info("websocket closed by the server", extra={"code": code, "reason": reason, **self.log_ids})

    async def close(self, code: int, reason: str) -> None:
        """Close with a code; what is still queued is dropped."""
        if self.close_sent:
            return
        self.close_sent = True
        self._stop(code, reason)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await self.base_send({"type": "websocket.close", "code": code, "reason": reason})

    async def _cleanup(self) -> None:
        self.closed = True
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            # Ending anyway; cancelling the layer's receive is what unsubscribes the channel.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.channel_name:
            for sub in self.subs.values():
                if sub.timer is not None:
                    sub.timer.cancel()
                try:
                    await self.channel_layer.group_discard(sub.group, self.channel_name)
                except (RedisError, OSError):
                    log.warning("group_discard failed", exc_info=True)
        metrics.WS_SUBSCRIPTIONS.dec(len(self.subs))
        self.subs.clear()
        self.hub.unregister(self)

    # -- sending ----------------------------------------------------------------------

    def push(self, text: str) -> None:
        """Queue a reply or control message."""
        if not self.closed:
            self.outbox.append(text)
            self.pushed += 1
            self.wake.set()

    def _push_frames(self, frames: list[str], t: int | None, *, replay: bool = False) -> None:
        if self.closed:
            return
        out = self.outbox
        # Slow is more than WS_SEND_QUEUE messages still waiting when new ones arrive. One
        # published batch may itself hold more (the ingester writes up to 5,000 trades a
        # batch): it is queued whole, so a client that keeps up is never closed for the
        # size of a batch, and the queue stays within WS_SEND_QUEUE plus one batch.
        if not replay and len(out) > self.hub.limits.send_queue + self.credit:
            self.closed_slow()
            return
        out.extend(frames)
        self.pushed += len(frames)
        if t is not None:
            self.marks.append((self.pushed, t))
        if replay:
            self.credit += len(frames)
        self.wake.set()

    def closed_slow(self) -> None:
        """The client does not keep up: close 4008 (from sync code, so the close frame goes as a task)."""
        reason = "slow consumer: send queue overflowed"
        self._stop(protocol.CLOSE_SLOW_CONSUMER, reason)
        self.loop.create_task(self.close(protocol.CLOSE_SLOW_CONSUMER, reason))

    async def _sender(self) -> None:
        out, wake, send, buffered = self.outbox, self.wake, self.base_send, self.buffered
        high = settings.WS_TRANSPORT_HIGH_BYTES
        marks = self.marks
        observe = metrics.WS_PUBLISH_TO_SEND.observe
        while True:
            if not out:
                wake.clear()
                await wake.wait()
                continue
            if buffered is not None and buffered() > high:
                # Twisted writes what it holds once the loop polls the socket (the turn after
                # next): let it, then look again. Still over: the client is not reading; wait
                # while the queue absorbs.
                for _ in range(FLUSH_TURNS):
                    await asyncio.sleep(0)
                if buffered() > high:
                    await asyncio.sleep(CONGESTED_POLL_S)
                continue
            text = out.popleft()
            if self.credit:
                self.credit -= 1
            try:
                await send({"type": "websocket.send", "text": text})
            except Exception:  # the server refuses sends once the client has gone (uvicorn raises)
                log.debug("websocket send failed; the connection is closing", exc_info=True)
                self._stop(1006, "send failed")
                return
            self.sent += 1
            self.popped += 1
            if marks and self.popped >= marks[0][0]:
                _, t = marks.popleft()
                observe(max(0.0, time.time() * 1000 - t) / 1000)

    # -- published frames -------------------------------------------------------------

    async def _layer_loop(self) -> None:
        receive, name, flow = self.channel_layer.receive, self.channel_name, self.flow
        while True:
            message = await receive(name)
            if message.get("type") != "stream.frames":
                continue
            sub = self.subs.get(message["stream"])
            if sub is None or self.closed:
                continue
            if not sub.ready:
                sub.early.append(message)
                continue
            try:
                async with flow:
                    await self._apply(sub, message["first"], message_frames(message), message.get("t"))
            except Exception:  # a bug: say so and close, rather than go silent on an open socket
                log.exception("stream delivery failed", extra={"stream": sub.name})
                await self.close(1011, "internal error")
                return

    async def _apply(self, sub: Sub, first: int, frames: list[str], t: int | None) -> None:
        """Frames ``first ..`` of a stream: drop what was sent, fill a gap, then deliver."""
        last = sub.seq
        end = first + len(frames) - 1
        if end <= last:
            metrics.WS_DROPPED.labels("duplicate").inc(len(frames))
            return
        if first > last + 1:
            try:
                _, missing = await self.hub.buffer.after(sub.name, last, first - 1)
            except (RedisError, OSError):
                missing = None
            if self.subs.get(sub.name) is not sub:
                return
            if missing is None or len(missing) != first - 1 - last:
                metrics.WS_GAPS.labels("resnapshot").inc()
                await self._resnapshot(sub)
                return
            metrics.WS_GAPS.labels("filled").inc()
            frames = missing + frames
        elif first <= last:
            metrics.WS_DROPPED.labels("duplicate").inc(last + 1 - first)
            frames = frames[last + 1 - first :]
        sub.seq = end
        if sub.throttle_s:
            self._conflate(sub, frames[-1], t, len(frames) - 1)
        else:
            self._push_frames(frames, t)

    async def _resnapshot(self, sub: Sub) -> None:
        """The buffer no longer holds what this client missed: a fresh snapshot (recovered: false)."""
        try:
            seq, items = await snapshot(self.hub.buffer, sub.stream, sub.snapshot_n or RESNAPSHOT_DEFAULT)
        except (RedisError, OSError, DatabaseError):
            log.warning("resnapshot failed", exc_info=True)
            return
        if self.subs.get(sub.name) is not sub:
            return
        sub.seq = seq
        sub.pending = None
        self.push(protocol.resumed(None, sub.name, seq, items))

    def _conflate(self, sub: Sub, frame: str, t: int | None, skipped: int) -> None:
        if sub.pending is not None:
            skipped += 1
        if skipped:
            metrics.WS_CONFLATED.inc(skipped)
        sub.pending, sub.pending_t = frame, t
        if sub.timer is None:
            delay = sub.next_at - self.loop.time()
            if delay <= 0:
                self._flush_throttled(sub)
            else:
                sub.timer = self.loop.call_later(delay, self._flush_throttled, sub)

    def _flush_throttled(self, sub: Sub) -> None:
        sub.timer = None
        if sub.pending is None or self.subs.get(sub.name) is not sub:
            return
        frame, t = sub.pending, sub.pending_t
        sub.pending = sub.pending_t = None
        sub.next_at = self.loop.time() + sub.throttle_s
        self._push_frames([frame], t)

    def feed_status_changed(self, dataset: str, state: str, message: str) -> None:
        for sub in self.subs.values():
            if sub.ready and sub.dataset == dataset:
                self.push(protocol.status(sub.name, state, message))

    # -- client messages --------------------------------------------------------------

    def _error(self, code: str, message: str, *, id: Any = None, stream: str | None = None) -> None:
        metrics.WS_CLIENT_ERRORS.labels(code).inc()
        self.push(protocol.error(code, message, id=id, stream=stream))

    async def _client_message(self, raw: str | bytes | None) -> None:
        now = self.loop.time()
        if now - self.window_start >= 1.0:
            self.window_start, self.window_count = now, 0
        self.window_count += 1
        limit = self.hub.limits.max_messages_per_s
        if self.window_count > limit:
            if self.window_count > limit * settings.WS_RATE_CLOSE_FACTOR:
                await self.close(protocol.CLOSE_RATE, "client message rate far over the limit")
            else:
                self._error(protocol.RATE_LIMITED, f"more than {limit} messages in one second: message ignored")
            return
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
        try:
            user = await database_sync_to_async(access.user_from_token)(request.token)
        except DatabaseError:
            self._error(UNAVAILABLE, "could not check the token; try again", id=request.id)
            return
        if user is None:
            self._error(protocol.UNAUTHENTICATED, access.ERR_BAD_TOKEN, id=request.id)
            return
        await self._set_user(user)
        if self.allowed == set():
            await self.close(protocol.CLOSE_REFUSED, "not entitled to any dataset")
            return
        self.push(protocol.authenticated(request.id))

    async def _subscribe(self, request: Request) -> None:
        id = request.id
        for name in request.streams:
            try:
                stream = stream_parse(name)
            except ValidationError as exc:
                self._error(protocol.INVALID_STREAM, str(exc), id=id, stream=name)
                continue
            if name not in self.subs and len(self.subs) >= self.hub.limits.max_streams:
                self._error(
                    protocol.TOO_MANY_STREAMS, f"at most {self.hub.limits.max_streams} streams", id=id, stream=name
                )
                continue
            try:
                ref = await self.hub.symbol(stream.ticker)
            except UnknownSymbolError:
                self._error(protocol.UNKNOWN_SYMBOL, f"unknown symbol {stream.ticker!r}", id=id, stream=name)
                continue
            except DatabaseError:
                self._error(UNAVAILABLE, "could not look the symbol up; try again", id=id, stream=name)
                continue
            if self.allowed is not None and ref.dataset not in self.allowed:
                message = access.ERR_NOT_ENTITLED.format(dataset=ref.dataset)
                self._error(protocol.NOT_ENTITLED, message, id=id, stream=name)
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
            log.warning("subscribe failed", extra={"stream": name}, exc_info=True)
            if self.subs.get(name) is sub:
                del self.subs[name]
                metrics.WS_SUBSCRIPTIONS.dec()
                with contextlib.suppress(RedisError, OSError):
                    await self.channel_layer.group_discard(sub.group, self.channel_name)
            code = protocol.UNKNOWN_SYMBOL if isinstance(exc, UnknownSymbolError) else UNAVAILABLE
            self._error(code, f"could not subscribe: {exc}", id=request.id, stream=name)
            return
        if self.subs.get(name) is not sub:  # unsubscribed or subscribed again meanwhile
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
            sub = self.subs.pop(name, None)
            if sub is not None:
                if sub.timer is not None:
                    sub.timer.cancel()
                metrics.WS_SUBSCRIPTIONS.dec()
                await self.channel_layer.group_discard(sub.group, self.channel_name)
            self.push(protocol.unsubscribed(request.id, name))
