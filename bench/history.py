"""Benchmark: /v1/ohlcv 1,000-bar pages under locust, with the Redis hot cache on and off.

Run from the repository root::

    .venv/bin/python bench/history.py [--seconds 30] [--users 200] [--symbols 50] [--paths plain,timescaledb]

It runs on both storage paths, one after the other: plain PostgreSQL on the server
DATABASE_URL names, then TimescaleDB on the server TIMESCALEDB_DATABASE_URL names (default
``postgres://root@127.0.0.1:5433/marketdata``, the cluster scripts/timescaledb.sh makes),
each path in a child process of its own (Django reads its database settings once per
process). On each it works in a database of its own, ``marketdata_bench_history`` on that
server (created through the ``postgres`` maintenance database, migrated, so the bars are a
hypertable on TimescaleDB, its bars replaced on each run), and in Redis database 12, so it
never touches the development database ``marketdata`` or a running demo's keys. Before
and after the runs it checks that ``marketdata_bar`` is a hypertable (its chunks printed)
on TimescaleDB and a plain table on plain PostgreSQL; a run on the wrong path exits. Where
the TimescaleDB server does not answer or has no extension, that path is skipped with one
line saying why. It seeds ``--symbols`` symbols with
``--bars`` 1m bars each, ending at the current minute, and an API token entitled to
their dataset (production settings: no anonymous access, so token auth and the
entitlement check are part of every request). Then, for each run, it starts its own
gateway (``python -m streaming.server``: daphne as shipped) on a free loopback port and
runs locust headless against it:

- ``--users`` users, each asking for a page every 0.5-1.5 s (``--wait``), the symbol drawn
  from a Zipf law (exponent ``--zipf``) over the symbols; 80% of the requests are a
  chart's first load (the latest 1,000 bars), 20% one of the 9 pages before it;
- meanwhile a writer stores each symbol's next 1m bar once a minute (spread over the
  minute) with bars_upsert then versions_bump (naming the bar's time, so pages wholly
  before it stay cached), as the ingester does, so cached pages are invalidated as they
  would be in a live market;
- run 1 with the cache off (API_HOT_CACHE=false), run 2 with it on, same seed.

It prints requests/s, p50/p95/p99 (ms, locust's, which rounds each time to a whole ms),
the same percentiles exact (each request's time, recorded by the locustfile) over the
whole run and over the steady state (the answers after the warm-up below), failures,
the cache hit ratio (from the
gateway's /metrics: answers from the cache among all answers, so a miss that shared a
query in flight counts against it) both over the whole run and in the steady state (the
answers after a warm-up of the run's first third, 10 s at the defaults), the gateway's
background prefetches by outcome, the gateway's CPU per request, the machine's load
average before and after each run (the figures mean little on a busy machine), the
machine, and the ratio of the two runs (cache on over cache off, the baseline, per path).
At the end a table puts each path's figures side by side. Figures are printed, never
asserted (SPEC section 8).

The whole-run hit ratio has a ceiling set by the cold start. At the defaults (30 s,
~5,700 requests, Zipf 1.1 over 50 symbols, 10 pages each) about 345 distinct pages are
asked for, 6% of the requests, and the writer's 25 new bars invalidate 25 latest pages
more. The first request of a page is a miss unless the gateway prefetched it: after a
miss it fills the page before the missed one, and after the first read of a prefetched
page the page before that (docs/API.md). A chart scrolling back would find every page
but its first; these users jump to one of 9 older pages at random instead, so a page is
prefetched only when a newer neighbour was asked for first, and the writer's new bars
move a symbol's latest page a minute off the fixed grid of older pages here, so what is
prefetched from it is not what these users ask for. A simple model of this request mix
(prefetches taking no time, none dropped) gives: 93.5% over the whole run without
prefetch, 95.2% with the prefetch after misses only, 95.7% as shipped; 96.2%, 97.5% and
98.0% in the steady state. Measured figures run below those by the prefetches dropped at
the cold start's burst (at most 4 in flight) and the requests that arrive while their page
is still being prefetched (counted as shared, not hits).

Options:

- ``--seconds N``: length of each run (default 30).
- ``--users N``: locust users (default 200).
- ``--symbols N``: symbols (default 50).
- ``--bars N``: 1m bars per symbol, at least 10,000 for 10 pages (default 12,000).
- ``--zipf S``: Zipf exponent over symbols (default 1.1).
- ``--wait MIN,MAX``: seconds between a user's requests (default 0.5,1.5).
- ``--no-writes``: no live writer during the runs.
- ``--only on|off``: run only with the cache on or off (no ratio then).
- ``--http shipped|django-asgi|threaded``: how the gateway serves HTTP (``--help`` says more).
- ``--paths plain,timescaledb``: the storage paths to run, in that order (default both).

When locust loads this file as its locustfile, only the user class below is defined.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if TYPE_CHECKING:
    from tests.chaos.stack import Proc
BENCH_DB = "marketdata_bench_history"
DEV_DB = "marketdata"
BENCH_REDIS_DB = 12
DATASET = "XNAS.ITCH"
PAGE = 1000
HISTORY_PAGES = 9  # pages before the latest one that users also read
LOCK_KEY = 0x6869737479  # pg advisory lock: one run at a time ("histy")

if __name__ != "__main__" and "locust" in sys.modules:  # loaded by locust as its locustfile
    import gevent
    from locust import FastHttpUser, between, events, task

    _SYMBOLS = os.environ["BENCH_SYMBOLS"].split(",")
    _ZIPF = float(os.environ["BENCH_ZIPF"])
    _WEIGHTS = [1 / (rank**_ZIPF) for rank in range(1, len(_SYMBOLS) + 1)]
    _LAST_OPEN = datetime.fromisoformat(os.environ["BENCH_LAST_OPEN"])
    _AUTH = {"Authorization": "Token " + os.environ["BENCH_TOKEN"]}
    _WAIT = [float(x) for x in os.environ["BENCH_WAIT"].split(",")]

    _TIMES: list[str] = []  # "<unix time at the answer> <response time in ms>", one a request

    @events.request.add_listener
    def _record(response_time: float, **_: Any) -> None:
        _TIMES.append(f"{time.time():.6f} {response_time:.3f}")

    @events.quitting.add_listener
    def _dump(**_: Any) -> None:
        Path(os.environ["BENCH_TIMES"]).write_text("\n".join(_TIMES))

    class HistoryUser(FastHttpUser):
        """A chart: the latest 1,000 bars of a symbol mostly, sometimes an older page."""

        wait_time = between(_WAIT[0], _WAIT[1])

        def on_start(self) -> None:
            # People do not all open their charts in the same millisecond: spread the
            # first requests over one wait, or the start is a 200-request burst.
            gevent.sleep(random.uniform(0, _WAIT[1]))

        @task
        def ohlcv_page(self) -> None:
            symbol = random.choices(_SYMBOLS, weights=_WEIGHTS)[0]
            query = f"symbol={symbol}&tf=1m&limit={PAGE}"
            if random.random() < 0.2:
                # Older pages on a fixed grid, so they repeat (and can be cached) like real scrolling.
                back = random.randint(1, HISTORY_PAGES)
                end = _LAST_OPEN - timedelta(minutes=PAGE * back - 1)
                start = end - timedelta(minutes=PAGE)
                query += f"&start={start:%Y-%m-%dT%H:%M:%SZ}&end={end:%Y-%m-%dT%H:%M:%SZ}"
            with self.client.get(f"/v1/ohlcv?{query}", headers=_AUTH, name="/v1/ohlcv", catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"status {r.status_code}")
                elif r.content is None or r.content.count(b'"ts"') != PAGE:
                    r.failure("short page")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=30, help="length of each run (default 30)")
    parser.add_argument("--users", type=int, default=200, help="locust users (default 200)")
    parser.add_argument("--symbols", type=int, default=50, help="symbols (default 50)")
    parser.add_argument(
        "--bars", type=int, default=12_000, help="1m bars per symbol, >= 10,000 for 10 pages (default 12,000)"
    )
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent over symbols (default 1.1)")
    parser.add_argument(
        "--wait", default="0.5,1.5", help="seconds between a user's requests, min,max (default 0.5,1.5)"
    )
    parser.add_argument("--no-writes", action="store_true", help="no live writer during the runs")
    parser.add_argument("--only", choices=["on", "off"], help="run only with the cache on or off")
    parser.add_argument(
        "--http",
        choices=["shipped", "django-asgi", "threaded"],
        default="shipped",
        help="shipped: config.asgi (HTTP through Django's WSGI handler behind WsgiToAsgi); "
        "django-asgi: Django's own ASGI handler; threaded: the WSGI handler in a thread pool, "
        "one hop per request (THREADED_APP); the last two for comparison",
    )
    from bench import STORAGE_PATHS, add_paths_argument

    add_paths_argument(parser)
    # One storage path in this process (the parent runs each path in a child with these):
    # Django reads its database settings once per process.
    parser.add_argument("--run-storage", choices=list(STORAGE_PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.seconds <= 3600:
        parser.error("--seconds must be within 1..3600")
    if not 1 <= args.users <= 5000:
        parser.error("--users must be within 1..5000")
    if not 1 <= args.symbols <= 1000:
        parser.error("--symbols must be within 1..1000")
    if not PAGE * (HISTORY_PAGES + 1) <= args.bars <= 200_000:
        parser.error(f"--bars must be within {PAGE * (HISTORY_PAGES + 1)}..200,000")
    return args


def bench_env() -> dict[str, str]:
    """The environment of this process's Django and of the gateway it starts: the bench database and Redis db."""
    from django.conf import settings

    return {
        "DATABASE_URL": database_url(settings.DATABASES["default"]),
        "REDIS_URL": redis_url(settings.REDIS_URL),
    }


