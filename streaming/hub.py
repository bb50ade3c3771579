"""What the gateway's connections share within one process (one Hub per event loop).

- One asyncio Redis client for the replay buffers.
- One timer task for every connection's heartbeat and auth deadline, instead of a timer
  per connection (10,000 idle connections cost one wake-up a second, not 10,000).
- Feed status per dataset (`live`, `replay`, `stale`), read from FeedStatus every
  WS_STATUS_POLL_S by one query per process, never per message; connections are told of
  each change for the streams they hold.
- Symbols looked up for subscribe, all of a message's in one query, kept for
  SYMBOL_TTL_S (and unknown ones for UNKNOWN_TTL_S, so a flood of made-up names costs a
  query per message at most, not one per name).
- Access: every connection's credentials checked again, all tokens of the process in one
  query, at once when the access epoch in Redis changes (marketdata.access bumps it on
  every change saved through the ORM or the admin) and every WS_ACCESS_RECHECK_S
  otherwise; a connection whose credentials are gone is closed 4001, one with no
  entitlement left 4003, and streams of datasets no longer granted end with not_entitled.
- Connection slots (streaming.slots): their leases renewed every LEASE_RENEW_S.
- Counters kept in plain ints on the hot path and added to the metrics once a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from datetime import UTC, datetime
from importlib import import_module
from typing import TYPE_CHECKING, Protocol

import redis.asyncio as aioredis
from channels.auth import get_user
from channels.db import database_sync_to_async
from django.conf import settings
from redis.exceptions import RedisError

from marketdata.cache.local import EPOCH_KEY, epoch_note
from marketdata.grants import Grant, sessions_grants, tokens_grants, user_grant
from marketdata.models import FeedStatus
from marketdata.selectors.symbols import symbol_refs
from marketdata.wire import ts_text
from ops import metrics

from . import protocol
from .buffer import Buffer
from .slots import LEASE_RENEW_S, Slot, Slots

if TYPE_CHECKING:
    from marketdata.selectors.symbols import SymbolRef

log = logging.getLogger(__name__)

SYMBOL_TTL_S = 60.0
UNKNOWN_TTL_S = 5.0
REDIS_POOL_SIZE = 50
REDIS_POOL_WAIT_S = 20.0
TICK_S = 1.0


class Connection(Protocol):
    """What the hub needs of a connection (streaming.consumers.StreamConsumer)."""

    heartbeat_at: float
    auth_deadline: float | None
    sent: int
    credential: Credential | None
    slot: Slot | None
    close_sent: bool

    def push(self, text: str) -> None: ...
    def feed_status_changed(self, dataset: str, state: str, message: str) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...
    async def access_update(self, grant: Grant | None) -> None: ...


# What a connection authenticated with, to check again: ("token", token hash) or
# ("session", session key).
Credential = tuple[str, str]


FeedRow = tuple[str, str, datetime | None]


def _feed_rows() -> list[FeedRow]:
    return list(FeedStatus.objects.values_list("dataset", "source", "last_batch_at"))


def feed_states(rows: list[FeedRow], now: datetime, stale_s: float) -> dict[str, tuple[str, str]]:
    """Each dataset's (status, message) from its feeds' last batch times."""
    fresh: dict[str, set[str]] = {}
    newest: dict[str, datetime | None] = {}
    for dataset, source, last_batch_at in rows:
        fresh.setdefault(dataset, set())
        if last_batch_at is not None:
            prev = newest.get(dataset)
            newest[dataset] = last_batch_at if prev is None else max(prev, last_batch_at)
            if (now - last_batch_at).total_seconds() <= stale_s:
                fresh[dataset].add(source or "unknown")
    out: dict[str, tuple[str, str]] = {}
    for dataset, sources in fresh.items():
        if "live" in sources:
            out[dataset] = ("live", "live feed")
        elif sources:
            out[dataset] = ("replay", f"{' and '.join(sorted(sources))} feed: not a live exchange feed")
        else:
            last = newest.get(dataset)
            age = f"nothing written for {int((now - last).total_seconds())} s" if last else "never written"
            out[dataset] = ("stale", f"feed stopped: {age}")
    return out


NO_FEED = ("stale", "no feed writes this dataset")


class Hub:
    """Per event loop: shared clients, caches and the one timer of every connection."""

    def __init__(self) -> None:
        self.connections: set[Connection] = set()
        # A blocking pool: a burst of subscribes (a reconnect storm) waits for a connection
        # instead of failing with "Too many connections" as redis-py's default pool does.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL, max_connections=REDIS_POOL_SIZE, timeout=REDIS_POOL_WAIT_S,
            socket_timeout=5, socket_connect_timeout=2,
        )  # fmt: skip
        self.redis = aioredis.Redis(connection_pool=pool)
        self.buffer = Buffer(self.redis)
        self.slots = Slots(self.redis)
        self.known: dict[str, tuple[float, SymbolRef | None]] = {}
        self.states: dict[str, tuple[str, str]] | None = None
        self.limits = protocol.Limits(
            max_streams=settings.WS_MAX_STREAMS,
            max_messages_per_s=settings.WS_MAX_MESSAGES_PER_S,
            max_frame_bytes=settings.WS_MAX_FRAME_BYTES,
            auth_deadline_s=settings.WS_AUTH_DEADLINE_S,
            max_snapshot=settings.WS_MAX_SNAPSHOT,
            max_throttle_ms=settings.WS_MAX_THROTTLE_MS,
            send_queue=settings.WS_SEND_QUEUE,
            max_connections_per_user=settings.WS_MAX_CONNECTIONS_PER_USER,
            max_anon_connections_per_ip=settings.WS_MAX_ANON_CONNECTIONS_PER_IP,
        )
        self._task: asyncio.Task | None = None
        self._epoch: bytes | str | None = None
        self._access_due = 0.0
        self._renew_due = time.monotonic() + LEASE_RENEW_S
        self._status_due = 0.0
        self._status_lock = asyncio.Lock()

    # -- connections ------------------------------------------------------------------

    def register(self, connection: Connection) -> None:
        self.connections.add(connection)
        metrics.WS_CONNECTIONS.inc()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._tick())

    def unregister(self, connection: Connection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            metrics.WS_CONNECTIONS.dec()
            metrics.WS_MESSAGES_SENT.inc(connection.sent)
            connection.sent = 0

    async def _tick(self) -> None:
        while self.connections:
            await asyncio.sleep(TICK_S)
            try:
                await self._tick_once()
            except Exception:  # the timer of every connection: log, never die
                log.exception("gateway tick failed")

    async def _tick_once(self) -> None:
        now = time.monotonic()
        beat = protocol.heartbeat(ts_text(datetime.now(UTC).replace(microsecond=0)))
        sent = 0
        expired: list[Connection] = []
        for connection in list(self.connections):
            sent += connection.sent
            connection.sent = 0
            if connection.auth_deadline is not None and now >= connection.auth_deadline:
                expired.append(connection)
            elif now >= connection.heartbeat_at:
                connection.heartbeat_at = now + settings.WS_HEARTBEAT_S
                connection.push(beat)
        if sent:
            metrics.WS_MESSAGES_SENT.inc(sent)
        for connection in expired:
            await connection.close(protocol.CLOSE_UNAUTHENTICATED, "no credentials within the auth deadline")
        if now >= self._status_due:
            await self.refresh_states()
        await self._access_tick(now)
        if now >= self._renew_due:
            self._renew_due = now + LEASE_RENEW_S
            await self.slots.renew([c.slot for c in self.connections if c.slot is not None])

    # -- access -----------------------------------------------------------------------

    async def _access_tick(self, now: float) -> None:
        try:
            epoch = await self.redis.get(EPOCH_KEY)
        except (RedisError, OSError):
            epoch = self._epoch  # the timer below still re-checks
        if epoch != self._epoch or now >= self._access_due:
            if epoch != self._epoch and isinstance(epoch, bytes):
                epoch_note(epoch)  # this process's token and symbol look-ups are forgotten too
                self.known.clear()
            self._epoch = epoch
            await self.access_recheck()

    async def access_recheck(self) -> None:
        """Check every connection's credentials again and tell each what they grant now."""
        self._access_due = time.monotonic() + settings.WS_ACCESS_RECHECK_S
        held = [c for c in self.connections if c.credential is not None and not c.close_sent]
        if not held:
            return
        hashes = {key for kind, key in (c.credential for c in held if c.credential) if kind == "token"}
        tokens = await database_sync_to_async(tokens_grants)(hashes=hashes)
        grants: dict[Credential, Grant | None] = {("token", h): tokens.get(h) for h in hashes}
        keys = {key for kind, key in (c.credential for c in held if c.credential) if kind == "session"}
        sessions = await database_sync_to_async(sessions_grants)(keys=keys) if keys else {}
        if sessions is None:  # sessions not in the database: Channels' own check, one by one
            sessions = {}
            for key in keys:
                engine = import_module(settings.SESSION_ENGINE)
                grant = await database_sync_to_async(user_grant)(await get_user({"session": engine.SessionStore(key)}))
                if grant is not None:
                    sessions[key] = grant
        grants.update({("session", key): sessions.get(key) for key in keys})
        for connection in held:
            if connection.credential is not None:
                await connection.access_update(grants.get(connection.credential))

    # -- feed status ------------------------------------------------------------------

    async def refresh_states(self) -> None:
        """Read every feed's status; tell connections of each dataset whose state changed."""
        async with self._status_lock:
            self._status_due = time.monotonic() + settings.WS_STATUS_POLL_S
            rows = await database_sync_to_async(_feed_rows)()
            states = feed_states(rows, datetime.now(UTC), settings.WS_FEED_STALE_S)
            previous, self.states = self.states, states
        if previous is None:
            return
        for dataset in set(previous) | set(states):
            old, new = previous.get(dataset, NO_FEED), states.get(dataset, NO_FEED)
            if old[0] != new[0]:
                for connection in list(self.connections):
                    connection.feed_status_changed(dataset, *new)

    async def feed_state(self, dataset: str) -> tuple[str, str]:
        """(status, message) of a dataset's feed."""
        if self.states is None:
            await self.refresh_states()
        assert self.states is not None
        return self.states.get(dataset, NO_FEED)

    # -- symbols ----------------------------------------------------------------------

    async def symbols(self, tickers: set[str]) -> dict[str, SymbolRef]:
        """The symbols of these tickers that exist (the others are absent)."""
        now = time.monotonic()
        out: dict[str, SymbolRef] = {}
        missing: list[str] = []
        for ticker in tickers:
            hit = self.known.get(ticker)
            if hit is not None and hit[0] > now:
                if hit[1] is not None:
                    out[ticker] = hit[1]
            else:
                missing.append(ticker)
        if missing:
            found = await database_sync_to_async(symbol_refs)(tickers=missing)
            if len(self.known) > 100_000:
                self.known.clear()
            for ticker in missing:
                ref = found.get(ticker)
                self.known[ticker] = (now + (SYMBOL_TTL_S if ref is not None else UNKNOWN_TTL_S), ref)
                if ref is not None:
                    out[ticker] = ref
        return out


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def hub_get() -> Hub:
    """This event loop's hub (one per process in a server; one per test loop in tests)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = Hub()
    return hub
