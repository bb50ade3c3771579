"""Benchmark: WebSocket fan-out of one gateway process, beside stock Channels consumers.

Run from the repository root::

    .venv/bin/python bench/fanout.py [--quick] [--steps 2000,5000,10000,20000] [--seconds 8]
        [--servers daphne,uvicorn] [--layout together|alone] [--idle 10000]

It works in a database of its own, ``marketdata_bench_fanout`` (created, migrated, given
``--symbols`` symbols ``FANOUT00``...), and Redis database 13 (flushed at the start; the
tickers are the bench's own, since Redis pub/sub channels are shared by every database).

**Load.** For each server (daphne, then uvicorn with ``--ws websockets``), two server
processes on loopback ports: the gateway (``config.asgi`` with ``streaming.consumers``;
under daphne through ``python -m streaming.server``, the daphne launcher the gateway
ships) and the baseline ``bench/_stock.py`` (a stock ``AsyncWebsocketConsumer`` that
joins the same groups and sends each frame). ``--clients`` WebSocket clients per app, in
``--client-procs`` processes (``bench/_fanout_client.py``), each subscribed to one of
``--symbols`` ``bars:1m`` streams (10 clients per stream by default). The publisher is
``streaming.publish.Publisher``, the one publish path, in this process: every
``--tick-ms`` a batch, round-robin over the streams, at the step's rate; each bar carries
its publish time (ns) in ``volume``. A step's target is the delivered rate (publish rate
x clients per stream). With ``--layout together`` (default) both apps are served at once
and receive the very same publishes; with ``alone`` each app has the machine to itself
in turn, against the same schedule.

For each step, server and app it prints delivered msg/s, publish-to-client latency p50,
p99 and max, frames lost (seqs not received within ``--drain`` s of the last publish;
``late``: how many of those came afterwards, while the servers drained their backlog
before the next step), out of order, duplicates, connections the server closed, the
CPU of each process (and of whatever else ran on the machine meanwhile), the server's
CPU per delivered message, then the ratio gateway/stock. The clients check every seq.

**Idle.** For each server and app in turn: a fresh server process, its RSS (VmRSS) after a
warm-up, ``--idle`` connections each subscribed to one stream with no traffic, the RSS
again; then one message per stream must reach every connection. Figures are printed,
never asserted (SPEC section 8).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import LOOPBACK_LIMITS  # noqa: E402
from tests.chaos.servers import free_port  # noqa: E402
from tests.chaos.stack import Proc, gateway_argv, gateway_start, listening  # noqa: E402

BENCH_DB = "marketdata_bench_fanout"
BENCH_REDIS_DB = 13
# Redis pub/sub channels are global to the Redis server whatever the database: a prefix of
# the bench's own (and tickers of its own) keep its publishes apart from anyone else's.
CHANNELS_PREFIX = "benchfanout"
DATASET = "XNAS.ITCH"
LOCK_KEY = 0x66616E6F7574  # pg advisory lock: one run at a time ("fanout")
APPS = {"ours": "config.asgi:application", "stock": "bench._stock:application"}
DATA = '{{"ts":"2024-01-02T14:30:00Z","open":1,"high":1,"low":1,"close":1,"volume":{ns},"final":false}}'
TARGET_RATE, TARGET_P99_MS, TARGET_IDLE_MIB = 10_000, 100, 1024
CLK = os.sysconf("SC_CLK_TCK")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~30 s): daphne only, one step of 10,000 for 3 s, 1,000 idle")  # fmt: skip
    parser.add_argument("--steps", help="delivered msg/s targets per app (default 2000,5000,10000,20000)")
    parser.add_argument("--seconds", type=float, help="publishing time per step (default 8)")
    parser.add_argument("--drain", type=float, default=5, help="wait for stragglers after a step, s (default 5)")
    parser.add_argument("--servers", help="daphne,uvicorn (default both; --quick: daphne)")
    parser.add_argument("--apps", default="ours,stock", help="ours,stock (default both)")
    parser.add_argument("--layout", choices=["together", "alone"], default="together",
                        help="together: both apps served at once on the same publishes (default); "
                        "alone: one app at a time")  # fmt: skip
    parser.add_argument("--clients", type=int, default=500, help="WebSocket clients per app (default 500)")
    parser.add_argument("--symbols", type=int, default=50, help="streams, one symbol each (default 50)")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes for the load (default 2)")
    parser.add_argument("--tick-ms", type=float, default=5, help="publish a batch every this many ms (default 5)")
    parser.add_argument("--idle", type=int, help="idle connections per server and app, 0 to skip (default 10,000)")
    parser.add_argument("--idle-procs", type=int, default=4, help="client processes for the idle test (default 4)")
    parser.add_argument(
        "--quiet-s",
        type=float,
        default=20,
        help="before each step, wait up to this long for other work on the machine to stop (default 20)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="RATE",
        help="py-spy the gateway during steps >= RATE and print its hot spots (py-spy in the venv)",
    )
    parser.add_argument("--idle-apps", help="apps of the idle test (default: --apps)")
    args = parser.parse_args()
    quick = args.quick
    args.steps = [int(s) for s in (args.steps or ("10000" if quick else "2000,5000,10000,20000")).split(",")]
    args.seconds = args.seconds or (3.0 if quick else 8.0)
    args.drain = min(args.drain, 3.0) if quick else args.drain
    args.idle = args.idle if args.idle is not None else (1_000 if quick else 10_000)
    args.servers = (args.servers or ("daphne" if quick else "daphne,uvicorn")).split(",")
    args.apps = args.apps.split(",")
    args.idle_apps = args.idle_apps.split(",") if args.idle_apps else args.apps
    if not set(args.servers) <= {"daphne", "uvicorn"} or not set(args.apps + args.idle_apps) <= set(APPS):
        parser.error("--servers is a subset of daphne,uvicorn; --apps of ours,stock")
    if not all(100 <= s <= 200_000 for s in args.steps):
        parser.error("--steps must be within 100..200,000 msg/s")
    if not 0.5 <= args.seconds <= 120 or not 0.5 <= args.drain <= 60:
        parser.error("--seconds must be within 0.5..120, --drain within 0.5..60")
    if not 1 <= args.symbols <= 1000 or not args.symbols <= args.clients <= 5_000:
        parser.error("--symbols must be within 1..1000 and --clients within --symbols..5,000")
    if not 1 <= args.client_procs <= 16 or not 1 <= args.idle_procs <= 16:
        parser.error("--client-procs and --idle-procs must be within 1..16")
    if not 0 <= args.idle <= 50_000:
        parser.error("--idle must be within 0..50,000")
    if not 0 <= args.quiet_s <= 120:
        parser.error("--quiet-s must be within 0..120")
    if not 1 <= args.tick_ms <= 100:
        parser.error("--tick-ms must be within 1..100")
    return args


# SETUP


def bench_urls() -> tuple[str, str]:
    """DATABASE_URL and REDIS_URL of the bench: the usual server and user, the bench's database and Redis db."""
    import environ

    base = environ.Env.db_url_config(os.environ.get("DATABASE_URL", "postgres://root@127.0.0.1:5432/marketdata"))
    host, port, user = base.get("HOST") or "127.0.0.1", base.get("PORT") or 5432, base.get("USER") or "root"
    password = f":{base['PASSWORD']}" if base.get("PASSWORD") else ""
    redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
    return f"postgres://{user}{password}@{host}:{port}/{BENCH_DB}", f"{redis}/{BENCH_REDIS_DB}"