def database_url(db: dict[str, Any]) -> str:
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{BENCH_DB}"


def redis_url(url: str) -> str:
    return re.sub(r"(redis://[^/]+)(/\d+)?$", rf"\1/{BENCH_REDIS_DB}", url)


def setup_django() -> dict[str, str]:
    """Point Django at the bench database and Redis db before anything connects; return their URLs."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    import django
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["NAME"] == BENCH_DB:
        raise SystemExit(f"the settings already name {BENCH_DB}; point them at the usual database")
    env = bench_env()
    db["NAME"] = BENCH_DB
    settings.REDIS_URL = env["REDIS_URL"]
    django.setup()
    from django.db import connection

    # The guard that this benchmark never writes to the development database.
    assert connection.settings_dict["NAME"] == BENCH_DB != DEV_DB, connection.settings_dict["NAME"]
    create_bench_db(db)
    return env


def create_bench_db(db: dict[str, Any]) -> None:
    import psycopg
    from psycopg import sql

    params = {"host": db.get("HOST"), "port": db.get("PORT"), "user": db.get("USER"), "password": db.get("PASSWORD")}
    with psycopg.connect(dbname="postgres", autocommit=True, **{k: v for k, v in params.items() if v}) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))


def lock() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
        if not cursor.fetchone()[0]:
            raise SystemExit(f"another bench/history.py run holds {BENCH_DB}")


def seed(n_symbols: int, n_bars: int) -> tuple[list[str], list[int], datetime, str]:
    """Fresh bars ending at the current minute; symbols, a user entitled to them and a token."""
    from django.contrib.auth.models import User
    from django.db import connection

    from marketdata.models import ApiToken, Entitlement, Symbol
    from marketdata.services.api_tokens import api_token_create
    from marketdata.services.bars_trades import BarIn, bars_upsert

    tickers = [f"HIST{i:03d}" for i in range(n_symbols)]
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE marketdata_bar")
    Symbol.objects.bulk_create([Symbol(ticker=t, dataset=DATASET) for t in tickers], ignore_conflicts=True)
    ids = dict(Symbol.objects.filter(ticker__in=tickers).values_list("ticker", "id"))
    last_open = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
    first_open = last_open - timedelta(minutes=n_bars - 1)
    rng = random.Random(20240102)
    batch: list[BarIn] = []
    for ticker in tickers:
        price = rng.randint(10_000, 500_000) * 10_000_000
        for i in range(n_bars):
            close = max(10_000_000, price + rng.randint(-100, 100) * 10_000_000)
            high, low = max(price, close) + rng.randint(0, 20) * 10_000_000, min(price, close) - 10_000_000
            batch.append(BarIn(ids[ticker], "1m", first_open + timedelta(minutes=i), 1, price, high, max(low, 1),
                               close, rng.randint(100, 100_000)))  # fmt: skip
            price = close
            if len(batch) == 20_000:
                bars_upsert(bars=batch)
                batch = []
    bars_upsert(bars=batch)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE marketdata_bar")
    user, _ = User.objects.get_or_create(username="bench-history")
    Entitlement.objects.get_or_create(user=user, dataset=DATASET)
    ApiToken.objects.filter(user=user).delete()
    _, token = api_token_create(user=user, name="bench/history.py")
    return tickers, [ids[t] for t in tickers], last_open, token


class Writer(threading.Thread):
    """Each symbol's next 1m bar once a minute, spread over the minute; upsert, then bump its version."""

    def __init__(self, symbol_ids: list[int], last_open: datetime) -> None:
        super().__init__(daemon=True)
        self.symbol_ids = symbol_ids
        self.next_open = {sid: last_open + timedelta(minutes=1) for sid in symbol_ids}
        self.stop = threading.Event()
        self.writes = 0

    def run(self) -> None:
        from django.db import connection

        from marketdata.cache.versions import versions_bump
        from marketdata.services.bars_trades import BarIn, bars_upsert

        interval = 60 / len(self.symbol_ids)
        i = 0
        try:
            while not self.stop.wait(interval):
                sid = self.symbol_ids[i % len(self.symbol_ids)]
                i += 1
                ts = self.next_open[sid]
                self.next_open[sid] = ts + timedelta(minutes=1)
                p = 100 * 1_000_000_000
                bars_upsert(bars=[BarIn(sid, "1m", ts, 1, p, p, p, p, 1)])
                versions_bump(symbol_ids=[sid], changed={sid: {"1m": ts}})
                self.writes += 1
        finally:
            connection.close()


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback only)
        return bytes(response.read())


