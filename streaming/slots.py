"""Concurrent sockets per user and per anonymous client IP, counted across gateway processes.

Each open socket holds a slot: a member of a Redis sorted set per user (or per IP for
sockets without credentials) whose score is the time its lease ends. Taking a slot drops
the expired members and refuses when the set is full, in one script, so two processes
never both take the last slot. The hub renews its connections' leases every
LEASE_RENEW_S; a socket's slot is given back when it closes, and the slots of a process
that died end with their lease, so a crash never locks a user out for longer than LEASE_S.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

LEASE_S = 60
LEASE_RENEW_S = 20
KEY = "md:ws:slots:{kind}:{who}"

# KEYS[1]: the set. ARGV: now, lease end, member, limit, key ttl. 1: taken (or held); 0: full.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class Slot:
    """One socket's place in its user's (or IP's) set."""

    __slots__ = ("key", "member")

    def __init__(self, kind: str, who: str) -> None:
        self.key = KEY.format(kind=kind, who=who)
        self.member = uuid.uuid4().hex


class Slots:
    """Take, renew and give back slots (one per hub, on its Redis client)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._take = redis.register_script(_TAKE)

    async def take(self, slot: Slot, limit: int) -> bool:
        """Whether the socket may stay open; Redis unreachable lets it (streaming needs Redis anyway)."""
        now = time.time()
        try:
            taken = await self._take(keys=[slot.key], args=[now, now + LEASE_S, slot.member, limit, LEASE_S * 2])
        except (RedisError, OSError):
            log.warning("connection slot not counted: Redis unreachable", exc_info=True)
            return True
        return bool(taken)

    async def give_back(self, slot: Slot) -> None:
        try:
            await self.redis.zrem(slot.key, slot.member)
        except (RedisError, OSError):
            log.warning("connection slot not given back: it ends with its lease", exc_info=True)

    async def renew(self, slots: Iterable[Slot]) -> None:
        """Push the lease end of these slots forward (only those still present: XX)."""
        end = time.time() + LEASE_S
        pipe = self.redis.pipeline(transaction=False)
        count = 0
        for slot in slots:
            pipe.zadd(slot.key, {slot.member: end}, xx=True)
            pipe.expire(slot.key, LEASE_S * 2)
            count += 1
        if not count:
            return
        try:
            await pipe.execute()
        except (RedisError, OSError):
            log.warning("connection slots not renewed", exc_info=True)
