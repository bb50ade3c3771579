"""The one publish path: after a commit, frames go to Redis with a per-stream seq.

One Lua script per batch (per SCRIPT_STREAMS streams of it) does, atomically in Redis, for
each stream the batch touched:
INCRBY the stream's seq by its number of messages, append the messages' data to the
stream's replay buffer as one entry, and PUBLISH them as one message to the stream's
Channels group (channels_redis' RedisPubSubChannelLayer wire format: msgpack of the
message dict). Redis assigns the seqs, so seq rises by exactly one per message whichever
process publishes, and the buffer and the fan-out can never disagree on order. One entry
and one PUBLISH per stream per batch, not per message, and no work per message in the
script: the data texts travel newline-joined (JSON text never holds a raw newline), and
the gateway builds each frame ``{"type","stream","seq","data"}`` from the first seq
(``frames_build``). Building the frames in the script cost Redis 4.5 us a message, more
than the rest of the publish; a batch of a thousand bars now costs it a few dozen
commands and no string work.

Replay buffer ``md:buf:<stream>``: a Redis stream whose entry ids are ``<last seq>-1``;
each entry holds ``n`` (messages in it), ``t`` (ms), ``k`` (the frame type: ``bar`` or
``trade``) and ``d`` (the messages' data, newline-joined). It keeps at least the last BUFFER_MIN_MESSAGES
messages and everything younger than BUFFER_MIN_SECONDS, trimmed every TRIM_EVERY seqs.
Seq never goes back, even when Redis loses its data (a restart without persistence): a
stream's seq starts at its creation time in ms x 1,000 (about 1.8e15 in 2026, well
inside the 2^53 a JavaScript number holds exactly), so a stream created again after a
loss starts above wherever the old one ended (unless it averaged over 1,000 messages a
ms). A client resuming from an old seq then finds the buffer does not reach back and
gets a fresh snapshot, never a replay of different messages under the same seqs; a
gateway sees a gap and does the same. Test settings start seqs at 1
(``STREAM_SEQ_EPOCH``) so tests can name them.

One channel message: {"type": "stream.frames", "stream", "kind", "first", "joined", "t"},
where ``joined`` is the data texts newline-joined and ``t`` the publish time in ms (for
the gateway's publish-to-send latency). The publisher packs it up to the joined text
and the script appends ``first`` (packing a table per stream with the script's cmsgpack
was a quarter of its time). ``message_frames`` turns it into frames; it also
reads the format of earlier versions (a ``frames`` list), so gateways can be upgraded
before ingesters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack
import redis
from django.conf import settings

from .streams import group_name

BUFFER_MIN_MESSAGES = 1000
BUFFER_MIN_SECONDS = 600
# A trim binary-searches the buffer (XRANGE a dozen times): every 500 seqs, not 100, took
# its share of the publish script from 20% to 7%; a buffer holds at most 500 more messages.
TRIM_EVERY = 500
SEQ_KEY = "md:seq:{stream}"  # the script builds these two from the stream name itself
BUFFER_KEY = "md:buf:{stream}"
FRAMES_TYPE = "stream.frames"
# A stream's first seq (see the module docstring): its creation time in ms times this.
SEQ_EPOCH_PER_MS = 1000
BATCH_KEY = "md:published:{batch_id}"
SCRIPT_STREAMS = 64  # streams per publish script (see Publisher.publish_groups)
BATCH_ID_TTL_S = 3600

PUBLISH_LUA = """
local now = tonumber(ARGV[1])
local keep_n = tonumber(ARGV[2])
local keep_ms = tonumber(ARGV[3])
local trim_every = tonumber(ARGV[4])
local FIRST_KEY = ARGV[5]

-- Seqs pass 1e14, where Lua's own number-to-text switches to exponent notation.
local function int(n) return string.format('%d', n) end
local function seq_of(id) return tonumber(string.match(id, '^(%d+)')) end