# Production settings, but with a connection pool instead of persistent connections: under
# ASGI every request runs in a thread of its own, so CONN_MAX_AGE > 0 leaves one open
# connection per request until PostgreSQL refuses more ("too many clients already", seen
# at 200 users with the project's default of 60). Django recommends pooling for ASGI.
GATEWAY_SETTINGS = """
from config.settings.production import *  # noqa: F403
from config.settings.production import DATABASES, STORAGES

DATABASES["default"]["CONN_MAX_AGE"] = 0
DATABASES["default"]["CONN_HEALTH_CHECKS"] = False
DATABASES["default"]["OPTIONS"]["pool"] = {"min_size": 4, "max_size": 16, "timeout": 10}
# What production's start-up checks ask of a deployment, which a benchmark on loopback does
# not have: /metrics is read by this script without a token, and no page is served, so the
# static files need no collectstatic manifest.
METRICS_PUBLIC = True
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
"""


# --http django-asgi: Django's own ASGI handler, which hops between the event loop and a
# thread for each sync middleware hook (~2.5 ms a request here); config.asgi serves HTTP
# through the WSGI handler behind WsgiToAsgi instead.
DJANGO_ASGI_APP = """
from django.core.asgi import get_asgi_application

application = get_asgi_application()
"""


# --http threaded: config.asgi, but HTTP run whole in a pool of threads (WSGI app, body
# collected, close() so request_finished returns the DB connection, all in the thread),
# then start and body sent from the event loop. WsgiToAsgi runs every request in one
# thread (sync_to_async is thread-sensitive by default: requests queue behind each
# other's database and Redis waits) and hops back to the loop for each of its three
# send() calls. A sketch for measuring, not for shipping: a streaming response is
# collected whole here.
THREADED_APP = """
import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

from asgiref.wsgi import WsgiToAsgiInstance
from django.core.wsgi import get_wsgi_application

import config.asgi as shipped

_wsgi = get_wsgi_application()
_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="http")


def _run(environ):
    started = []
    result = _wsgi(environ, lambda status, headers, exc_info=None: started.extend((status, headers)))
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return started[0], started[1], body


async def application(scope, receive, send):
    if scope["type"] != "http":
        return await shipped.application(scope, receive, send)
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    instance = WsgiToAsgiInstance(_wsgi)
    instance.scope = scope
    environ = instance.build_environ(scope, io.BytesIO(b"".join(chunks)))
    status, headers, body = await asyncio.get_running_loop().run_in_executor(_pool, _run, environ)
    await send({
        "type": "http.response.start",
        "status": int(status.split(" ", 1)[0]),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    })
    await send({"type": "http.response.body", "body": body})
"""


