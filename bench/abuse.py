"""Benchmark: what one abusive client can cost the gateway, and what a well-behaved client sees meanwhile.

Run from the repository root::

    .venv/bin/python bench/abuse.py [--quick] [--anon 2000] [--sockets 2000] [--bad 1000]
        [--unknown 200] [--hold 12] [--samples 20] [--concurrency 100] [--in-flight 1] [--budget 240]

One gateway process (``python -m streaming.server``: daphne, on a loopback port) under
production-like access settings: local settings with DEBUG off,
``STREAMING_ALLOW_ANONYMOUS=0``, ``WS_MAX_CONNECTIONS_PER_USER=50`` and
``WS_MAX_ANON_CONNECTIONS_PER_IP=100`` (SPEC section 9), ``ADMISSION_IN_FLIGHT_PER_IP`` as
deployed (1; ``--in-flight 0`` turns admission off, the run to compare with), in a database of its own
(``marketdata_bench_abuse``, created and migrated) and Redis database 10 (flushed; the
channel prefix ``benchabuse`` is the bench's own). Two users, ``bench_abuse_good`` and
``bench_abuse_abuser``, each with a fresh API token and an entitlement to XNAS.ITCH, whose
symbols ABUSE0..ABUSE4 have 100 published 1m bars each.

The well-behaved client runs in a process of its own, from 127.0.0.2, with its own user's
token: connect, subscribe ``bars:1m:ABUSE0`` with a 100-bar snapshot, and time connect
start to the ``subscribed`` frame; one after another, 0.05 s apart (a phase of a second
still gives 20 samples). First on a quiet gateway (``--samples`` of them: the baseline),
then throughout each abuse phase until the gateway is quiet again after it, then quiet
once more at the end. Each phase comes from a loopback address of its own
(127.0.0.11..14), so that what one phase earned from a per-IP limit spills neither into
the next nor onto the well-behaved client:

(a) ``--anon`` WebSockets without credentials, held ``--hold`` s after the last has
    connected (past the 10 s auth deadline, which closes them 4001; over the per-IP cap:
    4029);
(b) ``--sockets`` WebSockets with the abuser's one token, each subscribing to all 10 of
    its streams, held a few seconds (over the per-user cap: 4029);
(c) ``--bad`` requests to ``/v1/ohlcv``, each with a different bad token
    (``Authorization: Token bad...``): 401, or 429 with Retry-After once throttled;
(d) ``--unknown`` clients with the abuser's token, each sending one subscribe naming 100
    unknown symbols and leaving at once (10 at a time, under the per-user cap).

Handshakes and requests in flight are bounded (``--concurrency``), sockets held at once by
RLIMIT_NOFILE (in waves), every phase and wait has a time limit, and phases that would
start after ``--budget`` s are skipped: the default run takes about a minute, ``--quick``
about 20 s. Printed per phase: every socket's or request's outcome (close codes, with the
server's reason where the server passes one on, which daphne does not; HTTP statuses,
Retry-After), the frames the abusive sockets got; the gateway's RSS (VmRSS) and open
files before, at peak and after, its CPU beside this bench's and the whole machine's, how
long it stayed busy after the last abusive client left, Redis pub/sub channels of the
bench's prefix before, at peak and after (what closed sockets left subscribed), lines its
log gained; and the well-behaved client's first-message latency
p50/p95 beside the quiet baseline as a ratio (target: within 2x while the abuse runs).
Figures are printed, never asserted (SPEC section 8).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_env, machine  # noqa: E402
from tests.chaos.stack import GatewayFailed, Proc, gateway_start, listening  # noqa: E402

BENCH_DB = "marketdata_bench_abuse"
BENCH_REDIS_DB = 10
CHANNELS_PREFIX = "benchabuse"
DATASET = "XNAS.ITCH"
TICKERS = [f"ABUSE{i}" for i in range(5)]
ABUSER_STREAMS = [f"bars:1m:{t}" for t in TICKERS] + [f"trades:{t}" for t in TICKERS]
PROBE_STREAM = "bars:1m:ABUSE0"
SNAPSHOT = 100
UNKNOWN_PER_SUBSCRIBE = 100
PATH = "/ws/v1/stream"
CAP_USER, CAP_ANON_IP = 50, 100
UNKNOWN_IN_FLIGHT = 10  # (d) clients at once: under the per-user cap, so a 4029 there is a leak
TARGET_RATIO = 2.0
IN_FLIGHT = 1  # ADMISSION_IN_FLIGHT_PER_IP's default (config/settings/base.py)
PROBE_SOURCE = "127.0.0.2"
PHASE_SOURCES = {"a": "127.0.0.11", "b": "127.0.0.12", "c": "127.0.0.13", "d": "127.0.0.14"}
PROBE_GAP_S, PROBE_TIMEOUT_S = 0.05, 10.0
NOFILE_RESERVE = 512  # open files kept for everything but the abusive sockets
BAR = '{{"ts":"{ts}","open":100,"high":101,"low":99,"close":100.5,"volume":1000,"final":true}}'
CLK = os.sysconf("SC_CLK_TCK")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~30 s): 300 sockets in (a), (b); 200 requests; 30 clients in (d)")  # fmt: skip
    parser.add_argument("--anon", type=int, help="(a) sockets without credentials (default 2,000; --quick 300)")
    parser.add_argument("--sockets", type=int, help="(b) sockets with one token (default 2,000; --quick 300)")
    parser.add_argument("--bad", type=int, help="(c) requests with bad tokens (default 1,000; --quick 200)")
    parser.add_argument("--unknown", type=int, help="(d) clients, 100 unknown symbols each (default 200; --quick 30)")
    parser.add_argument("--hold", type=float, help="(a) hold the sockets this long, s (default 12; --quick 3)")
    parser.add_argument("--samples", type=int, help="quiet baseline samples (default 20; --quick 10)")
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes or requests in flight (default 100)")
    parser.add_argument(
        "--in-flight", type=int, default=IN_FLIGHT, help=f"ADMISSION_IN_FLIGHT_PER_IP (default {IN_FLIGHT}; 0: off)"
    )
    parser.add_argument(
        "--budget", type=float, help="start no phase after this many s of the run (default 240; --quick 90)"
    )
    parser.add_argument("--phase-limit", type=float, help="time limit of one phase's abuse, s (default 60; --quick 15)")
    parser.add_argument(
        "--settle", type=float, help="after a phase, wait for a quiet gateway, s (default 30; --quick 8)"
    )
    args = parser.parse_args()
    quick = args.quick
    for name, full, small in (("anon", 2000, 300), ("sockets", 2000, 300), ("bad", 1000, 200), ("unknown", 200, 30),
                              ("hold", 12.0, 3.0), ("samples", 20, 10), ("phase_limit", 60.0, 15.0),
                              ("settle", 30.0, 8.0), ("budget", 240.0, 90.0)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.hold_b = 1.0 if quick else 5.0
    if not all(0 <= n <= 20_000 for n in (args.anon, args.sockets, args.bad)) or not 0 <= args.unknown <= 2_000:
        parser.error("--anon, --sockets and --bad must be within 0..20,000, --unknown within 0..2,000")
    if not 0 <= args.in_flight <= 1_000_000:
        parser.error("--in-flight must be within 0..1,000,000")
    if not 0 <= args.hold <= 60 or not 1 <= args.samples <= 200 or not 1 <= args.concurrency <= 1_000:
        parser.error("--hold must be within 0..60 s, --samples within 1..200, --concurrency within 1..1,000")
    if not 5 <= args.phase_limit <= 120 or not 1 <= args.settle <= 60 or not 30 <= args.budget <= 600:
        parser.error("--phase-limit must be within 5..120 s, --settle within 1..60 s, --budget within 30..600 s")
    return args


# SETUP


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (servers and clients inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def loopback_sources() -> tuple[str, dict[str, str]]:
    """The probe's and the phases' source addresses; all 127.0.0.1 where others of 127/8 cannot be bound."""
    for address in (PROBE_SOURCE, *PHASE_SOURCES.values()):
        try:
            with socket.socket() as s:
                s.bind((address, 0))
        except OSError:
            return "127.0.0.1", dict.fromkeys(PHASE_SOURCES, "127.0.0.1")
    return PROBE_SOURCE, dict(PHASE_SOURCES)


def gateway_env(in_flight: int) -> dict[str, str]:
    return bench_env(
        BENCH_DB,
        BENCH_REDIS_DB,
        CHANNELS_PREFIX=CHANNELS_PREFIX,
        STREAMING_ALLOW_ANONYMOUS="0",
        WS_MAX_CONNECTIONS_PER_USER=str(CAP_USER),
        WS_MAX_ANON_CONNECTIONS_PER_IP=str(CAP_ANON_IP),
        ADMISSION_IN_FLIGHT_PER_IP=str(in_flight),
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )


def setup(env: dict[str, str]) -> dict[str, str]:
    """Create and migrate the database; users, tokens, entitlements, symbols; publish bars. Return the tokens."""
    import psycopg
    from psycopg import sql

    admin = env["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=300)
    keys = ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL", "CHANNELS_PREFIX", "DJANGO_DEBUG", "LOG_LEVEL")
    os.environ.update({k: env[k] for k in keys})
    import django

    django.setup()
    import redis
    from django.contrib.auth import get_user_model

    from marketdata.models import ApiToken, Entitlement, Symbol
    from marketdata.services.api_tokens import api_token_create
    from streaming.publish import Message, Publisher

    user_model = get_user_model()
    tokens: dict[str, str] = {}
    for role in ("good", "abuser"):
        user, _ = user_model.objects.get_or_create(username=f"bench_abuse_{role}")
        if not user.is_active:
            user.is_active = True
            user.save(update_fields=["is_active"])
        Entitlement.objects.get_or_create(user=user, dataset=DATASET)
        ApiToken.objects.filter(user=user).delete()
        tokens[role] = api_token_create(user=user, name="bench/abuse.py")[1]
    Symbol.objects.bulk_create([Symbol(ticker=t, dataset=DATASET) for t in TICKERS], ignore_conflicts=True)
    Symbol.objects.filter(ticker__in=TICKERS).update(active=True, dataset=DATASET)
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    start = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    bars = [
        Message(f"bars:1m:{t}", "bar", BAR.format(ts=(start + timedelta(minutes=k)).strftime("%Y-%m-%dT%H:%M:%SZ")))
        for t in TICKERS
        for k in range(SNAPSHOT)
    ]
    Publisher(env["REDIS_URL"]).publish(bars)
    return tokens


# THE GATEWAY AND WHAT IT COSTS


@dataclass
class Gateway(Proc):
    """The gateway process (tests/chaos/stack.py starts it) and what its log said."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size if self.log is not None else 0
        except OSError:
            return 0

    def log_since(self, offset: int) -> list[str]:
        if self.log is None:
            return []
        try:
            with self.log.open("rb") as f:
                f.seek(offset)
                return f.read(8 << 20).decode(errors="replace").splitlines()
        except OSError:
            return []


