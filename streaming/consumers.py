"""The WebSocket gateway: protocol v1 at /ws/v1/stream (SPEC section 5, docs/WEBSOCKET.md).

One StreamConsumer per connection, three tasks beside the ASGI receive loop (which
checks the handshake, streaming.handshake, and hands client messages to the inbox):
- the request task (streaming.client_requests: subscribe, unsubscribe, ping, auth);
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

from channels.consumer import AsyncConsumer
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError
from redis.exceptions import RedisError

from marketdata import access
from marketdata.auth_throttle import aauth_blocked, aauth_failed
from marketdata.grants import Grant
from marketdata.tokens import token_hash
from ops import metrics
from ops.admission import later_turn
from ops.clientip import scope_client_ip
from ops.middleware import websocket_bind

from . import protocol
from .client_requests import ERR_AUTH_THROTTLED, ERR_NO_ENTITLEMENT, INBOX_SIZE, RESNAPSHOT_DEFAULT, ClientRequests, Sub
from .handshake import origin_allowed, token_of
from .hub import Credential, Hub, hub_get
from .publish import message_frames
from .server import TRANSPORT_EXTENSION
from .slots import Slot
from .snapshot import snapshot

log = logging.getLogger(__name__)

ERR_ORIGIN = "origin not allowed"
ERR_CREDENTIALS_GONE = "credentials revoked or expired"
ERR_USER_SOCKETS = "too many connections: at most {limit} sockets per user"
ERR_IP_SOCKETS = "too many connections: at most {limit} sockets without credentials per client address"
RELEASE_ATTEMPTS = 100
CONGESTED_POLL_S = 0.01
BACKLOG_FACTOR = 10  # queued messages, in WS_SEND_QUEUE, beyond which even a reading client is closed 4008
FLUSH_TURNS = 2


class StreamConsumer(ClientRequests, AsyncConsumer):
    """One client connection (see the module docstring).

    It overrides Channels' ``__call__`` and runs its own receive loop. Channels' loop
    (``await_many_dispatch``) reads the client and the channel layer one message at a time
    and runs ``aclose_old_connections`` (a hop to the database thread) before each: here
    the layer's messages are batches read by a task of their own, frames leave through a
    sender task with a bounded queue (4008 when a client stops reading), client messages
    go through a bounded inbox to a request task, and every task is cancelled and every
    resource given back in one place (``_cleanup``) however the connection ends. What
    Channels' consumer does that this one still needs (the channel name, group membership
    through the layer) it asks the layer for directly. See docs/WEBSOCKET.md.

    It is longer than a class should be because it is one connection's state, which its
    tasks share on the delivery path (layer loop -> send queue -> sender): attributes of
    one object, with no hop between objects per published frame. Serving client messages
    is apart (ClientRequests, the base above).
    """

    hub: Hub
    heartbeat_at: float
    auth_deadline: float | None
    sent: int
    credential: Credential | None
    slot: Slot | None
    close_sent: bool
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
        # Client messages wait here for the request task, in order; bounded, so a client
        # cannot queue work faster than it is done (the rate limit keeps it short anyway).
        self.inbox: asyncio.Queue[object] = asyncio.Queue(maxsize=INBOX_SIZE)
        self.user: Any = None
        self.credential = None  # what the access re-checks look up: ("token", hash) or ("session", key)
        self.slot = None
        self.ip = ""
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
        if not origin_allowed(scope):
            await self._refuse(protocol.CLOSE_REFUSED, ERR_ORIGIN)
            return
        self.ip = scope_client_ip(scope)
        token = token_of(scope)
        if token is not None:
            retry = await aauth_blocked(self.ip)
            if retry is not None:
                await self._refuse(protocol.CLOSE_RATE, ERR_AUTH_THROTTLED.format(seconds=retry))
                return
            user = await self._token_user(token)
            if user is None:
                await aauth_failed(self.ip)
                await self._refuse(protocol.CLOSE_UNAUTHENTICATED, access.ERR_BAD_TOKEN)
                return
            await self._set_user(user, ("token", token_hash(token)))
        else:
            user = scope.get("user")
            if user is not None and user.is_authenticated:
                await self._set_user(user, ("session", scope["session"].session_key))
            elif access.anonymous_allowed():
                self.authed, self.allowed = True, None
        if self.authed and self.user is not None and self.allowed == set():
            await self._refuse(protocol.CLOSE_REFUSED, ERR_NO_ENTITLEMENT)
            return
        refused = await self._slot_take()
        if refused:
            await self._refuse(protocol.CLOSE_RATE, refused)
            return
        await self.base_send({"type": "websocket.accept"})
        self.accepted = True
        if not self.authed:
            self.auth_deadline = self.loop.time() + self.hub.limits.auth_deadline_s
        self.channel_name = await self.loop.create_task(self.channel_layer.new_channel(), context=unbound.copy())
        self.tasks = [
            self.loop.create_task(self._sender()),
            self.loop.create_task(self._layer_loop()),
            self.loop.create_task(self._requests()),
        ]
        self.heartbeat_at = self.loop.time() + settings.WS_HEARTBEAT_S
        unbound.run(self.hub.register, self)
        self.push(protocol.welcome(self.hub.limits, settings.WS_HEARTBEAT_S, authenticated=self.authed))

    async def _token_user(self, token: str) -> Any:
        """The token's user (None: refused), from what this process remembers before asking the database.

        A remembered token costs no hop to the database thread, behind which a flood of
        other clients' look-ups may wait.
        """
        user = access.user_from_token_remembered(token)
        if user is access.NOT_REMEMBERED:
            user = await database_sync_to_async(access.user_from_token_cached)(token)
        return user

    async def _set_user(self, user: Any, credential: Credential) -> None:
        self.user = user
        self.credential = credential
        if access.datasets_known(user):
            self.allowed = access.datasets_allowed(user)
        else:
            self.allowed = await database_sync_to_async(access.datasets_allowed)(user)
        self.authed = True
        self.auth_deadline = None

    async def _slot_take(self) -> str | None:
        """Count this socket against its user (or its IP, without credentials); why not, if over."""
        limits = self.hub.limits
        if self.user is not None:
            slot, limit = Slot("user", str(self.user.pk)), limits.max_connections_per_user
            reason = ERR_USER_SOCKETS.format(limit=limit)
        else:
            slot, limit = Slot("ip", self.ip), limits.max_anon_connections_per_ip
            reason = ERR_IP_SOCKETS.format(limit=limit)
        if self.slot is not None and self.slot.key == slot.key:
            return None
        if not await self.hub.slots.take(slot, limit):
            metrics.WS_CLIENT_ERRORS.labels("too_many_connections").inc()
            return reason
        previous, self.slot = self.slot, slot
        if previous is not None:
            await self.hub.slots.give_back(previous)
        return None

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
        self._cancel_tasks()
        await self.base_send({"type": "websocket.close", "code": code, "reason": reason})

    def _cancel_tasks(self) -> None:
        """Cancel each task once: a second cancel would cut short the layer's own unsubscribe."""
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current and not task.done() and not task.cancelling():
                task.cancel()

    async def _cleanup(self) -> None:
        """Release what the connection took, however it ended: tasks, groups, its channel, its slot."""
        self.closed = True
        self.hub.unregister(self)
        self._cancel_tasks()
        interrupted = False
        others = [task for task in self.tasks if task is not asyncio.current_task()]
        try:
            # Shielded: if this task is itself cancelled (server shutdown), the tasks still
            # end their own way instead of being cancelled a second time.
            await asyncio.shield(asyncio.gather(*others, return_exceptions=True))
        except asyncio.CancelledError:
            interrupted = True
        for sub in self.subs.values():
            if sub.timer is not None:
                sub.timer.cancel()
        metrics.WS_SUBSCRIPTIONS.dec(len(self.subs))
        subs, self.subs = list(self.subs.values()), {}
        # In a turn of the client's address (ops/admission.py), so that sockets of one address
        # closed at once release one after another, not all in one iteration of the loop. Not
        # before the handshake's own turn has ended, nor when the server is stopping.
        async with later_turn(self.scope) if self.accepted and not interrupted else contextlib.nullcontext():
            if self.channel_name:
                for sub in subs:
                    try:
                        await self.channel_layer.group_discard(sub.group, self.channel_name)
                    except (RedisError, OSError):
                        log.warning("group_discard failed", exc_info=True)
                await channel_release(self.channel_layer, self.channel_name)
            if self.slot is not None:
                slot, self.slot = self.slot, None
                await self.hub.slots.give_back(slot)
        if interrupted:
            raise asyncio.CancelledError

    async def access_update(self, grant: Grant | None) -> None:
        """What this connection's credentials grant now: close, end lost streams, or carry on."""
        if self.close_sent or self.credential is None:
            return
        if grant is None or (self.user is not None and grant.user_id != self.user.pk):
            await self.close(protocol.CLOSE_UNAUTHENTICATED, ERR_CREDENTIALS_GONE)
            return
        if grant.datasets == set():
            await self.close(protocol.CLOSE_REFUSED, ERR_NO_ENTITLEMENT)
            return
        self.allowed = grant.datasets
        await self._end_not_entitled()

    async def _end_not_entitled(self) -> None:
        """End each stream of a dataset the connection may no longer read, saying so."""
        if self.allowed is None:
            return
        for name, sub in list(self.subs.items()):
            if sub.dataset not in self.allowed:
                await self._end(name)
                self._error(protocol.NOT_ENTITLED, access.ERR_NOT_ENTITLED.format(dataset=sub.dataset), stream=name)

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
        if not replay and len(out) > self.hub.limits.send_queue + self.credit and self._client_behind(len(out)):
            self.closed_slow()
            return
        out.extend(frames)
        self.pushed += len(frames)
        if t is not None:
            self.marks.append((self.pushed, t))
        if replay:
            self.credit += len(frames)
        self.wake.set()

    def _client_behind(self, queued: int) -> bool:
        """Whether a long queue is the client's doing: its socket is full, so it is not reading.

        A client that reads at once can still find its queue long for a moment: a burst of
        large published batches (a replay at 10,000 messages a second) arrives faster than
        this process writes them, and that backlog is the server's, not the client's.
        Only past BACKLOG_FACTOR times the limit is the queue too long whoever is behind.
        """
        if self.buffered is None:  # the server awaits each send, so a long queue is a slow reader
            return True
        limit = self.hub.limits.send_queue + self.credit
        return self.buffered() > settings.WS_TRANSPORT_HIGH_BYTES or queued > limit * BACKLOG_FACTOR

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

    # -- streams ------------------------------------------------------------------------

    async def _end(self, name: str) -> None:
        """Stop delivering a stream and leave its group."""
        sub = self.subs.pop(name, None)
        if sub is None:
            return
        if sub.timer is not None:
            sub.timer.cancel()
        metrics.WS_SUBSCRIPTIONS.dec()
        with contextlib.suppress(RedisError, OSError):
            await self.channel_layer.group_discard(sub.group, self.channel_name)


async def channel_release(layer: Any, channel: str) -> None:
    """Unsubscribe a connection's own channel from Redis.

    The pub/sub layer does it when a receive on the channel is cancelled, which is how the
    layer loop ends; but it may have been cancelled elsewhere (in a gap fill), or its
    receive may have returned a message first. While the layer still holds the channel,
    take the same path again: a receive, cancelled.
    """
    held = getattr(layer, "channels", None)
    for _ in range(RELEASE_ATTEMPTS):
        if held is not None and channel not in held:
            return
        task = asyncio.get_running_loop().create_task(layer.receive(channel))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if held is None:
            return
    log.warning("channel not released", extra={"channel": channel})
