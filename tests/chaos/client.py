"""A WebSocket client that holds one stream through failures, as a trading UI would, and checks every seq.

It connects to the first gateway URL, subscribes, and on a lost connection reconnects to
the next URL (round robin) with ``resume`` from the last seq it holds. It counts gaps and
duplicates of seq, duplicate data (the same bar ``ts`` delivered twice on a stream of
final bars), the fresh snapshots it was given (``recovered:false``), and how long each
outage lasted from the lost connection (or the last message before a silent stall) until
the stream was whole again (``resumed`` or the next in-order message).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

RETRY_S = 0.1  # between reconnect attempts


@dataclass
class StreamClient:
    """One stream through any number of reconnects; ``run`` until ``stop`` is set."""

    urls: list[str]
    stream: str
    snapshot: int = 0
    seq: int | None = None
    bars: dict[str, dict[str, Any]] = field(default_factory=dict)  # ts -> data: the client's chart
    ts_seen: Counter[str] = field(default_factory=Counter)  # stream messages per ts
    messages: int = 0
    gaps: int = 0  # seqs skipped without a fresh snapshot
    duplicates: int = 0  # seqs received twice
    resnapshots: int = 0  # recovered:false answers (asked or not)
    recovered: int = 0  # recovered:true answers
    connects: int = 0
    outages: list[float] = field(default_factory=list)  # seconds from lost to whole again
    lost_at: float | None = None
    last_message_at: float = 0.0
    url_index: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.urls[self.url_index % len(self.urls)]

    async def run(self, stop: asyncio.Event, *, deadline_s: float = 600.0) -> None:
        """Hold the stream until ``stop`` (or ``deadline_s``), reconnecting as needed."""
        end = time.monotonic() + deadline_s
        while not stop.is_set() and time.monotonic() < end:
            try:
                async with connect(self.url, open_timeout=5, close_timeout=1, ping_interval=None, compression=None,
                                   proxy=None, max_size=None) as ws:  # fmt: skip
                    self.connects += 1
                    request: dict[str, Any] = {"op": "subscribe", "id": self.connects, "streams": [self.stream]}
                    if self.seq is not None:
                        request["resume"] = {self.stream: self.seq}
                    else:
                        request["snapshot"] = self.snapshot
                    await ws.send(json.dumps(request))
                    reader = asyncio.ensure_future(self._read(ws))
                    stopper = asyncio.ensure_future(stop.wait())
                    try:
                        await asyncio.wait({reader, stopper}, timeout=max(0.0, end - time.monotonic()),
                                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                    finally:
                        stopper.cancel()
                        if not reader.done():
                            reader.cancel()
                            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                                await reader
                        else:
                            reader.result()
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
                if self.lost_at is None:
                    self.lost_at = time.monotonic()
                self.errors.append(f"{self.url}: {type(exc).__name__}")
                self.url_index += 1  # the next gateway
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_S)

    async def _read(self, ws: Any) -> None:
        async for raw in ws:
            self.on_message(json.loads(raw))
        raise ConnectionClosed(None, None)

    def _whole(self) -> None:
        if self.lost_at is not None:
            self.outages.append(time.monotonic() - self.lost_at)
            self.lost_at = None

    def on_message(self, m: dict[str, Any]) -> None:
        kind = m.get("type")
        now = time.monotonic()
        if kind in ("bar", "trade"):
            seq = m["seq"]
            self.last_message_at = now
            if self.seq is not None and seq <= self.seq:
                self.duplicates += 1
                return
            # seq 0: the stream had no message yet; it starts at its creation time x 1,000
            # (epoch seqs), so its first message is not 1 (a fresh stream, not a gap).
            if self.seq and seq > self.seq + 1:
                self.gaps += seq - self.seq - 1
            self.seq = seq
            self.messages += 1
            ts = m["data"]["ts"]
            self.ts_seen[ts] += 1
            self.bars[ts] = m["data"]
            self._whole()
        elif kind == "subscribed":
            self.seq = m["seq"]
            for item in m["snapshot"]:
                self.bars[item["ts"]] = item
            self._whole()
        elif kind == "resumed":
            if m["recovered"]:
                self.recovered += 1
            else:
                self.resnapshots += 1
                self.seq = m["seq"]
                for item in m["snapshot"]:
                    self.bars[item["ts"]] = item
            self._whole()
        elif kind == "error":
            self.errors.append(f"error frame: {m}")

    def mark_lost(self) -> None:
        """The caller knows the stream broke (e.g. it restarted a server) before any socket noticed."""
        if self.lost_at is None:
            self.lost_at = time.monotonic()

    @property
    def duplicate_data(self) -> int:
        return sum(n - 1 for n in self.ts_seen.values() if n > 1)
