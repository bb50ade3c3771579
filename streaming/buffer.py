"""Reading the replay buffers that streaming.publish writes (asyncio, for the gateway).

A buffer ``md:buf:<stream>`` is a Redis stream whose entries are batches: entry id
``<last seq>-1``, fields ``n`` (messages in it), ``k`` (their frame type) and ``d``
(their data, newline-joined), so an entry covers seqs ``last - n + 1 .. last``; frames
are built from it only when they are sent. ``md:seq:<stream>`` is the last seq given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

from .publish import BUFFER_KEY, SEQ_EPOCH_PER_MS, SEQ_KEY, frame_data, frames_build

PAGE = 64  # entries per read


@dataclass(frozen=True, slots=True)
class Entry:
    """One buffer entry: the data texts of the messages with seqs first .. last."""

    stream: str
    kind: str
    first: int
    last: int
    datas: list[str]

    def frames(self, lo: int, hi: int) -> list[str]:
        """The frames of seqs lo .. hi (clipped to this entry)."""
        lo, hi = max(lo, self.first), min(hi, self.last)
        start = lo - self.first
        return frames_build(self.kind, self.stream, lo, self.datas[start : start + hi - lo + 1])


def _entries(stream: str, raw: Sequence | None) -> list[Entry]:
    out = []
    for entry_id, fields in raw or ():
        last = int(entry_id.split(b"-", 1)[0])
        n = int(fields[b"n"])
        joined = fields.get(b"d")
        if joined is not None:
            out.append(Entry(stream, fields[b"k"].decode(), last - n + 1, last, joined.decode().split("\n")))
        else:  # written by an earlier version: whole frames
            frames = fields[b"f"].decode().split("\n")
            kind = frames[0][9 : frames[0].index('"', 9)]  # {"type":"<kind>",...
            out.append(Entry(stream, kind, last - n + 1, last, [frame_data(f) for f in frames]))
    return out


def _seq(raw: bytes | None) -> int:
    return int(raw) if raw is not None else 0


def _seq_create(pipe: Any, stream: str) -> None:
    """Start a stream that has no seq yet, the way the publisher would (streaming.publish).

    A client subscribing before a stream's first message then holds its real starting
    seq, and that first message follows it: no gap to fill, no needless fresh snapshot.
    """
    if settings.STREAM_SEQ_EPOCH:
        pipe.set(SEQ_KEY.format(stream=stream), int(time.time() * 1000) * SEQ_EPOCH_PER_MS, nx=True)


class Buffer:
    """The replay buffers, through one asyncio Redis client."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def head(self, stream: str) -> tuple[int, list[Entry]]:
        """The stream's last seq and, read atomically with it, its newest entries (newest first)."""
        async with self.client.pipeline(transaction=True) as pipe:
            _seq_create(pipe, stream)
            pipe.get(SEQ_KEY.format(stream=stream))
            pipe.xrevrange(BUFFER_KEY.format(stream=stream), "+", "-", count=PAGE)
            *_, seq, raw = await pipe.execute()
        return _seq(seq), _entries(stream, raw)

    async def older(self, stream: str, before: int) -> list[Entry]:
        """Entries wholly before seq ``before`` (newest first), one page."""
        if before <= 1:
            return []
        raw = await self.client.xrevrange(BUFFER_KEY.format(stream=stream), f"{before - 1}-1", "-", count=PAGE)
        return _entries(stream, raw)

    async def after(self, stream: str, seq: int, upto: int | None = None) -> tuple[int, list[str] | None]:
        """The last seq, and the frames with seqs seq+1 .. upto (default: the last), in order.

        The frames are None when the buffer no longer reaches back to seq+1, or when seq
        is beyond the last seq (the client's seq is from before Redis lost its data).
        """
        key = BUFFER_KEY.format(stream=stream)
        async with self.client.pipeline(transaction=True) as pipe:
            _seq_create(pipe, stream)
            pipe.get(SEQ_KEY.format(stream=stream))
            pipe.xrange(key, f"{seq + 1}-1", "+", count=PAGE)
            *_, last_raw, raw = await pipe.execute()
        last = _seq(last_raw)
        end = last if upto is None else min(upto, last)
        if seq > last:
            return last, None
        if seq >= end:
            return last, []
        frames: list[str] = []
        entries = _entries(stream, raw)
        if not entries or entries[0].first > seq + 1:
            return last, None
        expect = seq + 1
        while entries:
            for entry in entries:
                if entry.first > expect:  # trimmed in between the pages: a hole
                    return last, None
                take = entry.frames(expect, end)
                frames.extend(take)
                expect += len(take)
                if expect > end:
                    return last, frames
            raw = await self.client.xrange(key, f"{expect}-1", "+", count=PAGE)
            entries = _entries(stream, raw)
        return (last, frames) if expect > end else (last, None)
