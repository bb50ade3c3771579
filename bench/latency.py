"""Benchmark: end-to-end latency, ingester commit -> WebSocket client, at 1,000 messages/s.

Run from the repository root::

    .venv/bin/python bench/latency.py [--seconds 30] [--rate 1000] [--symbols 50] [--clients 10]

It writes a DBN file of trades spaced 1/rate s apart, replays it in real time through the
real ingester (``manage.py ingest replay FILE --speed 1``: decode, write, commit, then
publish) into a database of its own (``marketdata_bench_latency``) and Redis database 5,
with the real gateway (``python -m streaming.server``) on a loopback port. ``--clients``
WebSocket clients each subscribe to every trades stream.

The publish time is the ``t`` the publisher stamps on each pub/sub message right after
the commit; a plain Redis subscriber in this process records it per (stream, seq), and
each client's receive time minus it is the latency. Beside it, as the baseline: the same
plain Redis subscriber's own receive time minus ``t`` (Redis pub/sub alone, no gateway).
Lost, duplicated and out-of-order messages are counted per client. SPEC section 8 target:
p99 < 50 ms. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import bench_env as common_env  # noqa: E402
from bench import machine  # noqa: E402
from tests.chaos.stack import GatewayFailed, Proc, gateway_start, listening  # noqa: E402

BENCH_DB = "marketdata_bench_latency"
BENCH_REDIS_DB = 5
LOG = open(os.devnull, "w") if not os.environ.get("BENCH_VERBOSE") else None  # noqa: SIM115
NS = 1_000_000_000
TICK = 10_000_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=30, help="how long the feed runs (default 30)")
    parser.add_argument("--rate", type=int, default=1000, help="messages a second (default 1000)")
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    if not 5 <= args.seconds <= 3600:
        parser.error("--seconds must be within 5..3600")
    if not 1 <= args.rate <= 20_000:
        parser.error("--rate must be within 1..20,000")
    if not 1 <= args.symbols <= 1000 or not 1 <= args.clients <= 200:
        parser.error("--symbols within 1..1000, --clients within 1..200")
    return args


def bench_env() -> dict[str, str]:
    return common_env(BENCH_DB, BENCH_REDIS_DB, CHANNELS_PREFIX="bench.latency", PYTHONUNBUFFERED="1")


def write_trades(path: Path, symbols: dict[str, int], seconds: int, rate: int) -> int:
    import databento_dbn as dbn
    import zstandard

    n = seconds * rate
    start = int(time.time()) * NS
    step = NS // rate
    ids = list(symbols.values())
    today = datetime.now(UTC).date()
    days = {"start_date": today - timedelta(days=1), "end_date": today + timedelta(days=2)}
    mappings = [
        SimpleNamespace(raw_symbol=s, intervals=[SimpleNamespace(symbol=str(i), **days)]) for s, i in symbols.items()
    ]
    out = [
        dbn.Metadata(
            dataset="XNAS.ITCH", schema=dbn.Schema.TRADES, start=start, stype_in=dbn.SType.RAW_SYMBOL,
            stype_out=dbn.SType.INSTRUMENT_ID, symbols=list(symbols), partial=[], not_found=[], mappings=mappings,
            end=None, limit=None, ts_out=False, version=3,
        ).encode()
    ]  # fmt: skip
    for k in range(n):
        ts = start + k * step
        out.append(bytes(dbn.TradeMsg(publisher_id=2, instrument_id=ids[k % len(ids)], ts_event=ts, ts_recv=ts,
                                      price=(100 + k % 7) * TICK * 100, size=100, action=dbn.Action.TRADE,
                                      side=dbn.Side.BID, flags=0, depth=0, ts_in_delta=0, sequence=k)))  # fmt: skip
    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(out)))
    return n


def percentiles(values: list[float]) -> SimpleNamespace:
    if not values:
        return SimpleNamespace(p50=float("nan"), p95=float("nan"), p99=float("nan"), max=float("nan"), n=0)
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return SimpleNamespace(p50=at(0.50), p95=at(0.95), p99=at(0.99), max=ordered[-1], n=len(ordered))


async def measure(env: dict[str, str], port: int, streams: list[str], args: argparse.Namespace, feed: Any) -> None:
    import msgpack
    import redis.asyncio as aioredis
    import websockets

    os.environ.update({k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL", "CHANNELS_PREFIX")})
    import django

    django.setup()
    from streaming.publish import channel_of, message_frames

    published: dict[tuple[str, int], float] = {}
    redis_latency: list[float] = []
    client = aioredis.Redis.from_url(env["REDIS_URL"])
    pubsub = client.pubsub()
    await pubsub.subscribe(*[channel_of(s) for s in streams])

    async def listen_redis(stop: asyncio.Event) -> None:
        while not stop.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is None:
                continue
            now = time.time() * 1000
            body = msgpack.unpackb(message["data"])
            t = body["t"]
            redis_latency.append(now - t)
            for i in range(len(message_frames(body))):
                published[(body["stream"], body["first"] + i)] = t

    results: list[dict[str, Any]] = []

    async def ws_client(stop: asyncio.Event) -> None:
        received: list[tuple[str, int, float]] = []
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/v1/stream", max_queue=None) as ws:
            await ws.recv()  # welcome
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "streams": streams}))
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.2)
                except TimeoutError:
                    continue
                now = time.time() * 1000
                if '"type":"trade"' not in raw[:20]:
                    continue
                m = json.loads(raw)
                received.append((m["stream"], m["seq"], now))
        results.append({"received": received})

    stop = asyncio.Event()
    tasks = [asyncio.create_task(listen_redis(stop))] + [
        asyncio.create_task(ws_client(stop)) for _ in range(args.clients)
    ]
    await asyncio.sleep(2)  # subscribed everywhere before the feed starts
    feed.start()
    deadline = time.monotonic() + args.seconds + 30
    while feed.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 (a child process, not an event)
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.5)  # the last messages in flight
    stop.set()
    await asyncio.gather(*tasks)
    await pubsub.aclose()
    await client.aclose()

    latencies: list[float] = []
    lost = dup = disorder = 0
    for result in results:
        last: dict[str, int] = {}
        seen: set[tuple[str, int]] = set()
        for stream, seq, now in result["received"]:
            key = (stream, seq)
            if key in seen:
                dup += 1
                continue
            seen.add(key)
            prev = last.get(stream)
            if prev is not None and seq != prev + 1:
                if seq <= prev:
                    disorder += 1
                else:
                    lost += seq - prev - 1
            last[stream] = max(seq, prev or 0)
            t = published.get(key)
            if t is not None:
                latencies.append(now - t)
        lost += sum(1 for key in published if key not in seen)  # every client was subscribed before the feed
    ws = percentiles(latencies)
    base = percentiles(redis_latency)
    print(f"machine: {machine()}")
    print(f"feed: {args.rate} trades/s over {args.symbols} symbols for {args.seconds} s, {args.clients} clients")
    print(f"published messages: {len(published)}; delivered to clients: {ws.n}")
    print(
        f"commit -> WebSocket client (ms): p50 {ws.p50:.1f}  p95 {ws.p95:.1f}  p99 {ws.p99:.1f}  max {ws.max:.1f}"
        f"   target p99 < 50 -> {'met' if ws.p99 < 50 else 'NOT met'}"
    )
    print(
        f"baseline, commit -> plain Redis subscriber (ms): p50 {base.p50:.1f}  p95 {base.p95:.1f}  p99 {base.p99:.1f}"
        f"   ratio gateway/baseline p99 {ws.p99 / base.p99 if base.p99 else float('nan'):.1f}x"
    )
    print(f"lost {lost}, duplicated {dup}, out of order {disorder}")


def main() -> None:
    args = parse_args()
    env = bench_env()
    import psycopg

    admin = env["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=300)
    import redis

    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    symbols = {f"SYM{i:04d}": 10_000 + i for i in range(args.symbols)}
    create = (
        "from marketdata.models import Symbol\n"
        f"Symbol.objects.bulk_create([Symbol(ticker=t, dataset='XNAS.ITCH') for t in {list(symbols)!r}])"
    )
    subprocess.run([sys.executable, "manage.py", "shell", "-c", create], cwd=ROOT, env=env, check=True, timeout=120)
    try:
        gateway: Proc = gateway_start(env, None, ready=listening, timeout=60)
    except GatewayFailed:
        raise SystemExit("the gateway did not start") from None
    port = gateway.port
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "latency.trades.dbn.zst"

            class Feed:
                """The ingester, started once every client is subscribed (times are stamped then)."""

                proc: subprocess.Popen | None = None

                def start(self) -> None:
                    write_trades(path, symbols, args.seconds, args.rate)
                    self.proc = subprocess.Popen(
                        [sys.executable, "manage.py", "ingest", "replay", str(path), "--speed", "1"],
                        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=LOG,
                    )  # fmt: skip

                def poll(self) -> int | None:
                    return None if self.proc is None else self.proc.poll()

            feed = Feed()
            try:
                asyncio.run(measure(env, port, [f"trades:{s}" for s in symbols], args, feed))
            finally:
                if feed.proc is not None and feed.proc.poll() is None:
                    feed.proc.terminate()
                    feed.proc.wait(timeout=30)
    finally:
        gateway.stop(timeout=30)


if __name__ == "__main__":
    main()