def setup(n_symbols: int) -> tuple[dict[str, str], list[str]]:
    """Create and migrate the bench database, seed the symbols; return the servers' environment and the streams."""
    database_url, redis_url = bench_urls()
    os.environ.update({"DJANGO_SETTINGS_MODULE": "config.settings.local", "DATABASE_URL": database_url,
                       "REDIS_URL": redis_url, "LOG_LEVEL": "WARNING", "CHANNELS_PREFIX": CHANNELS_PREFIX})  # fmt: skip
    import django
    import psycopg
    from psycopg import sql

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    db = settings.DATABASES["default"]
    assert db["NAME"] == BENCH_DB, db["NAME"]
    params = {"host": db.get("HOST"), "port": db.get("PORT"), "user": db.get("USER"), "password": db.get("PASSWORD")}
    with psycopg.connect(dbname="postgres", autocommit=True, **{k: v for k, v in params.items() if v}) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
        row = cursor.fetchone()
        if not row or not row[0]:
            raise SystemExit(f"another bench/fanout.py run holds {BENCH_DB}")
    call_command("migrate", verbosity=0, interactive=False)
    from marketdata.models import Symbol

    tickers = [f"FANOUT{i:02d}" for i in range(n_symbols)]
    Symbol.objects.bulk_create([Symbol(ticker=t, dataset=DATASET) for t in tickers], ignore_conflicts=True)
    Symbol.objects.filter(ticker__in=tickers).update(active=True, dataset=DATASET)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "STREAMING_"))},
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DJANGO_DEBUG": "false",
        "STREAMING_ALLOW_ANONYMOUS": "true",
        # 10,000 anonymous clients from one loopback address (see bench.LOOPBACK_LIMITS).
        **LOOPBACK_LIMITS,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        "CHANNELS_PREFIX": CHANNELS_PREFIX,
        "PYTHONPATH": str(ROOT),
    }
    return env, [f"bars:1m:{t}" for t in tickers]