def start_gateway(env: dict[str, str], cache_on: bool, workdir: Path, http: str = "shipped") -> Proc:
    """The gateway (or, with ``http``, another HTTP path in its place) once /healthz answers."""
    from tests.chaos.stack import GatewayFailed, gateway_start

    (workdir / "bench_history_settings.py").write_text(GATEWAY_SETTINGS)
    (workdir / "bench_history_django_asgi.py").write_text(DJANGO_ASGI_APP)
    (workdir / "bench_history_threaded.py").write_text(THREADED_APP)
    app = {
        "shipped": "config.asgi:application",
        "django-asgi": "bench_history_django_asgi:application",
        "threaded": "bench_history_threaded:application",
    }[http]
    gateway_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "STREAMING_", "API_"))},
        **env,
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT)]),
        "DJANGO_SETTINGS_MODULE": "bench_history_settings",
        "DJANGO_SECRET_KEY": "bench-history-INSECURE-" + "x" * 40,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "API_HOT_CACHE": "true" if cache_on else "false",
        # One locust process is one client address: rate limits off, or they would be the bench.
        "API_THROTTLE_PRINCIPAL": "",
        "API_THROTTLE_IP": "",
        "LOG_LEVEL": "WARNING",
    }
    log = workdir / f"daphne-{'on' if cache_on else 'off'}.log"
    try:
        return gateway_start(gateway_env, log, args=("-v", "0"), app=app)
    except GatewayFailed as exc:
        raise SystemExit(f"daphne did not start; see {log.name}:\n{exc}") from None


