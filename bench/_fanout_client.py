"""Client processes of bench/fanout.py: many WebSocket connections on one asyncio loop.

A deliberately thin client (an asyncio.Protocol that reads RFC 6455 frames itself) so the
clients cost the 2 shared cores as little as possible: the server under test, not the
client library, should be what runs out of CPU. Server frames are unmasked, so reading
one is a header and a slice; only what the client sends (subscribe, pong, close) is
masked. Standard library and orjson only: this module runs in spawned processes and
never imports Django.

Each connection subscribes to one stream (``snapshot: 0``), takes the ``seq`` of its
``subscribed`` answer as its start, then checks every frame of that stream: seq must
rise by exactly one. A seq ahead of the expected one opens a gap (its seqs are lost
unless they arrive later, which makes them out of order); a seq already seen is a
duplicate. The publish time is in the bar's ``volume`` (ns, wall clock), so the latency
is arrival minus publish on the same machine's clock.

The parent drives a process over a Pipe with tuples: ``("connect", specs, limit,
timeout_s)``, ``("finish", final_seqs, drain_s)``, ``("close",)`` (all connections) and
``("exit",)``; each is answered with one dict.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from array import array
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import orjson

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PATH = "/ws/v1/stream"
MAX_HOLES = 100_000  # a gap wider than this is counted, not remembered seq by seq
RETRIES = 5  # subscribes answered "unavailable" are sent again, backing off from 0.2 s


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client-to-server frame (FIN set, masked as RFC 6455 requires of clients)."""
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    body = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return header + mask + body


class Tally:
    """What the connections of one tag (one app on one server) saw since the last finish."""

    def __init__(self) -> None:
        self.frames = 0  # data frames of the subscribed stream, in order or not
        self.ooo = 0
        self.dup = 0
        self.late = 0  # seqs already written off as lost by an earlier finish
        self.latencies_us = array("q")
        self.first_ns = 0
        self.last_ns = 0
        self.types: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()