def raise_nofile(want: int) -> int:
    """Raise this process's open-file limit (inherited by servers and clients); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except OSError:
            nr_open = want
        new_hard = max(hard, min(want, nr_open)) if hard != resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# MACHINE AND PROCESSES


def machine(redis_url: str) -> dict[str, str]:
    import redis

    from bench import cpu_model

    model = cpu_model()
    mem = "unknown"
    with contextlib.suppress(OSError, StopIteration, ValueError):
        kib = next(
            int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
        )
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    info = redis.Redis.from_url(redis_url).info("server")
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("channels", "channels-redis", "daphne", "Twisted", "uvicorn", "websockets", "redis")
    )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": f"{os.cpu_count()} ({usable} usable), {model}, {mem} RAM",
        "python": f"{platform.python_version()}, {platform.system()} {platform.release()}",
        "redis": f"{info.get('redis_version')} (pid {info.get('process_id')})",
        "packages": versions,
    }


def redis_pid(redis_url: str) -> int | None:
    import redis

    with contextlib.suppress(Exception):
        pid = int(redis.Redis.from_url(redis_url).info("server")["process_id"])
        if Path(f"/proc/{pid}/stat").exists():
            return pid
    return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone or unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Server:
    """One server process (daphne or uvicorn) serving one app on a loopback port."""

    kind: str
    app: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def server_command(kind: str, app: str, port: int) -> list[str]:
    target = APPS[app]
    if kind == "daphne":
        # The gateway ships its own daphne launcher (a scope extension for the transport's
        # send buffer); the baseline is served by daphne as it comes.
        if app == "ours":
            return gateway_argv(port, app=target)
        return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), target]
    return [
        sys.executable, "-m", "uvicorn", "--ws", "websockets", "--host", "127.0.0.1", "--port", str(port),
        "--lifespan", "off", "--no-access-log", "--log-level", "warning", target,
    ]  # fmt: skip


def start_server(kind: str, app: str, env: dict[str, str], workdir: Path) -> Server:
    """The server started as tests/chaos/stack.py starts every gateway, once its port accepts connections."""
    port = free_port()
    log = workdir / f"{kind}-{app}-{port}.log"
    started: Proc = gateway_start(
        env, log, name=f"{kind} ({app})", port=port, argv=partial(server_command, kind, app), ready=listening,
        timeout=60,
    )  # fmt: skip
    return Server(kind, app, port, started.proc, log)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


# CLIENTS


class Clients:
    """Client processes (bench/_fanout_client.py), driven over pipes; commands go to all at once."""

    def __init__(self, n: int) -> None:
        from bench import _fanout_client

        ctx = multiprocessing.get_context("spawn")  # no Django, no inherited sockets
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_fanout_client.main, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def ask(self, commands: list[tuple[Any, ...]], timeout: float) -> list[dict[str, Any]]:
        for pipe, command in zip(self.pipes, commands, strict=True):
            pipe.send(command)
        answers = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"client process did not answer {commands[0][0]!r} within {timeout:.0f} s")
            answers.append(pipe.recv())
        return answers

    def connect(self, specs: list[tuple[str, int, str]], limit: int, timeout: float) -> dict[str, Any]:
        """Spread the connections over the processes round-robin; return the time and failures."""
        shares: list[list[tuple[str, int, str]]] = [specs[i :: len(self.pipes)] for i in range(len(self.pipes))]
        answers = self.ask([("connect", share, limit, timeout) for share in shares], timeout + 30)
        failures: dict[str, int] = {}
        retries: dict[str, int] = {}
        for a in answers:
            for why, n in a["failures"].items():
                failures[why] = failures.get(why, 0) + n
            for tag, n in a["retries"].items():
                retries[tag] = retries.get(tag, 0) + n
        return {"seconds": max(a["seconds"] for a in answers), "failures": failures, "retries": retries,
                "open": sum(a["open"] for a in answers)}  # fmt: skip

    def finish(self, final_seqs: dict[str, int], drain: float) -> dict[str, dict[str, Any]]:
        """Merge every process's report per tag."""
        merged: dict[str, dict[str, Any]] = {}
        for answer in self.ask([("finish", final_seqs, drain)] * len(self.pipes), drain + 60):
            for tag, r in answer.items():
                m = merged.setdefault(tag, {"latencies": array("q"), "first_ns": 0, "last_ns": 0, "types": {},
                                            "errors": {}, "close_codes": {}})  # fmt: skip
                for key in ("frames", "lost", "ooo", "dup", "late", "closed", "open"):
                    m[key] = m.get(key, 0) + r[key]
                lat = array("q")
                lat.frombytes(r["latencies_us"])
                m["latencies"].extend(lat)
                m["first_ns"] = min(x for x in (m["first_ns"], r["first_ns"]) if x) if r["first_ns"] else m["first_ns"]
                m["last_ns"] = max(m["last_ns"], r["last_ns"])
                for key in ("types", "errors", "close_codes"):
                    for k, v in r[key].items():
                        m[key][k] = m[key].get(k, 0) + v
        return merged

    def close(self) -> None:
        self.ask([("close",)] * len(self.pipes), 60)

    def exit(self) -> None:
        with contextlib.suppress(Exception):
            self.ask([("exit",)] * len(self.pipes), 60)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# PUBLISHING