PREFETCH_OUTCOMES = ("filled", "cached", "busy", "dropped", "unavailable", "failed")


def cache_counts(base: str) -> tuple[float, ...]:
    """/v1/ohlcv answers so far (hit, miss, coalesced), then the gateway's prefetches by PREFETCH_OUTCOMES."""
    # Generous timeout: under load the gateway answers /metrics behind a queue of requests.
    text = get(base + "/metrics", timeout=60).decode()
    found = dict(
        re.findall(r'^api_cache_answers_total\{endpoint="ohlcv",result="(hit|miss|coalesced)"\} (\S+)$', text, re.M)
    )
    prefetches = dict(re.findall(r'^cache_prefetches_total\{outcome="(\w+)"\} (\S+)$', text, re.M))
    return (
        float(found.get("hit", 0)), float(found.get("miss", 0)), float(found.get("coalesced", 0)),
        *(float(prefetches.get(outcome, 0)) for outcome in PREFETCH_OUTCOMES),
    )  # fmt: skip


def run_locust(base: str, args: argparse.Namespace, tickers: list[str], last_open: datetime, token: str,
               workdir: Path, label: str) -> dict[str, Any]:  # fmt: skip
    prefix = workdir / label
    env = {
        **os.environ,
        "BENCH_SYMBOLS": ",".join(tickers),
        "BENCH_ZIPF": str(args.zipf),
        "BENCH_LAST_OPEN": last_open.isoformat(),
        "BENCH_TOKEN": token,
        "BENCH_WAIT": args.wait,
        "BENCH_TIMES": str(workdir / f"times-{label}.txt"),
    }
    cmd = [
        sys.executable, "-m", "locust", "-f", str(Path(__file__).resolve()), "--headless", "--only-summary",
        "-u", str(args.users), "-r", str(args.users), "-t", f"{args.seconds}s", "--stop-timeout", "5",
        "--host", base, "--csv", str(prefix), "--loglevel", "WARNING",
    ]  # fmt: skip
    with (workdir / f"locust-{label}.log").open("wb") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.seconds + 120,
                       check=False)  # fmt: skip
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    row = rows["Aggregated"]
    if float(row["Failure Count"]):
        with open(f"{prefix}_failures.csv", newline="") as f:
            for failure in csv.DictReader(f):
                print(f"  failed ({label}): {failure['Occurrences']} x {failure['Error']}", flush=True)
        # The gateway's own account of a server error (its log goes with the run's temporary directory).
        gateway_log = workdir / f"daphne-{label}.log"
        if gateway_log.exists():
            lines = gateway_log.read_text(errors="replace").splitlines()
            for n, text in enumerate(lines):
                if "Traceback" in text or '"level": "error"' in text or "ERROR" in text:
                    print("  gateway: " + "\n  gateway: ".join(lines[n : n + 40]), flush=True)
                    break
    times_file = workdir / f"times-{label}.txt"  # none when locust failed before its end (its log says why)
    lines = times_file.read_text().split("\n") if times_file.exists() else []
    times = [tuple(map(float, t.split())) for t in lines if t]
    return {
        "times": times,
        "requests": float(row["Request Count"]),
        "failures": float(row["Failure Count"]),
        "rps": float(row["Requests/s"]),
        "p50": float(row["50%"]),
        "p95": float(row["95%"]),
        "p99": float(row["99%"]),
        "mean": float(row["Average Response Time"]),
    }