def start_gateway(env: dict[str, str], log: Path) -> Gateway:
    """The gateway in a session of its own, once its port accepts connections."""
    try:
        return gateway_start(env, log, ready=listening, timeout=60, new_session=True, kind=Gateway)
    except GatewayFailed as exc:
        raise SystemExit(str(exc)) from None


def stop_gateway(gateway: Gateway) -> None:
    gateway.stop(timeout=20)


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class Monitor:
    """The gateway's RSS and open files every 0.2 s, the Redis channels every 0.4 s, in a thread; peaks since a mark."""

    def __init__(self, pid: int, redis_client: Any) -> None:
        self.pid = pid
        self.redis = redis_client
        self.lock = threading.Lock()
        self.peak = (0.0, 0)
        self.channels_peak = (0, 0)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self.thread.start()

    def now(self) -> tuple[float, int]:
        return rss_mib(self.pid), open_files(self.pid)

    def _run(self) -> None:
        tick = 0
        while not self.stopping.wait(0.2):
            rss, fds = self.now()
            tick += 1
            conn, group = redis_channels(self.redis) if tick % 2 else (-1, -1)
            with self.lock:
                self.peak = (max(self.peak[0], rss if rss == rss else 0.0), max(self.peak[1], fds))
                self.channels_peak = (max(self.channels_peak[0], conn), max(self.channels_peak[1], group))

    def mark(self) -> tuple[float, int]:
        current = self.now()
        with self.lock:
            self.peak = current
            self.channels_peak = (0, 0)
        return current

    def peaks(self) -> tuple[float, int]:
        current = self.now()
        with self.lock:
            return max(self.peak[0], current[0]), max(self.peak[1], current[1])

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.redis.close()


