"""The one publish path: after a commit, frames go to Redis with a per-stream seq.

One Redis transaction per batch (per TX_STREAMS streams of it) does, atomically, for each
stream the batch touched: advance the stream's seq by its number of messages, append the
messages' data to the stream's replay buffer as one entry, and PUBLISH them as one
message to the stream's Channels group (channels_redis' RedisPubSubChannelLayer wire
format: msgpack of the message dict). The publisher WATCHes the streams' seq keys, reads
them, and sends MULTI, the new seqs, the entries and the messages, EXEC: should another
process publish to one of those streams in between, EXEC does nothing and the publisher
reads the seqs again. So seq rises by exactly one per message whichever process
publishes, and the buffer and the fan-out never disagree on order. One entry and one
PUBLISH per stream per batch, not per message: the data texts travel newline-joined
(JSON text never holds a raw newline), and the gateway builds each frame
``{"type","stream","seq","data"}`` from the first seq (``frames_build``).

Not a Lua script, as it was until 2026-11-26: every string a script touches is made a Lua
string, at about 1.4 ns a byte of Redis time (its ARGV alone: a script that did nothing
with a batch's data cost as much as one that published it), which made a bar's message
cost Redis about a microsecond and a stream's entry 20 us. The commands of a transaction
take their arguments as they come. The commands are packed here (``_bulk``), not by
redis-py, whose Python packer cost more than the publish itself.

Replay buffer ``md:buf:<stream>``: a Redis stream whose entry ids are ``<last seq>-1``;
each entry holds ``n`` (messages in it), ``t`` (ms), ``k`` (the frame type: ``bar`` or
``trade``) and ``d`` (the messages' data, newline-joined). It keeps at least the last BUFFER_MIN_MESSAGES
messages and everything younger than BUFFER_MIN_SECONDS, trimmed every TRIM_EVERY seqs
(after the transaction, by a small script: a trim only drops old entries, so it needs
no atomicity with the appends).
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
the gateway's publish-to-send latency), packed by hand around the joined text (which is
not copied into a dict to be packed again). ``message_frames`` turns it into frames; it also
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

from ops import tracing

from .streams import group_name

BUFFER_MIN_MESSAGES = 1000
BUFFER_MIN_SECONDS = 600
# A trim reads buffer entries (TRIM_LUA): every 500 seqs, not 100, cut its share of the
# publish from 20% to 7% (measured with the Lua publisher); a buffer holds at most 500 more messages.
TRIM_EVERY = 500
SEQ_KEY = "md:seq:{stream}"
BUFFER_KEY = "md:buf:{stream}"
FRAMES_TYPE = "stream.frames"
# A stream's first seq (see the module docstring): its creation time in ms times this.
SEQ_EPOCH_PER_MS = 1000
BATCH_KEY = "md:published:{batch_id}"
TX_STREAMS = 64  # streams per transaction (see Publisher.publish_groups)
BATCH_ID_TTL_S = 3600
WATCH_ATTEMPTS = 100  # transactions a publish tries while other publishers keep changing its streams' seqs

# Drop whole entries of each buffer in KEYS that are both older than keep_ms and wholly
# before its last keep_n seqs (ARGV[3 + i]: the buffer's last seq). Entry times rise with
# their seqs, so: nothing when the first entry is young (a replay at full speed); up to
# the last keep_n when the entry there is old (a live stream keeps its last keep_n);
# else a binary search over the entry ids between, reading each probe's time. Every
# entry read is made a Lua string (its data too, at ~1.4 ns a byte): probes are few.
TRIM_LUA = """
local now, keep_n, keep_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cutoff = now - keep_ms

-- Seqs pass 1e14, where Lua's own number-to-text switches to exponent notation.
local function int(n) return string.format('%d', n) end
local function seq_of(id) return tonumber(string.match(id, '^(%d+)')) end
-- The first entry whose last seq is at or after seq: its last seq and time, or nil.
local function probe(key, seq)
  local e = redis.call('XRANGE', key, int(seq) .. '-1', '+', 'COUNT', 1)
  if #e == 0 then return nil end
  return seq_of(e[1][1]), tonumber(e[1][2][4])
end

for i = 1, #KEYS do
  local key, last = KEYS[i], tonumber(ARGV[3 + i])
  local floor_seq = last - keep_n + 1
  local first, first_t = probe(key, 0)
  if floor_seq > 1 and first ~= nil and first < floor_seq and first_t < cutoff then
    local lo, hi = first + 1, floor_seq
    local at, at_t = probe(key, floor_seq)
    if at ~= nil and at_t < cutoff then lo = floor_seq end
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local seq, t = probe(key, mid)
      if seq == nil then break end
      if t < cutoff then lo = seq + 1 else hi = mid end
    end
    redis.call('XTRIM', key, 'MINID', int(lo) .. '-1')
  end