@dataclass
class Publishing:
    """The one publish path at a steady rate; remembers each stream's last seq."""

    redis_url: str
    streams: list[str]
    tick_s: float
    finals: dict[str, int] = field(default_factory=dict)
    cursor: int = 0

    def __post_init__(self) -> None:
        from streaming.publish import Publisher

        self.publisher = Publisher(self.redis_url)
        self.finals = dict.fromkeys(self.streams, 0)

    def run(self, rate: float, seconds: float) -> tuple[int, int, float]:
        """Publish ``rate`` messages/s for ``seconds``; return (messages, start ns, seconds it took)."""
        from streaming.publish import Message

        n = len(self.streams)
        sent = 0
        start_ns = time.time_ns()
        start = next_tick = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            due = min(int(rate * elapsed) + 1 - sent, 20 * n)  # never a burst after a stall
            if due > 0:
                data = DATA.format(ns=time.time_ns())
                batch = [Message(self.streams[(self.cursor + j) % n], "bar", data) for j in range(due)]
                self.cursor += due
                self.finals.update(self.publisher.publish(batch))
                sent += due
            next_tick += self.tick_s
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        return sent, start_ns, time.perf_counter() - start

    def one_each(self) -> None:
        from streaming.publish import Message

        data = DATA.format(ns=time.time_ns())
        self.finals.update(self.publisher.publish([Message(s, "bar", data) for s in self.streams]))


