"""The one publish path: after a commit, frames go to Redis with a per-stream seq.

One Lua script per batch does, for every message and atomically in Redis: INCR the
stream's seq, append the finished JSON frame to the stream's replay buffer (a Redis
stream whose entry ids are the seqs), and PUBLISH it to the stream's Channels group in
the wire format of channels_redis' RedisPubSubChannelLayer. Redis assigns the seq, so
seq rises by exactly one per message whichever process publishes, and the buffer and
the fan-out can never disagree on order.

The buffer keeps at least the last BUFFER_MIN_MESSAGES messages and everything younger
than BUFFER_MIN_SECONDS; it is trimmed every TRIM_EVERY messages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings

from .streams import group_name

BUFFER_MIN_MESSAGES = 1000
BUFFER_MIN_SECONDS = 600
TRIM_EVERY = 100
CHANNEL_PREFIX = "asgi__group__"  # channels_redis.pubsub: f"{prefix}__group__{group}", prefix "asgi"
SEQ_KEY = "md:seq:{stream}"
BUFFER_KEY = "md:buf:{stream}"
FRAME_TYPE = "stream.frame"

PUBLISH_LUA = """
local now = tonumber(ARGV[1])
local keep_n = tonumber(ARGV[2])
local keep_ms = tonumber(ARGV[3])
local trim_every = tonumber(ARGV[4])
local frame_type = ARGV[5]

local function seq_of(id) return tonumber(string.match(id, '^(%d+)')) end

local function trim(key, seq)
  local floor_seq = seq - keep_n + 1
  if floor_seq <= 1 then return end
  local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
  if #first == 0 then return end
  local lo, hi, cutoff = seq_of(first[1][1]), floor_seq, now - keep_ms
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local e = redis.call('XRANGE', key, mid .. '-1', '+', 'COUNT', 1)
    if #e == 0 then break end
    if tonumber(e[1][2][2]) < cutoff then lo = seq_of(e[1][1]) + 1 else hi = mid end
  end
  redis.call('XTRIM', key, 'MINID', lo .. '-1')
end

local seqs = {}
local n = (#ARGV - 5) / 4
for i = 0, n - 1 do
  local stream, channel, kind, data = ARGV[6 + i * 4], ARGV[7 + i * 4], ARGV[8 + i * 4], ARGV[9 + i * 4]
  local seq_key, buf_key = KEYS[1 + i * 2], KEYS[2 + i * 2]
  local seq = redis.call('INCR', seq_key)
  local frame = '{"type":"' .. kind .. '","stream":' .. cjson.encode(stream) .. ',"seq":' .. seq
    .. ',"data":' .. data .. '}'
  redis.call('XADD', buf_key, seq .. '-1', 't', now, 'f', frame)
  redis.call('PUBLISH', channel, cmsgpack.pack({type = frame_type, stream = stream, seq = seq, frame = frame}))
  if seq % trim_every == 0 then trim(buf_key, seq) end
  seqs[#seqs + 1] = seq
end
return seqs
"""


@dataclass(frozen=True, slots=True)
class Message:
    """One message for a stream: kind is the frame type ('bar' or 'trade'), data its JSON text."""

    stream: str
    kind: str
    data: str


class Publisher:
    """Publishes committed records; one instance per process, thread-confined."""

    def __init__(self, url: str | None = None) -> None:
        self.client = redis.Redis.from_url(url or settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
        self.script = self.client.register_script(PUBLISH_LUA)

    def publish(self, messages: Sequence[Message], *, chunk: int = 500) -> list[int]:
        """Publish messages in order; return the seq Redis gave each. Call only after the commit."""
        seqs: list[int] = []
        for start in range(0, len(messages), chunk):
            part = messages[start : start + chunk]
            keys: list[str] = []
            args: list[Any] = [
                int(time.time() * 1000), BUFFER_MIN_MESSAGES, BUFFER_MIN_SECONDS * 1000, TRIM_EVERY, FRAME_TYPE,
            ]  # fmt: skip
            for m in part:
                keys += [SEQ_KEY.format(stream=m.stream), BUFFER_KEY.format(stream=m.stream)]
                args += [m.stream, CHANNEL_PREFIX + group_name(m.stream), m.kind, m.data]
            seqs.extend(int(s) for s in self.script(keys=keys, args=args))
        return seqs

    def close(self) -> None:
        self.client.close()