def redis_channels(client: Any) -> tuple[int, int]:
    """Pub/sub channels of the bench's prefix: (connection channels, group channels); (-1, -1) if unknown."""
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in client.pubsub_channels(f"{CHANNELS_PREFIX}*")]
    except Exception:
        return -1, -1
    groups = sum(1 for n in names if "__group__" in n)
    return len(names) - groups, groups


def settle(pid: int, limit_s: float, quiet: float = 0.1) -> float | None:
    """Seconds until the gateway's CPU stays under ``quiet`` of a core for 0.5 s; None if not within limit_s."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        c0 = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - c0 < quiet * 0.5:
            return max(0.0, time.monotonic() - start - 0.5)
    return None


# THE WELL-BEHAVED CLIENT (a process of its own: the abusers' event loop must not delay it)


def ws_connect(port: int, source: str, token: str | None, open_timeout: float) -> Any:
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Token {token}"} if token else None
    return connect(
        f"ws://127.0.0.1:{port}{PATH}", additional_headers=headers, compression=None, proxy=None,
        open_timeout=open_timeout, ping_interval=None, close_timeout=2, local_addr=(source, 0),
    )  # fmt: skip


async def connect_by(deadline: float, port: int, source: str, token: str | None, tally: Tally) -> Any:
    """An abusive socket opened before the phase's deadline, or None (its outcome counted)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        tally.outcomes["not tried: phase time limit"] += 1
        return None
    try:
        return await ws_connect(port, source, token, min(30.0, remaining))
    except Exception as exc:
        tally.outcomes[why(exc)] += 1
        return None