-- Drop whole entries that are both older than keep_ms and wholly before the last keep_n seqs.
local function trim(key, last)
  local floor_seq = last - keep_n + 1
  if floor_seq <= 1 then return end
  local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
  if #first == 0 then return end
  local lo, hi, cutoff = seq_of(first[1][1]), floor_seq, now - keep_ms
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local e = redis.call('XRANGE', key, int(mid) .. '-1', '+', 'COUNT', 1)
    if #e == 0 then break end
    if tonumber(e[1][2][4]) < cutoff then lo = seq_of(e[1][1]) + 1 else hi = mid end
  end
  redis.call('XTRIM', key, 'MINID', int(lo) .. '-1')
end

local lasts = {}
local seq_base = tonumber(ARGV[7])
local batch_ttl = tonumber(ARGV[9])
local batch_key = ARGV[8]
if batch_key ~= '' then
  local done = redis.call('GET', batch_key)
  if done then  -- this batch was published already (a retry after a lost reply): same answer, nothing sent
    local out = {}
    for piece in string.gmatch(done, '%d+') do out[#out + 1] = tonumber(piece) end
    return out
  end
end
local groups = cmsgpack.unpack(ARGV[6])
for i = 1, #groups do
  local stream, channel, kind, n, joined, head = groups[i][1], groups[i][2], groups[i][3], groups[i][4],
    groups[i][5], groups[i][6]
  local buf_key = 'md:buf:' .. stream
  local seq_key = 'md:seq:' .. stream
  local last = redis.call('INCRBY', seq_key, n)
  -- A stream's seqs start at seq_base (see the module docstring); an existing key already
  -- holds at least seq_base > n, so last == n only when INCRBY just created it.
  if seq_base > 0 and last == n then last = redis.call('INCRBY', seq_key, seq_base) end
  local first = last - n + 1
  redis.call('XADD', buf_key, int(last) .. '-1', 'n', n, 't', now, 'k', kind, 'd', joined)
  -- The channel message is msgpack that the publisher packed up to the joined text's
  -- header; only "first" is Redis's to add (a uint64: 0xcf and 8 bytes big-endian).
  redis.call('PUBLISH', channel, head .. joined .. FIRST_KEY .. struct.pack('>BI8', 0xcf, first))
  if math.floor(last / trim_every) ~= math.floor((first - 1) / trim_every) then trim(buf_key, last) end
  lasts[#lasts + 1] = last
end
if batch_key ~= '' then
  local texts = {}
  for i = 1, #lasts do texts[i] = int(lasts[i]) end
  redis.call('SET', batch_key, table.concat(texts, ','), 'EX', batch_ttl)
end
return lasts
"""


@lru_cache(maxsize=65536)
def _frame_prefix(kind: str, stream: str) -> str:
    return f'{{"type":{json.dumps(kind)},"stream":{json.dumps(stream)},"seq":'


def frames_build(kind: str, stream: str, first: int, datas: Sequence[str]) -> list[str]:
    """The frames of messages ``first ..`` of a stream: ``{"type","stream","seq","data"}``."""
    prefix = _frame_prefix(kind, stream)
    return [f'{prefix}{seq},"data":{data}}}' for seq, data in enumerate(datas, first)]


def message_frames(message: dict[str, Any]) -> list[str]:
    """The frames of one published channel message (this version's, or a list of frames as before)."""
    frames = message.get("frames")
    if frames is not None:
        return list(frames)
    return frames_build(message["kind"], message["stream"], message["first"], message["joined"].split("\n"))


def channel_of(stream: str) -> str:
    """The Redis pub/sub channel of a stream's group (channels_redis.pubsub's naming)."""
    return f"{settings.CHANNELS_PREFIX}__group__{group_name(stream)}"


# The channel message is packed here, not in the script (cmsgpack.pack of a table per
# stream was a quarter of the script's time): a 6-entry map whose last two entries are
# "joined" (its text follows this header) and "first", which the script appends.
_T_KEY = msgpack.packb("t")
_JOINED_KEY = msgpack.packb("joined")
_FIRST_KEY = msgpack.packb("first")


@lru_cache(maxsize=65536)
def _stream_head(prefix: str, stream: str, kind: str) -> tuple[str, bytes]:
    """A stream's channel, and its channel message's map header and fixed entries."""
    fixed = msgpack.packb({"type": FRAMES_TYPE, "stream": stream, "kind": kind})[1:]  # without its 3-entry header
    return f"{prefix}__group__{group_name(stream)}", b"\x86" + fixed


def _str_header(size: int) -> bytes:
    """The "joined" key and the msgpack str header of a ``size``-byte UTF-8 text."""
    if size < 32:
        return _JOINED_KEY + bytes([0xA0 | size])
    if size < 0x100:
        return _JOINED_KEY + b"\xd9" + size.to_bytes(1, "big")
    if size < 0x10000:
        return _JOINED_KEY + b"\xda" + size.to_bytes(2, "big")
    return _JOINED_KEY + b"\xdb" + size.to_bytes(4, "big")


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

    def publish(
        self, messages: Sequence[Message], *, now_ms: int | None = None, batch_id: str | None = None
    ) -> dict[str, int]:
        """Publish messages, in order within each stream; return each stream's last seq. Only after the commit.

        With a ``batch_id``, publishing the same batch again (a retry after the reply was
        lost, the script having run) sends nothing and returns the first answer: a retry
        never repeats messages under new seqs. Ids are remembered for BATCH_ID_TTL_S.
        """
        groups: dict[tuple[str, str], list[str]] = {}
        for m in messages:
            groups.setdefault((m.stream, m.kind), []).append(m.data)
        return self.publish_groups(groups, now_ms=now_ms, batch_id=batch_id)

    def publish_groups(
        self, groups: dict[tuple[str, str], list[str]], *, now_ms: int | None = None, batch_id: str | None = None
    ) -> dict[str, int]:
        """``publish`` for messages already grouped: (stream, kind) -> data texts, in order.

        In scripts of at most SCRIPT_STREAMS streams: Redis runs one script at a time, and
        a whole batch's script (4 ms for 1,000 bars) held up everything else meanwhile,
        the ingester's cache-version bumps right after each commit among them. A retried
        batch repeats none of its scripts that ran (each has its own id).
        """
        items = list(groups.items())
        now = now_ms or int(time.time() * 1000)
        seq_base = now * SEQ_EPOCH_PER_MS if settings.STREAM_SEQ_EPOCH else 0
        lasts: dict[str, int] = {}
        for part, start in enumerate(range(0, len(items), SCRIPT_STREAMS)):
            chunk = items[start : start + SCRIPT_STREAMS]
            # One msgpack argument: redis-py's Python encoder packing thousands of separate
            # arguments cost more than the script itself.
            prefix = settings.CHANNELS_PREFIX
            t_entry = _T_KEY + msgpack.packb(now)
            rows = []
            for (stream, kind), datas in chunk:
                channel, head = _stream_head(prefix, stream, kind)
                joined = "\n".join(datas).encode()
                rows.append((stream, channel, kind, len(datas), joined, head + t_entry + _str_header(len(joined))))
            payload = msgpack.packb(rows, use_bin_type=False)  # the script's cmsgpack reads no bin type
            batch_key = BATCH_KEY.format(batch_id=f"{batch_id}:{part}") if batch_id else ""
            args: list[Any] = [
                now, BUFFER_MIN_MESSAGES, BUFFER_MIN_SECONDS * 1000, TRIM_EVERY, _FIRST_KEY, payload, seq_base,
                batch_key, BATCH_ID_TTL_S,
            ]  # fmt: skip
            replies = self.script(keys=[], args=args)
            lasts.update((stream, int(last)) for ((stream, _), _), last in zip(chunk, replies, strict=True))
        return lasts

    def close(self) -> None:
        self.client.close()