end
return 0
"""


@lru_cache(maxsize=65536)
def _frame_prefix(kind: str, stream: str) -> str:
    return f'{{"type":{json.dumps(kind)},"stream":{json.dumps(stream)},"seq":'


def frames_build(kind: str, stream: str, first: int, datas: Sequence[str]) -> list[str]:
    """The frames of messages ``first ..`` of a stream: ``{"type","stream","seq","data"}``."""
    prefix = _frame_prefix(kind, stream)
    return [f'{prefix}{seq},"data":{data}}}' for seq, data in enumerate(datas, first)]


def frame_data(frame: str) -> str:
    """The ``data`` JSON text of a frame frames_build wrote (a property test holds it to a parser)."""
    # The stream name is a JSON string (a raw '"' in it is escaped), so the first
    # ',"data":' after '"seq":' is the field itself.
    start = frame.index(',"data":', frame.index('"seq":')) + 8
    return frame[start:-1]


def message_frames(message: dict[str, Any]) -> list[str]:
    """The frames of one published channel message (this version's, or a list of frames as before)."""
    frames = message.get("frames")
    if frames is not None:
        return list(frames)
    return frames_build(message["kind"], message["stream"], message["first"], message["joined"].split("\n"))


def channel_of(stream: str) -> str:
    """The Redis pub/sub channel of a stream's group (channels_redis.pubsub's naming)."""
    return f"{settings.CHANNELS_PREFIX}__group__{group_name(stream)}"


# The channel message, packed by hand: a 6-entry map whose last two entries are "joined"
# (its text follows this header) and "first".
_T_KEY = msgpack.packb("t")
_JOINED_KEY = msgpack.packb("joined")
_FIRST_KEY = msgpack.packb("first")


@dataclass(frozen=True, slots=True)
class _StreamHead:
    """What a stream's commands and channel message begin with (made once per stream)."""

    seq_key: bytes
    xadd: bytes  # the XADD command up to its id: *11, XADD, the buffer key
    publish: bytes  # the PUBLISH command up to its message: *3, PUBLISH, the channel
    kind: bytes  # the bulk string of the frame type
    message: bytes  # the channel message's map header and fixed entries


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _command(*args: bytes) -> bytes:
    """One RESP command."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


_MULTI = _command(b"MULTI")
_EXEC = _command(b"EXEC")
_UNWATCH = _command(b"UNWATCH")
_XADD_N, _XADD_T, _XADD_K, _XADD_D = (_bulk(field) for field in (b"n", b"t", b"k", b"d"))


@lru_cache(maxsize=65536)
def _stream_head(prefix: str, stream: str, kind: str) -> _StreamHead:
    fixed = msgpack.packb({"type": FRAMES_TYPE, "stream": stream, "kind": kind})[1:]  # without its 3-entry header
    channel = f"{prefix}__group__{group_name(stream)}".encode()
    return _StreamHead(
        seq_key=SEQ_KEY.format(stream=stream).encode(),
        xadd=b"*11\r\n" + _bulk(b"XADD") + _bulk(BUFFER_KEY.format(stream=stream).encode()),
        publish=b"*3\r\n" + _bulk(b"PUBLISH") + _bulk(channel),
        kind=_bulk(kind.encode()),
        message=b"\x86" + fixed,
    )


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


class PublishConflictError(redis.RedisError):
    """Other publishers changed this batch's streams' seqs WATCH_ATTEMPTS times in a row."""


class Publisher:
    """Publishes committed records; one instance per process, thread-confined."""

    def __init__(self, url: str | None = None) -> None:
        self.client = redis.Redis.from_url(url or settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
        self.trim = self.client.register_script(TRIM_LUA)

    def publish(
        self, messages: Sequence[Message], *, now_ms: int | None = None, batch_id: str | None = None
    ) -> dict[str, int]:
        """Publish messages, in order within each stream; return each stream's last seq. Only after the commit.

        With a ``batch_id``, publishing the same batch again (a retry after the reply was
        lost, the transaction having run) sends nothing and returns the first answer: a
        retry never repeats messages under new seqs. Ids are remembered for BATCH_ID_TTL_S.
        """
        groups: dict[tuple[str, str], list[str]] = {}
        for m in messages:
            groups.setdefault((m.stream, m.kind), []).append(m.data)
        return self.publish_groups(groups, now_ms=now_ms, batch_id=batch_id)

    @tracing.traced(  # the commands go out on a connection of their own: redis-py's instrumentation sees none
        "publish.batch", lambda self, groups, **_: {"streams": len(groups), "messages": sum(map(len, groups.values()))}
    )
    def publish_groups(
        self, groups: dict[tuple[str, str], list[str]], *, now_ms: int | None = None, batch_id: str | None = None
    ) -> dict[str, int]:
        """``publish`` for messages already grouped: (stream, kind) -> data texts, in order.

        In transactions of at most TX_STREAMS streams: Redis runs one transaction at a
        time, and a whole batch's held up everything else meanwhile, the ingester's
        cache-version bumps right after each commit among them. A retried batch repeats
        none of its transactions that ran (each has its own id).
        """
        items = list(groups.items())
        now = now_ms or int(time.time() * 1000)
        seq_base = now * SEQ_EPOCH_PER_MS if settings.STREAM_SEQ_EPOCH else 0
        lasts: dict[str, int] = {}
        trims: dict[str, int] = {}
        for part, start in enumerate(range(0, len(items), TX_STREAMS)):
            chunk = items[start : start + TX_STREAMS]
            batch_key = BATCH_KEY.format(batch_id=f"{batch_id}:{part}").encode() if batch_id else None
            for ((stream, _), datas), last in zip(
                chunk, self._transaction(chunk, now, seq_base, batch_key), strict=True
            ):
                lasts[stream] = last
                if last // TRIM_EVERY != (last - len(datas)) // TRIM_EVERY:
                    trims[BUFFER_KEY.format(stream=stream)] = last
        if trims:
            keys = list(trims)
            self.trim(keys=keys, args=[now, BUFFER_MIN_MESSAGES, BUFFER_MIN_SECONDS * 1000, *trims.values()])
        return lasts

    def _transaction(
        self, chunk: list[tuple[tuple[str, str], list[str]]], now: int, seq_base: int, batch_key: bytes | None
    ) -> list[int]:
        """Publish one chunk of streams in one transaction; their last seqs."""
        prefix = settings.CHANNELS_PREFIX
        heads = [_stream_head(prefix, stream, kind) for (stream, kind), _ in chunk]
        joined = ["\n".join(datas).encode() for _, datas in chunk]
        seq_keys = [h.seq_key for h in heads]
        read = _command(b"WATCH", *seq_keys) + _command(b"MGET", *seq_keys, *([batch_key] if batch_key else []))
        t_bulk, t_entry = _bulk(b"%d" % now), _T_KEY + msgpack.packb(now)
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            for _ in range(WATCH_ATTEMPTS):
                conn.send_packed_command([read])
                conn.read_response()  # WATCH: OK
                values = conn.read_response()
                if batch_key is not None:
                    done = values.pop()
                    if done is not None:  # this chunk was published already (a retry after a lost reply)
                        conn.send_packed_command([_UNWATCH])
                        conn.read_response()
                        return [int(piece) for piece in done.split(b",")]
                lasts = []
                mset = [b"MSET"]
                body = []
                for head, data, value, (_, datas) in zip(heads, joined, values, chunk, strict=True):
                    n = len(datas)
                    first = (int(value) if value is not None else seq_base) + 1
                    last = first + n - 1
                    lasts.append(last)
                    mset += (head.seq_key, b"%d" % last)
                    body.append(head.xadd + _bulk(b"%d-1" % last) + _XADD_N + _bulk(b"%d" % n) + _XADD_T + t_bulk)
                    body.append(_XADD_K + head.kind + _XADD_D + _bulk(data))  # (the rest of the XADD)
                    message = head.message + t_entry + _str_header(len(data)) + data + _FIRST_KEY
                    body.append(head.publish + _bulk(message + b"\xcf" + first.to_bytes(8, "big")))
                tail = [_command(*mset)]
                if batch_key is not None:
                    done_text = b",".join(b"%d" % last for last in lasts)
                    tail.append(_command(b"SET", batch_key, done_text, b"EX", b"%d" % BATCH_ID_TTL_S))
                # Joined, so one write: redis-py sends a list item by item.
                conn.send_packed_command([b"".join([_MULTI, *body, *tail, _EXEC])])
                for _ in range(1 + 2 * len(heads) + len(tail)):
                    conn.read_response()  # MULTI: OK; then each command: QUEUED
                replies = conn.read_response()
                if replies is None:
                    continue  # another publisher changed a seq meanwhile: read them again
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
                return lasts
            raise PublishConflictError(f"seqs kept changing under {WATCH_ATTEMPTS} transactions; try again")
        except BaseException:
            conn.disconnect()  # replies may be left unread: the connection is not reused
            raise
        finally:
            pool.release(conn)

    def close(self) -> None:
        self.client.close()