def why(exc: BaseException) -> str:
    """What refused or ended a socket or request, as counted."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

    if isinstance(exc, ConnectionClosed):
        return f"closed {exc.rcvd.code}" if exc.rcvd is not None else "dropped without a close frame"
    if isinstance(exc, InvalidStatus):
        return f"handshake refused: http {exc.response.status_code}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, InvalidHandshake):
        cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
        return f"handshake failed: {type(exc).__name__}{cause}"
    if isinstance(exc, OSError | EOFError | asyncio.IncompleteReadError):
        return type(exc).__name__
    return f"error {type(exc).__name__}"


async def first_message(port: int, token: str, source: str) -> tuple[float | None, str]:
    """(ms from connect start to the ``subscribed`` frame, "") or (None, why not)."""
    from websockets.exceptions import ConnectionClosed

    start = time.perf_counter()
    ws = None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            ws = await ws_connect(port, source, token, PROBE_TIMEOUT_S)
            subscribe = {"op": "subscribe", "id": 1, "streams": [PROBE_STREAM], "snapshot": SNAPSHOT}
            await ws.send(json.dumps(subscribe))
            while True:
                raw = await ws.recv()
                if '"subscribed"' in raw[:40] or '"error"' in raw[:40]:
                    frame = json.loads(raw)
                    if frame.get("type") == "subscribed":
                        return (time.perf_counter() - start) * 1000, ""
                    if frame.get("type") == "error":
                        return None, f"error {frame.get('code')}"
    except ConnectionClosed as exc:
        return None, why(exc)
    except Exception as exc:
        return None, why(exc)
    finally:
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)


async def _probe(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + spec["max_s"]
    stopped = False
    for _ in range(spec["n"]):
        if time.monotonic() >= deadline:
            break
        if spec["until_stop"] and conn.poll():
            conn.recv()
            stopped = True
            break
        ms, reason = await first_message(spec["port"], spec["token"], spec["source"])
        if ms is None:
            failures[reason] += 1
        else:
            latencies.append(ms)
        await asyncio.sleep(PROBE_GAP_S)
    if spec["until_stop"] and not stopped and conn.poll(spec["max_s"] + 120):
        conn.recv()
    return {"ms": latencies, "failures": dict(failures)}


def probe_main(conn: Connection) -> None:
    """The probe process: answers each ("measure", spec) with its samples; ends on ("exit",) or a closed pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends it
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            return
        if command[0] != "measure":
            return
        conn.send(asyncio.run(_probe(conn, command[1])))


@dataclass
class Samples:
    ms: list[float]
    failures: dict[str, int]

    def at(self, q: float) -> float:
        ordered = sorted(self.ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Probe:
    """Drives the well-behaved client's process over a pipe."""

    def __init__(self, port: int, token: str, source: str) -> None:
        ctx = multiprocessing.get_context("spawn")  # no Django, no inherited sockets
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=probe_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.spec = {"port": port, "token": token, "source": source}

    def _answer(self, timeout: float) -> Samples:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"the well-behaved client did not answer within {timeout:.0f} s")
        answer = self.conn.recv()
        return Samples(answer["ms"], answer["failures"])

    def measure(self, n: int, max_s: float) -> Samples:
        self.conn.send(("measure", {**self.spec, "n": n, "max_s": max_s, "until_stop": False}))
        return self._answer(max_s + PROBE_TIMEOUT_S + 30)

    def start(self, max_s: float) -> None:
        self.conn.send(("measure", {**self.spec, "n": 100_000, "max_s": max_s, "until_stop": True}))

    def stop(self) -> Samples:
        self.conn.send(("stop",))
        return self._answer(PROBE_TIMEOUT_S + 30)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("exit",))
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)


# THE ABUSE


@dataclass
class Tally:
    """What one phase's sockets or requests came to."""

    tried: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: dict[str, str] = field(default_factory=dict)  # a close code's first reason
    frames: Counter[str] = field(default_factory=Counter)
    retry_after: list[str] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)
    open_now: int = 0
    open_peak: int = 0
    open_at_end: int = 0
    connect_s: float = 0.0
    held_s: float = 0.0

    def ended(self, exc: BaseException) -> None:
        from websockets.exceptions import ConnectionClosed

        key = why(exc)
        if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
            if exc.rcvd_then_sent is False:  # the bench closed first: the socket was held to the end
                key = "held open until the bench closed it"
            else:
                key = f"closed by the gateway {exc.rcvd.code}"
                self.reasons.setdefault(key, exc.rcvd.reason)
        self.outcomes[key] += 1

    def frame(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            self.frames["not JSON"] += 1
            return
        kind = str(message.get("type"))
        self.frames[f"error {message.get('code')}" if kind == "error" else kind] += 1


async def close_all(sockets: list[Any]) -> None:
    async def close(ws: Any) -> None:
        with contextlib.suppress(Exception):
            await ws.close()

    if sockets:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(close(ws) for ws in sockets)), 20)