class Client(asyncio.Protocol):
    """One WebSocket connection subscribed to one stream."""

    def __init__(self, proc: ClientProcess, tag: str, port: int, stream: str) -> None:
        self.proc, self.tag, self.port, self.stream = proc, tag, port, stream
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.buf = b""
        self.fragments: list[bytes] = []
        self.base: int | None = None  # seq in the subscribed answer
        self.next = 0  # the seq expected next
        self.floor = 0  # seqs below it were settled by a finish
        self.missing: set[int] = set()
        self.skipped = 0  # seqs jumped over in one go, beyond MAX_HOLES
        self.subscribed = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.retries = 0
        self.lost_connection = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{self.port}\r\n\r\n".encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_connection = True
        self.proc.open -= 1
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"closed before subscribed (code {self.close_code})"))

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self.buf + data if self.buf else data
        pos = 0
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self.fail(f"handshake: {status.decode(errors='replace')}")
                return
            self.upgraded = True
            self.subscribe()
            pos = end + 4
        n = len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            masked = b1 & 0x80
            end = pos + head + (4 if masked else 0) + length
            if end > n:
                break
            payload = buf[end - length : end]
            if masked:  # servers must not mask; tolerate it anyway
                mask = buf[end - length - 4 : end - length]
                key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
                payload = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")
            pos = end
            self.frame(b0 & 0x80, b0 & 0x0F, payload, now)
        self.buf = buf[pos:]

    # frames

    def frame(self, fin: int, opcode: int, payload: bytes, now: int) -> None:
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            if not fin:
                self.fragments.append(payload)
                return
            if self.fragments:
                payload = b"".join([*self.fragments, payload])
                self.fragments = []
            self.message(payload, now)
        elif opcode == OP_PING:
            self.write(masked_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.proc.closes[(self.tag, self.close_code)] += 1
            self.write(masked_frame(OP_CLOSE, payload[:2]))
            if self.transport is not None:
                self.transport.close()

    def message(self, payload: bytes, now: int) -> None:
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.proc.tally[self.tag].errors["bad_json"] += 1
            return
        for msg in parsed if isinstance(parsed, list) else [parsed]:
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == "bar" and msg.get("stream") == self.stream and self.base is not None:
                self.bar(msg["seq"], msg["data"]["volume"], now)
            elif kind == "subscribed":
                self.base = int(msg.get("seq") or 0)
                self.next = self.floor = self.base + 1
                if not self.subscribed.done():
                    self.subscribed.set_result(self.base)
            elif kind == "error" and msg.get("code") == "unavailable" and self.retries < RETRIES:
                # "unavailable": the server could not serve it just now; try again (SPEC section 5).
                self.retries += 1
                self.proc.retries[self.tag] += 1
                asyncio.get_running_loop().call_later(0.1 * 2**self.retries, self.subscribe)
            elif kind == "error":
                self.proc.tally[self.tag].errors[str(msg.get("code"))] += 1
                if not self.subscribed.done():
                    self.subscribed.set_exception(ConnectionError(f"error: {msg}"))
            else:
                self.proc.tally[self.tag].types[str(kind)] += 1

    def bar(self, seq: int, sent_ns: int, now: int) -> None:
        tally = self.proc.tally[self.tag]
        expected = self.next
        if seq == expected:
            self.next = seq + 1
        elif seq > expected:
            if seq - expected <= MAX_HOLES:
                self.missing.update(range(expected, seq))
            else:  # too far to wait for each one (a seq restart?): counted lost at once
                self.skipped += seq - expected
            self.next = seq + 1
        elif seq in self.missing:
            self.missing.discard(seq)
            tally.ooo += 1
        elif seq < self.floor:
            tally.late += 1
            return
        else:
            tally.dup += 1
            return
        tally.frames += 1
        tally.latencies_us.append((now - sent_ns) // 1000)
        if not tally.first_ns:
            tally.first_ns = now
        tally.last_ns = now

    # output

    def subscribe(self) -> None:
        self.send(orjson.dumps({"op": "subscribe", "id": 1, "streams": [self.stream], "snapshot": 0}))

    def send(self, text: bytes) -> None:
        self.write(masked_frame(OP_TEXT, text))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fail(self, why: str) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def settle(self, final: int) -> int:
        """Count what is lost up to ``final`` and write it off: later arrivals of it are late."""
        if self.base is None:
            return 0
        last = self.next - 1
        lost = len([s for s in self.missing if s <= final]) + max(0, final - last) + self.skipped
        self.skipped = 0
        self.missing = {s for s in self.missing if s > final}
        self.floor = max(self.floor, final + 1)
        self.next = max(self.next, final + 1)
        return lost


class ClientProcess:
    """The connections of one process and the commands from the parent."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.clients: list[Client] = []
        self.tally: dict[str, Tally] = {}
        self.closes: Counter[tuple[str, int]] = Counter()
        self.retries: Counter[str] = Counter()
        self.open = 0

    async def connect(self, specs: list[tuple[str, int, str]], limit: int, timeout_s: float) -> dict[str, Any]:
        """Open one connection per (tag, port, stream), ``limit`` handshakes at a time; wait for subscribed."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(limit)
        failures: Counter[str] = Counter()
        deadline = loop.time() + timeout_s

        async def one(tag: str, port: int, stream: str) -> None:
            self.tally.setdefault(tag, Tally())
            async with gate:
                client = Client(self, tag, port, stream)
                try:
                    left = max(0.1, deadline - loop.time())
                    await asyncio.wait_for(loop.create_connection(lambda: client, "127.0.0.1", port), left)
                    self.open += 1
                    self.clients.append(client)
                    await asyncio.wait_for(client.subscribed, max(0.1, deadline - loop.time()))
                except (OSError, TimeoutError) as exc:
                    failures[f"{tag}: {type(exc).__name__}: {str(exc)[:120]}"] += 1
                    if client.transport is not None:
                        client.transport.close()

        started = time.perf_counter()
        self.retries.clear()
        await asyncio.gather(*(one(*spec) for spec in specs))
        return {"seconds": time.perf_counter() - started, "failures": dict(failures), "open": self.open,
                "retries": dict(self.retries)}  # fmt: skip

    async def finish(self, final_seqs: dict[str, int], drain_s: float) -> dict[str, Any]:
        """Wait until every live connection has its stream's final seq (or drain_s), then report and reset."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s

        def behind() -> int:
            return sum(
                1
                for c in self.clients
                if not c.lost_connection and c.base is not None and c.next <= final_seqs.get(c.stream, 0)
            )

        # Polled, not an Event: checking every connection on every frame would cost more.
        while behind() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        lost: Counter[str] = Counter()
        for c in self.clients:
            lost[c.tag] += c.settle(final_seqs.get(c.stream, 0))
        report = {}
        for tag, t in self.tally.items():
            report[tag] = {
                "frames": t.frames,
                "lost": lost[tag],
                "ooo": t.ooo,
                "dup": t.dup,
                "late": t.late,
                "latencies_us": t.latencies_us.tobytes(),
                "first_ns": t.first_ns,
                "last_ns": t.last_ns,
                "types": dict(t.types),
                "errors": dict(t.errors),
                "closed": sum(n for (tg, _), n in self.closes.items() if tg == tag),
                "close_codes": {code: n for (tg, code), n in self.closes.items() if tg == tag},
                "open": sum(1 for c in self.clients if c.tag == tag and not c.lost_connection),
            }
            self.tally[tag] = Tally()
        return report

    async def close(self) -> dict[str, Any]:
        for c in self.clients:
            if not c.lost_connection:
                c.write(masked_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        await asyncio.sleep(0.2)
        for c in self.clients:
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0.1)
        closed = len(self.clients)
        self.clients, self.tally, self.closes = [], {}, Counter()
        return {"closed": closed}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.conn.fileno(), ready.set)
        while True:
            await ready.wait()
            ready.clear()
            while self.conn.poll():
                command, *args = self.conn.recv()
                if command == "connect":
                    self.conn.send(await self.connect(*args))
                elif command == "finish":
                    self.conn.send(await self.finish(*args))
                elif command == "close":
                    self.conn.send(await self.close())
                elif command == "exit":
                    self.conn.send(await self.close())
                    return
                else:
                    self.conn.send({"error": f"unknown command {command!r}"})


def main(conn: Connection) -> None:
    """Entry point of a client process (multiprocessing, spawn)."""
    try:
        asyncio.run(ClientProcess(conn).serve())
    finally:
        conn.close()