def one_run(cache_on: bool, args: argparse.Namespace, env: dict[str, str], seeded: tuple, workdir: Path) -> dict:
    tickers, ids, last_open, token = seeded
    import redis

    redis.Redis.from_url(env["REDIS_URL"]).flushdb()  # the bench's own Redis db: no entry survives a run
    load_before = os.getloadavg()[0]
    gateway = start_gateway(env, cache_on, workdir, args.http)
    proc, base = gateway.proc, gateway.http
    writer = None if args.no_writes else Writer(ids, last_open)
    # The counters a third into the run too: the ratio after that is the steady state,
    # once the first sight of each (symbol, page) has been paid for.
    warm: list[tuple[float, ...]] = []
    warm_at: list[float] = []

    def warmed() -> None:
        warm_at.append(time.time())
        warm.append(cache_counts(base))

    timer = threading.Timer(args.seconds / 3, warmed)
    try:
        start = cache_counts(base)
        cpu_start = cpu_seconds(proc.pid)
        if writer is not None:
            writer.start()
        timer.start()
        result = run_locust(base, args, tickers, last_open, token, workdir, "on" if cache_on else "off")
        cpu = cpu_seconds(proc.pid) - cpu_start
        end = cache_counts(base)
    finally:
        timer.cancel()
        if writer is not None:
            writer.stop.set()
            writer.join()
        gateway.stop(timeout=10)
    result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
    result["hit_ratio"] = ratio(start, end)
    result["coalesced"] = end[2] - start[2]
    result["hit_ratio_warm"] = ratio(warm[0], end) if warm else float("nan")
    # Exact response times (locust's own percentiles are whole milliseconds), over the whole
    # run and over the steady state: the answers after the warm-up, as for the hit ratio.
    times = result.pop("times")
    for prefix, since in (("exact_", 0.0), ("warm_", warm_at[0] if warm_at else float("inf"))):
        for q in (50, 95, 99):
            result[f"{prefix}p{q}"] = percentile([ms for at, ms in times if at >= since], q)
    result["warmup_s"] = args.seconds / 3
    for n, outcome in enumerate(PREFETCH_OUTCOMES, start=3):
        result["prefetch_" + outcome] = end[n] - start[n]
    result["writes"] = float(writer.writes if writer is not None else 0)
    # The gateway's own CPU per answer: what a busy, shared machine changes least.
    result["cpu_ms"] = 1000 * cpu / result["requests"] if result["requests"] else float("nan")
    return result


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (NaN of nothing)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ratio(before: tuple[float, ...], after: tuple[float, ...]) -> float:
    """Cache hits among all answers: a coalesced answer (a miss that shared another's query) is not a hit."""
    hits, others = after[0] - before[0], sum(after[1:3]) - sum(before[1:3])
    return hits / (hits + others) if hits + others else float("nan")