async def flood(port: int, n: int, source: str, token: str | None, streams: list[str], hold_s: float,
                args: argparse.Namespace, nofile: int) -> Tally:  # fmt: skip
    """n sockets (in waves that RLIMIT_NOFILE allows), at most --concurrency handshakes at once; held, then closed."""
    tally = Tally(tried=n)
    wave = max(1, min(n, nofile - NOFILE_RESERVE))
    deadline = time.monotonic() + args.phase_limit
    done = 0
    while done < n:
        size = min(wave, n - done)
        if time.monotonic() >= deadline:
            tally.outcomes["not tried: phase time limit"] += n - done
            break
        await flood_wave(port, size, source, token, streams, hold_s, args.concurrency, deadline, tally)
        done += size
    return tally


async def flood_wave(port: int, size: int, source: str, token: str | None, streams: list[str], hold_s: float,
                     concurrency: int, deadline: float, tally: Tally) -> None:  # fmt: skip
    from websockets.exceptions import ConnectionClosed

    gate = asyncio.Semaphore(concurrency)
    sockets: list[Any] = []
    left = size
    connected = asyncio.Event()
    subscribe = json.dumps({"op": "subscribe", "id": 1, "streams": streams}) if streams else ""

    def connect_stage_done() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            connected.set()

    async def one() -> None:
        try:
            async with gate:
                ws = await connect_by(deadline, port, source, token, tally)
                if ws is None:
                    return
                sockets.append(ws)
                try:
                    tally.frame(await asyncio.wait_for(ws.recv(), 15))  # welcome, or a close
                    if subscribe:
                        await ws.send(subscribe)
                except ConnectionClosed as exc:
                    tally.ended(exc)
                    return
                except TimeoutError:
                    tally.outcomes["no first frame within 15 s"] += 1
                    return
        finally:
            connect_stage_done()
        tally.open_now += 1
        tally.open_peak = max(tally.open_peak, tally.open_now)
        try:
            while True:
                tally.frame(await ws.recv())
        except ConnectionClosed as exc:
            tally.ended(exc)
        finally:
            tally.open_now -= 1

    start = time.monotonic()
    tasks = [asyncio.create_task(one()) for _ in range(size)]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connected.wait(), max(1.0, deadline - time.monotonic()) + 45)
        tally.connect_s += time.monotonic() - start
        held = time.monotonic()
        await asyncio.sleep(hold_s)
        tally.held_s = time.monotonic() - held
        tally.open_at_end += tally.open_now
    finally:
        await close_all(sockets)
        _, pending = await asyncio.wait(tasks, timeout=15)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
            tally.outcomes["still open when closing ended (cancelled)"] += len(pending)


