"""A stand-in for Databento's live subscription gateway (LSG), on 127.0.0.1, for ``databento.Live``.

It speaks the protocol as the official client (databento 0.88, ``databento/live/``)
expects it. Control messages are text lines of ``key=value`` pairs joined by ``|`` and
ended by ``\\n``; after ``start_session`` everything the gateway sends is DBN.

1. gateway: ``lsg_version=<version>`` and ``cram=<challenge>`` (32 random letters).
2. client: ``auth=<response>|dataset=D|encoding=dbn|ts_out=0|compression=none|
   heartbeat_interval_s=N|client=<user agent>`` where the response is
   ``sha256_hex(f"{cram}|{key}") + "-" + key[-5:]`` (the last 5 characters are the key's
   "bucket id": the gateway finds the candidate keys by them). ``heartbeat_interval_s`` is
   absent when the client did not set one.
3. gateway: ``success=1|session_id=<id>``, or ``success=0|error=<text>`` and closes.
4. client: one ``schema=S|stype_in=raw_symbol|symbols=A,B|start=<ns>|snapshot=0|id=<n>|
   is_last=1`` per subscription (``start`` absent for "from now"; symbol lists over 500
   are split with ``is_last=0``), then ``start_session=0``.
5. gateway: DBN v3: metadata (dataset, the schema when there is one, ``start``, stype_out
   instrument_id, no symbols or mappings), a SymbolMappingMsg per resolved symbol
   (``ts_event`` now, undefined start/end), an ErrorMsg (SYMBOL_RESOLUTION_FAILED) per
   unknown one, the records, a REPLAY_COMPLETED SystemMsg after an intraday replay, then
   heartbeat SystemMsgs while idle, for as long as the client stays.

The data served is a prepared list of records (OHLCVMsg, TradeMsg) sorted by time. A
subscription gets those of its schema and symbols; with ``start`` it gets those with
``ts_event >= start`` (intraday replay filters on ``ts_event`` for these schemas);
without, those from ``live_from`` on (what the stand-in's "now" is). Each connection
follows a Plan: drop the TCP connection after N data records (abort, like a network
failure), or fall silent after N (no data, no heartbeat, socket left open). Every
connection is logged: control lines, authentication, subscriptions, what was sent, and
who closed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import string
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import databento_dbn as dbn

VERSION = "0.7.2"
UNDEF_TIMESTAMP = 2**64 - 1
BUCKET_ID_LENGTH = 5
LINE_MAX = 64 * 1024
AUTH_TIMEOUT_S = 10.0
SCHEMA_RTYPES = {
    "ohlcv-1s": int(dbn.RType.OHLCV_1S),
    "ohlcv-1m": int(dbn.RType.OHLCV_1M),
    "ohlcv-1h": int(dbn.RType.OHLCV_1H),
    "ohlcv-1d": int(dbn.RType.OHLCV_1D),
}
# Schemas served by record type (tbbo sends MBP-1 records, as Databento does).
SCHEMA_KINDS: dict[str, type] = {
    "trades": dbn.TradeMsg, "mbp-1": dbn.MBP1Msg, "tbbo": dbn.MBP1Msg, "bbo-1s": dbn.BBOMsg, "bbo-1m": dbn.BBOMsg,
    "cbbo-1s": dbn.CBBOMsg, "cbbo-1m": dbn.CBBOMsg, "status": dbn.StatusMsg,
}  # fmt: skip


def cram_response(challenge: str, key: str) -> str:
    """What a client must answer to ``cram=<challenge>`` with ``key``."""
    digest = hashlib.sha256(f"{challenge}|{key}".encode()).hexdigest()
    return f"{digest}-{key[-BUCKET_ID_LENGTH:]}"


def parse_line(line: bytes) -> dict[str, str]:
    """One control line -> its fields (a line without ``=`` is a protocol error)."""
    text = line.decode("utf-8").rstrip("\n")
    fields: dict[str, str] = {}
    for token in text.split("|"):
        name, sep, value = token.partition("=")
        if not sep or not name:
            raise ValueError(f"not a control message: {text!r}")
        fields[name] = value
    return fields


def line(**fields: object) -> bytes:
    return ("|".join(f"{k}={v}" for k, v in fields.items()) + "\n").encode()


@dataclass(frozen=True)
class Plan:
    """What one connection does: drop after N data records (after lingering), or fall silent after N."""

    drop_after: int | None = None
    linger_s: float = 0.0
    stall_after: int | None = None


@dataclass
class Subscription:
    schema: str
    stype_in: str
    symbols: list[str]
    start: int | None
    snapshot: str
    id: str | None
    is_last: str
    raw: str


@dataclass
class Connection:
    """The log of one client connection."""

    index: int
    lines: list[str] = field(default_factory=list)
    auth: dict[str, str] = field(default_factory=dict)
    authenticated: bool = False
    session_id: str | None = None
    subscriptions: list[Subscription] = field(default_factory=list)
    started: bool = False
    sent: list[Any] = field(default_factory=list)  # the data records written
    ended: str = ""  # "client", "dropped", "auth_failed", "protocol_error", "server_stopped"
    done: threading.Event = field(default_factory=threading.Event)
    client_gone: asyncio.Event | None = None


class LiveGateway:
    """Serve the prepared ``records`` to ``databento.Live`` clients; use as a context manager."""

    def __init__(
        self,
        *,
        keys: Iterable[str],
        symbols: dict[str, int],
        records: Sequence[Any],
        dataset: str = "XNAS.ITCH",
        plans: Sequence[Plan] = (),
        pace_s: float = 0.0,
        live_from: int = 0,
        heartbeat_s: float | None = None,
    ) -> None:
        self.keys = list(keys)
        self.symbols = dict(symbols)
        self.records = list(records)
        self.dataset = dataset
        self.plans = list(plans)
        self.pace_s = pace_s
        self.live_from = live_from
        self.heartbeat_s = heartbeat_s  # None: the interval the client asked for
        self.connections: list[Connection] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lsg-stand-in", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions = iter(range(1, 1_000_000))

    # -- lifecycle -------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=LINE_MAX), self._loop
        ).result(timeout=5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Poll ``predicate`` until it holds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    # -- one connection ----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(index=len(self.connections), client_gone=asyncio.Event())
        self.connections.append(conn)
        plan = self.plans[conn.index] if conn.index < len(self.plans) else Plan()
        aborted = False
        try:
            aborted = await self._session(reader, writer, conn, plan)
        except asyncio.CancelledError:
            conn.ended = conn.ended or "server_stopped"
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            conn.ended = conn.ended or "client"
        except ValueError:
            conn.ended = conn.ended or "protocol_error"
        finally:
            if not aborted:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            self._tasks.discard(task)
            conn.done.set()

    async def _read(self, reader: asyncio.StreamReader, conn: Connection) -> dict[str, str]:
        raw = await asyncio.wait_for(reader.readline(), timeout=AUTH_TIMEOUT_S)
        if not raw:
            raise ConnectionResetError("client closed")
        conn.lines.append(raw.decode("utf-8").rstrip("\n"))
        return parse_line(raw)

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection, plan: Plan
    ) -> bool:
        """The whole exchange; True when the connection was aborted (dropped) here."""
        challenge = "".join(random.choices(string.ascii_letters, k=32))
        writer.write(line(lsg_version=VERSION))
        writer.write(line(cram=challenge))
        await writer.drain()

        conn.auth = await self._read(reader, conn)
        if "auth" not in conn.auth or "dataset" not in conn.auth:
            raise ValueError("expected an authentication request")
        error = self._check_auth(conn.auth, challenge)
        if error:
            writer.write(line(success=0, error=error))
            await writer.drain()
            conn.ended = "auth_failed"
            return False
        conn.authenticated = True
        conn.session_id = str(next(self._sessions))
        writer.write(line(success=1, session_id=conn.session_id))
        await writer.drain()

        while True:
            message = await self._read(reader, conn)
            if "start_session" in message:
                break
            if "schema" not in message:
                raise ValueError(f"expected a subscription or start_session, got {conn.lines[-1]!r}")
            conn.subscriptions.append(self._subscription(message, conn.lines[-1]))
        conn.started = True
        watcher = asyncio.create_task(self._watch(reader, conn))
        try:
            return await self._stream(writer, conn, plan)
        finally:
            watcher.cancel()

    def _check_auth(self, auth: dict[str, str], challenge: str) -> str:
        """The error text for a refused authentication request, or '' when it is good."""
        response = auth["auth"]
        bucket = response.rpartition("-")[2]
        candidates = [k for k in self.keys if k[-BUCKET_ID_LENGTH:] == bucket]
        if not any(hmac.compare_digest(cram_response(challenge, k), response) for k in candidates):
            return "Authentication failed."
        if auth["dataset"] != self.dataset:
            return f"Unknown dataset {auth['dataset']}"
        if auth.get("encoding", "dbn") != "dbn" or auth.get("compression", "none") != "none":
            return "This gateway only sends uncompressed DBN"
        if auth.get("ts_out", "0") != "0":
            return "This gateway does not send ts_out"
        return ""

    @staticmethod
    def _subscription(message: dict[str, str], raw: str) -> Subscription:
        if message["schema"] not in (*SCHEMA_RTYPES, *SCHEMA_KINDS):
            raise ValueError(f"unsupported schema {message['schema']!r}")
        start = message.get("start")
        return Subscription(
            schema=message["schema"], stype_in=message.get("stype_in", "raw_symbol"),
            symbols=[s for s in message.get("symbols", "").split(",") if s],
            start=int(start) if start is not None else None, snapshot=message.get("snapshot", "0"),
            id=message.get("id"), is_last=message.get("is_last", "1"), raw=raw,
        )  # fmt: skip

    async def _watch(self, reader: asyncio.StreamReader, conn: Connection) -> None:
        """Read what the client sends after start_session; EOF means it went away."""
        assert conn.client_gone is not None
        try:
            while raw := await reader.readline():
                conn.lines.append(raw.decode("utf-8").rstrip("\n"))
        except (ConnectionError, ValueError):
            pass
        conn.client_gone.set()

    def _selection(self, conn: Connection) -> list[Any]:
        """The records the session's subscriptions ask for, in the prepared order."""
        chosen: list[Any] = []
        for index, record in enumerate(self.records):
            for sub in conn.subscriptions:
                ids = {self.symbols[s] for s in sub.symbols if s in self.symbols}
                if record.instrument_id not in ids or not _of_schema(record, sub.schema):
                    continue
                if (sub.start is not None and record.ts_event >= sub.start) or (
                    sub.start is None and index >= self.live_from
                ):
                    chosen.append(record)
                    break
        return chosen

    def _metadata(self, conn: Connection, chosen: list[Any]) -> bytes:
        schemas = {s.schema for s in conn.subscriptions}
        stypes = {s.stype_in for s in conn.subscriptions}
        starts = [s.start for s in conn.subscriptions if s.start is not None]
        if starts:
            start = min(starts)
        elif self.live_from < len(self.records):
            start = self.records[self.live_from].ts_event
        else:
            start = time.time_ns()
        return dbn.Metadata(
            dataset=self.dataset, start=start,
            stype_in=dbn.SType.from_str(stypes.pop()) if len(stypes) == 1 else None,
            stype_out=dbn.SType.INSTRUMENT_ID,
            schema=dbn.Schema.from_str(schemas.pop()) if len(schemas) == 1 else None,
            symbols=[], partial=[], not_found=[], mappings=[], ts_out=False, version=3,
        ).encode()  # fmt: skip

    def _symbology(self, conn: Connection) -> list[bytes]:
        now = time.time_ns()
        out: list[bytes] = []
        for sub in conn.subscriptions:
            for symbol in sub.symbols:
                if symbol in self.symbols:
                    out.append(
                        bytes(
                            dbn.SymbolMappingMsg(
                                publisher_id=0, instrument_id=self.symbols[symbol], ts_event=now,
                                stype_in=dbn.SType.RAW_SYMBOL, stype_in_symbol=symbol,
                                stype_out=dbn.SType.RAW_SYMBOL, stype_out_symbol=symbol,
                                start_ts=UNDEF_TIMESTAMP, end_ts=UNDEF_TIMESTAMP,
                            )
                        )
                    )  # fmt: skip
                else:
                    err = f"Failed to resolve symbol: {symbol}"
                    out.append(bytes(dbn.ErrorMsg(now, err, code=dbn.ErrorCode.SYMBOL_RESOLUTION_FAILED)))
        return out

    async def _stream(self, writer: asyncio.StreamWriter, conn: Connection, plan: Plan) -> bool:
        assert conn.client_gone is not None
        chosen = self._selection(conn)
        writer.write(self._metadata(conn, chosen))
        for raw in self._symbology(conn):
            writer.write(raw)
        await writer.drain()
        for record in chosen:
            if conn.client_gone.is_set():
                conn.ended = "client"
                return False
            sent = len(conn.sent)
            if plan.stall_after is not None and sent >= plan.stall_after:
                await writer.drain()
                await conn.client_gone.wait()  # silent: no data, no heartbeat, socket open
                conn.ended = "client"
                return False
            if plan.drop_after is not None and sent >= plan.drop_after:
                await writer.drain()
                if plan.linger_s:
                    await asyncio.sleep(plan.linger_s)
                writer.transport.abort()
                conn.ended = "dropped"
                return True
            writer.write(bytes(record))
            conn.sent.append(record)
            if self.pace_s:
                await writer.drain()
                await asyncio.sleep(self.pace_s)
            elif sent % 64 == 63:
                await writer.drain()
        if any(s.start is not None for s in conn.subscriptions):
            for schema in sorted({s.schema for s in conn.subscriptions}):
                done = dbn.SystemMsg(time.time_ns(), f"Finished {schema} replay", code=dbn.SystemCode.REPLAY_COMPLETED)
                writer.write(bytes(done))
        await writer.drain()
        interval = self.heartbeat_s or float(conn.auth.get("heartbeat_interval_s") or 30)
        while not conn.client_gone.is_set():
            try:
                await asyncio.wait_for(conn.client_gone.wait(), timeout=interval)
            except TimeoutError:
                writer.write(bytes(dbn.SystemMsg(time.time_ns(), "Heartbeat", code=dbn.SystemCode.HEARTBEAT)))
                await writer.drain()
        conn.ended = "client"
        return False


def _of_schema(record: Any, schema: str) -> bool:
    if schema in SCHEMA_KINDS:
        return isinstance(record, SCHEMA_KINDS[schema])
    return isinstance(record, dbn.OHLCVMsg) and int(record.rtype) == SCHEMA_RTYPES[schema]