# RESULTS


def percentile(ordered: list[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000 if ordered else float("nan")


@dataclass
class Figures:
    delivered: float
    p50: float
    p99: float
    max: float
    frames: int
    expected: int
    lost: int
    ooo: int
    dup: int
    late: int
    closed: int
    open: int
    cpu: float
    notes: str
    cpu_us: float = float("nan")


def figures(r: dict[str, Any] | None, expected: int, start_ns: int, seconds: float, cpu: float) -> Figures:
    if r is None:
        return Figures(0, float("nan"), float("nan"), float("nan"), 0, expected, expected, 0, 0, 0, 0, 0, cpu,
                       "no client reported")  # fmt: skip
    ordered = sorted(r["latencies"])
    span = max(seconds, (r["last_ns"] - start_ns) / 1e9) if r["last_ns"] else seconds
    notes = []
    if r["errors"]:
        notes.append(f"errors {r['errors']}")
    if r["close_codes"]:
        notes.append(f"close codes {r['close_codes']}")
    other = {k: v for k, v in r["types"].items() if k not in ("welcome", "heartbeat", "status")}
    if other:
        notes.append(f"other frames {other}")
    return Figures(
        delivered=r["frames"] / span, p50=percentile(ordered, 0.50), p99=percentile(ordered, 0.99),
        max=ordered[-1] / 1000 if ordered else float("nan"), frames=r["frames"], expected=expected, lost=r["lost"],
        ooo=r["ooo"], dup=r["dup"], late=r["late"], closed=r["closed"], open=r["open"], cpu=cpu, notes="; ".join(notes),
    )  # fmt: skip


def line(label: str, f: Figures) -> str:
    text = (
        f"  {label:7} {f.delivered:9,.0f} msg/s  p50 {f.p50:7.1f} ms  p99 {f.p99:7.1f} ms  max {f.max:7.1f} ms  "
        f"{f.frames:>8,}/{f.expected:,}  lost {f.lost:,} (late {f.late:,})  ooo {f.ooo:,}  dup {f.dup:,}  "
        f"closed {f.closed:,}  server cpu {f.cpu:4.0%} ({f.cpu_us:.0f} us/msg)"
    )
    return text + (f"  [{f.notes}]" if f.notes else "")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and a == a and b == b else "n/a"


def verdict(f: Figures) -> str:
    ok = f.delivered >= TARGET_RATE * 0.98 and f.p99 < TARGET_P99_MS and f.lost == 0 and f.ooo == 0
    return "meets" if ok else "misses"


# THE LOAD


def probe(clients: Clients, server: Server, stream: str) -> str | None:
    """None if one client can connect and subscribe, else why not."""
    result = clients.connect([(f"probe-{server.app}", server.port, stream)], limit=1, timeout=15)
    clients.close()
    if result["open"] and not result["failures"]:
        return None
    return "; ".join(result["failures"]) or "no connection"


def step(args: argparse.Namespace, target: int, per_stream: int, servers: dict[str, Server], clients: Clients,
         pub: Publishing, redis: int | None, kind: str, results: dict[tuple[str, str, int], Figures],
         workdir: Path) -> None:  # fmt: skip
    """Publish at one rate, collect and print what each app delivered."""
    rate = target / per_stream
    used = wait_quiet(args.quiet_s)
    if used >= 0.3:
        print(f"  (the machine did not quieten within {args.quiet_s:g} s: {used:.0%} of a core busy before this step)")
    profiler = None
    if args.profile and "ours" in servers and target >= args.profile:
        profiler = py_spy(servers["ours"].pid, args.seconds, workdir / f"py-spy-{kind}-{target}.txt")
    cpu0 = {app: cpu_seconds(s.pid) for app, s in servers.items()}
    others0 = (sum(cpu_seconds(p) for p in clients.pids), cpu_seconds(os.getpid()), cpu_seconds(redis))
    busy0 = machine_busy()
    sent, start_ns, took = pub.run(rate, args.seconds)
    busy1 = machine_busy()
    cpu1 = {app: cpu_seconds(s.pid) for app, s in servers.items()}
    others1 = (sum(cpu_seconds(p) for p in clients.pids), cpu_seconds(os.getpid()), cpu_seconds(redis))
    reports = clients.finish(pub.finals, args.drain)
    # Whatever the servers still hold is sent now; what reaches the clients after the
    # drain was counted lost and comes back as late. The next step starts on quiet servers.
    settle(servers)
    stragglers = clients.finish(pub.finals, 0.1)
    cpu2 = {app: cpu_seconds(s.pid) for app, s in servers.items()}
    expected = sent * per_stream
    machine_cores = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * (os.cpu_count() or 1)
    mine = (sum(cpu1[a] - cpu0[a] for a in servers) + sum(b - a for a, b in zip(others0, others1, strict=True))) / took
    print(
        f"  step {target:,} msg/s per app ({rate:,.0f} published/s x {per_stream}): published {sent:,} in {took:.1f} s;"
        f" cpu while publishing (100% = one core): machine {machine_cores:.0%},"
        f" clients {(others1[0] - others0[0]) / took:.0%}, publisher {(others1[1] - others0[1]) / took:.0%},"
        f" redis {(others1[2] - others0[2]) / took:.0%}, processes not of this bench {max(0, machine_cores - mine):.0%}"
    )
    for app in servers:
        f = figures(reports.get(app), expected, start_ns, took, (cpu1[app] - cpu0[app]) / took)
        f.late = stragglers.get(app, {}).get("late", 0)
        f.cpu_us = (cpu2[app] - cpu0[app]) * 1e6 / max(1, f.frames + f.late)
        results[(kind, app, target)] = f
        print(line(app, f), flush=True)
    if {"ours", "stock"} <= set(servers):
        o, s = results[(kind, "ours", target)], results[(kind, "stock", target)]
        print(
            f"  ratio ours/stock: delivered {ratio(o.delivered, s.delivered)}, p50 {ratio(o.p50, s.p50)}, "
            f"p99 {ratio(o.p99, s.p99)}, server cpu per message {ratio(o.cpu_us, s.cpu_us)}"
        )
    if profiler is not None:
        print_profile(*profiler)


def settle(servers: dict[str, Server], quiet: float = 0.15, limit_s: float = 60) -> None:
    """Wait until every server's CPU stays under ``quiet`` for half a second (at most limit_s)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = {app: cpu_seconds(s.pid) for app, s in servers.items()}
        time.sleep(0.5)
        if all(cpu_seconds(s.pid) - before[app] < quiet * 0.5 for app, s in servers.items()):
            return


def wait_quiet(limit_s: float, busy_cores: float = 0.3) -> float:
    """Wait (at most limit_s) for half a second in which the whole machine uses under busy_cores; return its use.

    Other work on the machine (other test runs, builds) takes the cores from the servers
    under test; a step starts when the machine is quiet, or says that it was not.
    """
    deadline = time.monotonic() + limit_s
    while True:
        b0 = machine_busy()
        time.sleep(0.5)
        b1 = machine_busy()
        used = (b1[0] - b0[0]) / max(1, b1[1] - b0[1]) * (os.cpu_count() or 1)
        if used < busy_cores or time.monotonic() >= deadline:
            return used


def py_spy(pid: int, seconds: float, out: Path) -> tuple[subprocess.Popen[bytes], Path] | None:
    """Sample the gateway with py-spy during a step (not a requirement: skipped when absent)."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        print("  (--profile: py-spy is not installed in the venv; pip install py-spy)")
        return None
    cmd = [str(exe), "record", "--nonblocking", "--function", "--format", "raw", "--rate", "200",
           "--duration", str(max(1, int(seconds))), "--pid", str(pid), "--output", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def print_profile(proc: subprocess.Popen[bytes], out: Path, top: int = 15) -> None:
    """Top functions of the gateway by own and by inclusive samples (py-spy raw: one stack per line)."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with contextlib.suppress(OSError):
        for row in out.read_text().splitlines():
            stack, _, count = row.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n
    if not total:
        print("  py-spy: no samples")
        return
    print(f"  py-spy of the gateway ({total:,} samples, all threads; own: the innermost frame; incl: on the stack,"
          " loop and launcher frames left out)")  # fmt: skip
    by_own = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    # The event loop's and the launcher's frames are under every sample: leave them out.
    by_incl = sorted(((f, n) for f, n in inclusive.items() if n < 0.75 * total), key=lambda kv: -kv[1])[:top]
    for i in range(top):
        left = f"{by_own[i][1] / total:6.1%} {by_own[i][0][:70]}" if i < len(by_own) else ""
        right = f"{by_incl[i][1] / total:6.1%} {by_incl[i][0][:70]}" if i < len(by_incl) else ""
        print(f"    own {left:80}  incl {right}")


def load(args: argparse.Namespace, env: dict[str, str], streams: list[str], pub: Publishing, workdir: Path,
         redis: int | None) -> dict[tuple[str, str, int], Figures]:  # fmt: skip
    results: dict[tuple[str, str, int], Figures] = {}
    per_stream = args.clients // len(streams)
    clients_per_app = per_stream * len(streams)
    for kind in args.servers:
        print(f"\n== {kind}: {clients_per_app} clients per app, {per_stream} per stream, layout {args.layout}")
        servers: dict[str, Server] = {}
        clients = Clients(args.client_procs)
        try:
            for app in args.apps:
                try:
                    servers[app] = start_server(kind, app, env, workdir)
                except RuntimeError as exc:
                    print(f"  {app}: not served: {exc}")
                    continue
                why = probe(clients, servers[app], streams[0])
                if why:
                    print(f"  {app}: cannot subscribe, left out: {why}\n{servers[app].tail(1500)}")
                    stop_server(servers.pop(app))
            groups = [list(servers)] if args.layout == "together" else [[app] for app in servers]
            for apps in groups:
                specs = [(app, servers[app].port, streams[i % len(streams)]) for app in apps
                         for i in range(clients_per_app)]  # fmt: skip
                c = clients.connect(specs, limit=50, timeout=60)
                retried = f"; subscribes answered 'unavailable' and sent again: {c['retries']}" if c["retries"] else ""
                print(f"  connected {c['open']:,} of {len(specs):,} in {c['seconds']:.1f} s ({', '.join(apps)})"
                      + (f"; failures: {c['failures']}" if c["failures"] else "") + retried)  # fmt: skip
                clients.finish(pub.finals, 0.5)  # start every count from here
                for target in args.steps:
                    step(args, target, per_stream, {app: servers[app] for app in apps}, clients, pub, redis, kind,
                         results, workdir)  # fmt: skip
                clients.close()
        finally:
            clients.exit()
            for server in servers.values():
                stop_server(server)
    return results


# IDLE CONNECTIONS


def idle(args: argparse.Namespace, env: dict[str, str], streams: list[str], pub: Publishing,
         workdir: Path) -> dict[tuple[str, str], tuple[float, float, float]]:  # fmt: skip
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    n = args.idle
    print(f"\n== idle: {n:,} connections per server and app, each subscribed to one of {len(streams)} streams, "
          f"from {args.idle_procs} client processes")  # fmt: skip
    clients = Clients(args.idle_procs)
    try:
        for kind in args.servers:
            for app in args.idle_apps:
                try:
                    server = start_server(kind, app, env, workdir)
                except RuntimeError as exc:
                    print(f"  {kind:7} {app:6} not served: {exc}")
                    continue
                try:
                    warm = clients.connect([(app, server.port, s) for s in streams], limit=10, timeout=30)
                    clients.close()
                    if warm["failures"]:
                        print(f"  {kind:7} {app:6} warm-up failed: {warm['failures']}\n{server.tail(1500)}")
                        continue
                    time.sleep(1)
                    before = rss_mib(server.pid)
                    c = clients.connect([(app, server.port, streams[i % len(streams)]) for i in range(n)],
                                        limit=50, timeout=300)  # fmt: skip
                    time.sleep(2)
                    after = rss_mib(server.pid)
                    clients.finish(pub.finals, 0.5)
                    sent_ns = time.time_ns()
                    pub.one_each()
                    alive = clients.finish(pub.finals, 30).get(app, {})
                    took_ms = (alive.get("last_ns", 0) - sent_ns) / 1e6 if alive.get("last_ns") else float("nan")
                    per_conn = (after - before) * 1024 / max(c["open"], 1)
                    results[(kind, app)] = (before, after, per_conn)
                    failures = f"; failures {c['failures']}" if c["failures"] else ""
                    if c["retries"]:
                        failures += f"; subscribes answered 'unavailable' and sent again: {c['retries'][app]:,}"
                    print(f"  {kind:7} {app:6} RSS {before:7.1f} MiB -> {after:7.1f} MiB with {c['open']:,} open "
                          f"({per_conn:5.1f} KiB per connection; connected in {c['seconds']:.1f} s, "
                          f"{c['open'] / max(c['seconds'], 1e-9):,.0f}/s); one message per stream reached "
                          f"{alive.get('frames', 0):,} of {c['open']:,} (the last after {took_ms:,.0f} ms)"
                          f"{failures}", flush=True)  # fmt: skip
                    clients.close()
                finally:
                    stop_server(server)
    finally:
        clients.exit()
    return results


def main() -> None:
    args = parse_args()
    nofile = raise_nofile(max(65_536, 2 * args.idle + 4_096))
    if args.idle + 1_000 > nofile:
        raise SystemExit(f"--idle {args.idle:,} needs more open files than RLIMIT_NOFILE {nofile:,} allows")
    env, streams = setup(args.symbols)
    import redis

    redis.Redis.from_url(env["REDIS_URL"]).flushdb()  # the bench's own Redis db: seqs start at 1
    print("machine:")
    for key, value in machine(env["REDIS_URL"]).items():
        print(f"  {key + ':':10} {value}")
    print(
        f"  layout:    one server process per app, {args.client_procs} client processes (raw-frame asyncio "
        f"clients), the publisher (this process), Redis and PostgreSQL all share these cores over loopback; "
        f"RLIMIT_NOFILE {nofile:,}"
    )
    print(
        f"  load:      {args.clients} clients per app on {args.symbols} bars:1m streams, steps "
        f"{', '.join(f'{s:,}' for s in args.steps)} delivered msg/s per app, {args.seconds:g} s each, batches "
        f"every {args.tick_ms:g} ms, stragglers awaited {args.drain:g} s"
    )
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        workdir = Path(tmp)
        pub = Publishing(env["REDIS_URL"], streams, args.tick_ms / 1000)
        # Streams exist before anyone subscribes: a stream's first seq is its creation time
        # (streaming.publish), so a subscriber must learn it from a seq already assigned.
        pub.one_each()
        loaded = load(args, env, streams, pub, workdir, redis_pid(env["REDIS_URL"])) if args.steps else {}
        idled = idle(args, env, streams, pub, workdir) if args.idle else {}
    print("\n== against SPEC section 8")
    for (kind, app, target), f in sorted(loaded.items()):
        if app == "ours" and target >= TARGET_RATE:
            print(f"  fan-out {kind:7} step {target:,}: {f.delivered:,.0f} msg/s, p99 {f.p99:.1f} ms, lost {f.lost}, "
                  f"out of order {f.ooo}: {verdict(f)} >= {TARGET_RATE:,} msg/s at p99 < {TARGET_P99_MS} ms, 0 lost, "
                  "0 out of order")  # fmt: skip
    for (kind, app), (_, after, _) in sorted(idled.items()):
        if app == "ours":
            status = "meets" if after < TARGET_IDLE_MIB else "misses"
            print(f"  idle    {kind:7} {args.idle:,} connections: {after:,.0f} MiB RSS: {status} < 1 GiB")
    print("  for comparison (SPEC): stock Channels consumers measured ~7,000 msg/s at 100 clients; "
          "this run's stock figures are above")  # fmt: skip


if __name__ == "__main__":
    main()