async def http_get(port: int, path: str, token: str, source: str) -> tuple[int, dict[str, str]]:
    """One HTTP/1.1 GET on a new connection: (status, headers in lower case)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Token {token}\r\n"
                   "Accept: application/json\r\nConnection: close\r\n\r\n")  # fmt: skip
        writer.write(request.encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        return status, headers
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)


async def bad_tokens(port: int, n: int, source: str, args: argparse.Namespace) -> Tally:
    """n GETs of /v1/ohlcv, each with a different bad token, at most --concurrency at once."""
    tally = Tally(tried=n)
    gate = asyncio.Semaphore(args.concurrency)
    deadline = time.monotonic() + args.phase_limit
    path = f"/v1/ohlcv?symbol={TICKERS[0]}&tf=1m&limit=100"

    async def one() -> None:
        async with gate:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tally.outcomes["not tried: phase time limit"] += 1
                return
            start = time.perf_counter()
            try:
                status, headers = await asyncio.wait_for(
                    http_get(port, path, "bad" + secrets.token_urlsafe(24), source), min(15.0, remaining)
                )
            except Exception as exc:
                tally.outcomes[why(exc)] += 1
                return
            tally.answer_ms.append((time.perf_counter() - start) * 1000)
            key = f"http {status}"
            if status == 429:
                retry = headers.get("retry-after")
                key += " with Retry-After" if retry else " without Retry-After"
                if retry:
                    tally.retry_after.append(retry)
            tally.outcomes[key] += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return tally


async def unknown_subscribes(port: int, n: int, source: str, token: str, args: argparse.Namespace) -> Tally:
    """n clients: connect with a token, one subscribe naming 100 unknown symbols, leave at once."""
    from websockets.exceptions import ConnectionClosed

    tally = Tally(tried=n)
    gate = asyncio.Semaphore(min(args.concurrency, UNKNOWN_IN_FLIGHT))
    deadline = time.monotonic() + args.phase_limit
    run = secrets.token_hex(3).upper()

    async def one(i: int) -> None:
        async with gate:
            ws = await connect_by(deadline, port, source, token, tally)
            if ws is None:
                return
            try:
                tally.frame(await asyncio.wait_for(ws.recv(), 15))  # welcome, or a close
                names = [f"bars:1m:NOSUCH{run}{i:04d}X{j:03d}" for j in range(UNKNOWN_PER_SUBSCRIBE)]
                await ws.send(json.dumps({"op": "subscribe", "id": 1, "streams": names}))
                tally.outcomes["sent 100 unknown symbols, then left"] += 1
            except ConnectionClosed as exc:
                tally.ended(exc)
            except TimeoutError:
                tally.outcomes["no first frame within 15 s"] += 1
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 5)

    await asyncio.gather(*(one(i) for i in range(n)))
    return tally


# PHASES


@dataclass
class Phase:
    key: str
    label: str
    tally: Tally
    seconds: float
    abuse_s: float
    rss: tuple[float, float, float]
    fds: tuple[int, int, int]
    channels: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # before, peak, after
    cpu: float  # the gateway's, cores
    bench_cpu: float  # this process's and the well-behaved client's, cores
    machine: float  # every process's, cores
    busy_after: float | None
    log_lines: list[str]
    samples: Samples
    busy_after_limit: float = 0.0


@dataclass
class Context:
    args: argparse.Namespace
    gateway: Gateway
    monitor: Monitor
    probe: Probe
    redis: Any


def run_phase(ctx: Context, key: str, label: str, abuse: Callable[[], Coroutine[Any, Any, Tally]]) -> Phase:
    """One abuse phase with the well-behaved client measuring from its start until the gateway is quiet again."""
    pid = ctx.gateway.pid
    rss0, fds0 = ctx.monitor.mark()
    ch0, log0 = redis_channels(ctx.redis), ctx.gateway.log_size()
    mine = (os.getpid(), ctx.probe.proc.pid or 0)
    cpu0, busy0, mine0 = cpu_seconds(pid), machine_busy(), sum(cpu_seconds(p) for p in mine)
    start = time.monotonic()
    ctx.probe.start(ctx.args.phase_limit * 2 + ctx.args.settle + 120)
    try:
        tally = asyncio.run(abuse())
    except BaseException:
        with contextlib.suppress(Exception):
            ctx.probe.stop()
        raise
    abuse_s = time.monotonic() - start
    busy_after = settle(pid, ctx.args.settle)
    samples = ctx.probe.stop()
    seconds = time.monotonic() - start
    cpu1, busy1, mine1 = cpu_seconds(pid), machine_busy(), sum(cpu_seconds(p) for p in mine)
    rss_peak, fds_peak = ctx.monitor.peaks()
    ch1 = redis_channels(ctx.redis)
    with ctx.monitor.lock:
        seen = ctx.monitor.channels_peak
    ch_peak = (max(seen[0], ch0[0], ch1[0]), max(seen[1], ch0[1], ch1[1]))
    rss1, fds1 = ctx.monitor.now()
    cores = os.cpu_count() or 1
    phase = Phase(
        key=key, label=label, tally=tally, seconds=seconds, abuse_s=abuse_s, rss=(rss0, rss_peak, rss1),
        fds=(fds0, fds_peak, fds1), channels=(ch0, ch_peak, ch1), cpu=(cpu1 - cpu0) / seconds,
        bench_cpu=(mine1 - mine0) / seconds, machine=(busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * cores,
        busy_after=busy_after,
        log_lines=ctx.gateway.log_since(log0), samples=samples, busy_after_limit=ctx.args.settle,
    )  # fmt: skip
    print(f"  {label}: {abuse_s:.1f} s of abuse, {seconds:.1f} s measured", flush=True)
    return phase


# REPORT


def ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def print_refusals(phases: list[Phase]) -> None:
    print("\n== what each phase's sockets or requests came to (every one counted once)")
    for p in phases:
        t = p.tally
        extra = ""
        if p.key in ("a", "b"):
            extra = (f"; connect stage {t.connect_s:.1f} s, held {t.held_s:.1f} s; open at once: peak {t.open_peak:,},"
                     f" at the end of the hold {t.open_at_end:,}")  # fmt: skip
        elif p.key == "c" and t.answer_ms:
            answered = Samples(t.answer_ms, {})
            extra = f"; answered in p50 {answered.at(0.5):.1f} ms, p95 {answered.at(0.95):.1f} ms"
        print(f"  {p.label}: {t.tried:,} tried{extra}")
        for outcome, n in sorted(t.outcomes.items(), key=lambda kv: -kv[1]):
            reason = t.reasons.get(outcome)
            print(f"      {n:>6,}  {outcome}" + (f"  (reason: {reason!r})" if reason else ""))
        if t.retry_after:
            values = sorted(set(t.retry_after), key=lambda v: (len(v), v))
            print(f"      Retry-After values: {', '.join(values[:8])}{' ...' if len(values) > 8 else ''}")
        if t.frames:
            frames = ", ".join(f"{k} {n:,}" for k, n in sorted(t.frames.items(), key=lambda kv: -kv[1]))
            print(f"      frames the gateway sent them: {frames}")


def print_table(baseline: Samples, phases: list[Phase], after: Samples) -> None:
    b50, b95 = baseline.at(0.5), baseline.at(0.95)
    print("\n== the gateway, and the well-behaved client's first message (connect start -> `subscribed`, ms)")
    head = (f"  {'phase':36} {'secs':>5}  {'RSS MiB before/peak/after':>25}  {'open files b/p/a':>18}  "
            f"{'redis ch. b/p/a':>20}  {'cpu gw/bench/all':>16}  {'busy after':>10}  {'log':>5}  "
            f"{'p50':>7} {'p95':>7} {'n':>4} {'fail':>4}  {'x quiet p50/p95':>15}")  # fmt: skip
    print(head)
    print("  " + "-" * (len(head) - 2))

    def latency(s: Samples) -> str:
        failed = sum(s.failures.values())
        return f"{s.at(0.5):7.1f} {s.at(0.95):7.1f} {len(s.ms):4d} {failed:4d}"

    print(f"  {'quiet baseline':36} {'':>5}  {'':>25}  {'':>18}  {'':>20}  {'':>16}  {'':>10}  {'':>5}  "
          f"{latency(baseline)}  {'1.00 / 1.00':>15}")  # fmt: skip
    for p in phases:
        rss = "/".join(f"{v:.0f}" for v in p.rss)
        fds = "/".join(str(v) for v in p.fds)
        ch = "/".join(f"{c[0]}+{c[1]}" for c in p.channels)
        busy = f"{p.busy_after:.1f} s" if p.busy_after is not None else f">{p.busy_after_limit:.0f} s"
        vs = f"{ratio(p.samples.at(0.5), b50):.2f} / {ratio(p.samples.at(0.95), b95):.2f}"
        cpu = f"{p.cpu:.0%}/{p.bench_cpu:.0%}/{p.machine:.0%}"
        print(f"  {p.label:36} {p.seconds:5.1f}  {rss:>25}  {fds:>18}  {ch:>20}  {cpu:>16}  "
              f"{busy:>10}  {len(p.log_lines):5d}  {latency(p.samples)}  {vs:>15}")  # fmt: skip
    vs = f"{ratio(after.at(0.5), b50):.2f} / {ratio(after.at(0.95), b95):.2f}"
    print(f"  {'quiet again, after every phase':36} {'':>5}  {'':>25}  {'':>18}  {'':>20}  {'':>16}  "
          f"{'':>10}  {'':>5}  {latency(after)}  {vs:>15}")  # fmt: skip
    print(
        "  (secs: from the phase's first abusive socket or request until the gateway was quiet again, the"
        " well-behaved client measuring throughout; cpu: 100% = one core, used by the gateway, by this bench's"
        " two processes (the abusive clients, the well-behaved client) and by the whole machine; busy after:"
        " until the gateway's CPU stayed under 10% of a core for 0.5 s after the abuse ended; redis: pub/sub"
        " channels of the bench's prefix, per connection + per stream group, before/peak/after; log: lines the"
        " gateway logged)"
    )
    for s, label in [(baseline, "quiet baseline"), *((p.samples, p.label) for p in phases), (after, "quiet again")]:
        if s.failures:
            print(f"  well-behaved client failures during {label}: {s.failures}")
    for p in phases:
        tracebacks = sum(1 for line in p.log_lines if "Traceback" in line)
        if p.log_lines:
            print(f"  gateway log during {p.label}: {len(p.log_lines):,} lines, {tracebacks:,} with 'Traceback';"
                  f" first: {p.log_lines[0][:200]}")  # fmt: skip
    print(f"\n== target: the well-behaved client's first message within {TARGET_RATIO:g}x of the quiet baseline"
          f" (p50 {b50:.1f} ms, p95 {b95:.1f} ms) while the abuse runs")  # fmt: skip
    for p in phases:
        r50, r95 = ratio(p.samples.at(0.5), b50), ratio(p.samples.at(0.95), b95)
        failed = sum(p.samples.failures.values())
        ok = r50 <= TARGET_RATIO and r95 <= TARGET_RATIO and not failed
        print(f"  {p.label:36} p50 {r50:5.2f}x  p95 {r95:5.2f}x  failed {failed}: {'meets' if ok else 'misses'}")


def main() -> None:
    args = parse_args()
    nofile = raise_nofile()
    probe_source, sources = loopback_sources()
    env = gateway_env(args.in_flight)
    started = time.monotonic()
    tokens = setup(env)
    import redis

    redis_client = redis.Redis.from_url(env["REDIS_URL"])
    print(f"machine: {machine()}; load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])};"
          f" RLIMIT_NOFILE {nofile:,}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-abuse-") as tmp:
        gateway = start_gateway(env, Path(tmp) / "gateway.log")
        monitor = Monitor(gateway.pid, redis.Redis.from_url(env["REDIS_URL"]))
        probe = Probe(gateway.port, tokens["good"], probe_source)
        try:
            print(f"gateway: python -m streaming.server (daphne) on 127.0.0.1:{gateway.port}, pid {gateway.pid};"
                  f" {env['DJANGO_SETTINGS_MODULE']}, DEBUG off, STREAMING_ALLOW_ANONYMOUS=0,"
                  f" WS_MAX_CONNECTIONS_PER_USER={CAP_USER}, WS_MAX_ANON_CONNECTIONS_PER_IP={CAP_ANON_IP},"
                  f" ADMISSION_IN_FLIGHT_PER_IP={args.in_flight};"
                  f" database {BENCH_DB}, Redis db {BENCH_REDIS_DB}")  # fmt: skip
            print(f"well-behaved client: a process of its own, from {probe_source}, its own user's token; connect,"
                  f" subscribe {PROBE_STREAM} with a {SNAPSHOT}-bar snapshot, until `subscribed`; one after another,"
                  f" {PROBE_GAP_S:g} s apart, {PROBE_TIMEOUT_S:g} s timeout")  # fmt: skip
            print(f"abuse: phases (a)..(d) from {', '.join(sources.values())}; handshakes or requests in flight"
                  f" <= {args.concurrency} ((d): {min(args.concurrency, UNKNOWN_IN_FLIGHT)}); each phase's abuse"
                  f" limited to {args.phase_limit:g} s, the wait for a quiet gateway after it to"
                  f" {args.settle:g} s")  # fmt: skip
            ctx = Context(args, gateway, monitor, probe, redis_client)
            warm = probe.measure(5, 30)  # first connections warm the gateway (imports, pools) and check the token
            if not warm.ms:
                tail = "\n".join(gateway.log_since(0)[-20:])
                raise SystemExit(f"the well-behaved client cannot subscribe: {warm.failures}\n{tail}")
            baseline = probe.measure(args.samples, 60)
            print(f"  quiet baseline: {len(baseline.ms)} samples", flush=True)
            port = gateway.port
            plan: list[tuple[str, str, int, Callable[[], Coroutine[Any, Any, Tally]]]] = [
                ("a", f"(a) {args.anon:,} sockets, no credentials", args.anon,
                 lambda: flood(port, args.anon, sources["a"], None, [], args.hold, args, nofile)),
                ("b", f"(b) {args.sockets:,} sockets, one token", args.sockets,
                 lambda: flood(port, args.sockets, sources["b"], tokens["abuser"], ABUSER_STREAMS, args.hold_b, args,
                               nofile)),
                ("c", f"(c) {args.bad:,} REST requests, bad tokens", args.bad,
                 lambda: bad_tokens(port, args.bad, sources["c"], args)),
                ("d", f"(d) {args.unknown:,} x 100 unknown symbols", args.unknown,
                 lambda: unknown_subscribes(port, args.unknown, sources["d"], tokens["abuser"], args)),
            ]  # fmt: skip
            phases = []
            for key, label, n, abuse in plan:
                left = args.budget - (time.monotonic() - started)
                if n and left < 10:
                    print(f"  {label}: skipped, the run's --budget of {args.budget:g} s is spent")
                elif n:
                    args.phase_limit = min(args.phase_limit, max(5.0, left / 2))
                    phases.append(run_phase(ctx, key, label, abuse))
            after = probe.measure(args.samples, 60)
            print_refusals(phases)
            print_table(baseline, phases, after)
            print(f"\n(run took {time.monotonic() - started:.0f} s)")
        finally:
            probe.close()
            monitor.stop()
            stop_gateway(gateway)
            redis_client.close()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` or kill: the gateway is stopped too
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: sockets closed, gateway and client process stopped", file=sys.stderr)
        sys.exit(130)