def machine() -> dict[str, str]:
    from django.db import connection

    from bench import cpu_model

    model = cpu_model()

    from marketdata.storage import timescaledb_enabled

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        (pg_version,) = cursor.fetchone()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": f"{os.cpu_count()} ({usable} usable)",
        "cpu": model,
        "python": platform.python_version(),
        "postgresql": f"{pg_version} ({'TimescaleDB' if timescaledb_enabled() else 'plain PostgreSQL'})",
        "layout": "gateway (streaming.server) and locust, a process each; PostgreSQL, Redis on one machine; loopback",
        "gateway": "production settings, DB connection pool 4..16 (not persistent connections: see GATEWAY_SETTINGS)",
    }


def line(label: str, r: dict[str, float]) -> str:
    text = (
        f"{label:10} {r['rps']:8.1f} req/s  p50 {r['p50']:5.0f} ms  p95 {r['p95']:5.0f} ms  p99 {r['p99']:5.0f} ms"
        f"  mean {r['mean']:6.1f} ms  {int(r['requests']):>7,} requests  {int(r['failures'])} failed"
        f"  gateway CPU {r['cpu_ms']:.2f} ms/request"
        f"  ({int(r['writes'])} bars written meanwhile)"
        f"  load average {r['load_before']:.2f} -> {r['load_after']:.2f}"
    )
    text += (
        f"\n{'':10} exact: p50 {r['exact_p50']:.1f} ms  p95 {r['exact_p95']:.1f} ms  p99 {r['exact_p99']:.1f} ms;"
        f" steady state (after the warm-up): p50 {r['warm_p50']:.1f} ms  p95 {r['warm_p95']:.1f} ms"
        f"  p99 {r['warm_p99']:.1f} ms"
    )
    if r["hit_ratio"] == r["hit_ratio"]:  # not NaN: the cache answered
        text += (
            f"\n{'':10} hit ratio: whole run {r['hit_ratio']:.1%} (cold start included),"
            f" steady state {r['hit_ratio_warm']:.1%} (after a {r['warmup_s']:.0f} s warm-up);"
            f" {int(r['coalesced'])} misses shared a query in flight; prefetched pages:"
            f" {int(r['prefetch_filled'])} filled, {int(r['prefetch_cached'])} already cached,"
            f" {int(r['prefetch_busy'])} being filled, {int(r['prefetch_dropped'])} dropped (busy),"
            f" {int(r['prefetch_failed'] + r['prefetch_unavailable'])} failed"
        )
    return text


def ratios(results: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """Cache on over cache off (the baseline), where both ran."""
    if "cache on" not in results or "cache off" not in results:
        return None
    on, off = results["cache on"], results["cache off"]
    return {k: on[k] / off[k] if off[k] else float("nan") for k in ("p95", "p99", "mean", "rps", "cpu_ms")}


def run_storage(args: argparse.Namespace) -> None:
    """Both cache runs on one storage path, in this process; the figures to --results as JSON."""
    import json

    from bench import server_url, storage_check

    # Before Django reads its settings: this process's database server is the path's.
    os.environ["DATABASE_URL"] = server_url(args.run_storage)
    env = setup_django()
    from django.core.management import call_command

    lock()
    call_command("migrate", verbosity=0, interactive=False)
    storage_check(env["DATABASE_URL"], args.run_storage, ["marketdata_bar"])  # before any timing
    t0 = time.perf_counter()
    seeded = seed(args.symbols, args.bars)
    print(
        f"seeded {args.symbols} symbols x {args.bars:,} 1m bars in {BENCH_DB} in {time.perf_counter() - t0:.1f} s; "
        f"Redis db {BENCH_REDIS_DB}"
    )
    for key, value in machine().items():
        print(f"{key + ':':12} {value}")
    http = {"shipped": "config.asgi (as shipped)", "django-asgi": "Django ASGI handler",
            "threaded": "WSGI handler in a thread pool (THREADED_APP)"}[args.http]  # fmt: skip
    print(f"http:        {http}")
    print(
        f"load:        {args.users} users, wait {args.wait} s between requests, Zipf s={args.zipf} over "
        f"{args.symbols} symbols, {PAGE}-bar pages of /v1/ohlcv (80% latest, 20% one of {HISTORY_PAGES} older), "
        f"{args.seconds} s per run"
    )
    print()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        workdir = Path(tmp)
        for label, cache_on in (("cache off", False), ("cache on", True)):
            if args.only and args.only != label.split()[1]:
                continue
            results[label] = one_run(cache_on, args, env, seeded, workdir)
            print(line(label, results[label]), flush=True)
            if results[label]["requests"] == 0:
                print((workdir / f"locust-{label.split()[1]}.log").read_text()[-3000:])
    r = ratios(results)
    if r:
        print()
        print(
            f"ratio on/off: p95 {r['p95']:.2f}, p99 {r['p99']:.2f}, mean {r['mean']:.2f}, req/s {r['rps']:.2f}, "
            f"gateway CPU/request {r['cpu_ms']:.2f}"
        )
    what = storage_check(env["DATABASE_URL"], args.run_storage, ["marketdata_bar"])["marketdata_bar"]
    print(f"storage:     marketdata_bar is a {what}")
    if args.results:
        Path(args.results).write_text(json.dumps({"results": results, "ratios": r, "storage": what}))


def figures_of(f: dict[str, Any]) -> dict[str, str]:
    """One storage path's figures for the table, by row label."""
    out = {}
    for run, r in f["results"].items():
        out[f"{run}: req/s"] = f"{r['rps']:.1f}"
        out[f"{run}: p50 / p95 / p99, ms"] = f"{r['p50']:.0f} / {r['p95']:.0f} / {r['p99']:.0f}"
        out[f"{run}: steady p50 / p95 / p99, ms exact"] = (
            f"{r['warm_p50']:.1f} / {r['warm_p95']:.1f} / {r['warm_p99']:.1f}"
        )
        out[f"{run}: requests (failed)"] = f"{r['requests']:,.0f} ({r['failures']:.0f})"
        out[f"{run}: gateway CPU, ms/request"] = f"{r['cpu_ms']:.2f}"
        if r["hit_ratio"] == r["hit_ratio"]:  # not NaN: the cache answered
            out[f"{run}: hit ratio, whole run / steady"] = f"{r['hit_ratio']:.1%} / {r['hit_ratio_warm']:.1%}"
    if f["ratios"]:
        q = f["ratios"]
        out["ratio on/off: p95 / p99 / mean"] = f"{q['p95']:.2f} / {q['p99']:.2f} / {q['mean']:.2f}"
        out["ratio on/off: req/s / gateway CPU"] = f"{q['rps']:.2f} / {q['cpu_ms']:.2f}"
    out["storage: marketdata_bar"] = f["storage"]
    return out


def table(figures: dict[str, dict[str, Any]]) -> str:
    """Each storage path's figures side by side."""
    from bench import side_by_side

    by_path = {storage: figures_of(f) for storage, f in figures.items()}
    labels = dict.fromkeys(label for rows in by_path.values() for label in rows)
    return side_by_side(
        [(label, {s: rows[label] for s, rows in by_path.items() if label in rows}) for label in labels],
        list(figures),
    )


def main() -> None:
    args = parse_args()
    if args.run_storage:
        run_storage(args)
        return
    import json

    from bench import STORAGE_PATHS, server_url, storage_unavailable

    figures: dict[str, dict[str, Any]] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench-history-paths-") as tmp:
        for storage in args.paths:
            why = storage_unavailable(storage)
            if why:
                print(f"{storage}: skipped: {why}", flush=True)
                continue
            where = server_url(storage).rsplit("@", 1)[-1].rsplit("/", 1)[0]
            print(f"\n== {STORAGE_PATHS[storage]}: {where}/{BENCH_DB}", flush=True)
            out = Path(tmp) / f"{storage}.json"
            child = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--run-storage", storage,
                     "--results", str(out)]  # fmt: skip
            status = subprocess.run(child, cwd=ROOT, check=False).returncode
            if status != 0 or not out.exists():
                print(f"{storage}: failed (exit {status})", flush=True)
                failed.append(storage)
                continue
            figures[storage] = json.loads(out.read_text())
    if figures:
        print()
        print(table(figures))
    print("target (SPEC section 8): p95 < 10 ms cached, < 50 ms uncached; cache hit ratio >= 95%")
    if failed:
        raise SystemExit(f"bench/history.py: failed on {', '.join(failed)}")


if __name__ == "__main__":
    main()
