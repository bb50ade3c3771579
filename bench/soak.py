"""Benchmark: a bounded soak at half the fan-out target; RSS of gateway and ingester at start and end, errors.

Run from the repository root::

    .venv/bin/python bench/soak.py [--minutes 10] [--quick] [--clients 250] [--symbols 25] [--rate 20]

On private servers it starts itself (tests/chaos/servers.py: redis-server and a
PostgreSQL cluster on free loopback ports, never the machine's shared ones): one gateway
process (``python -m streaming.server``), the real ``manage.py ingest replay --speed``
of a DBN file of ``--symbols`` x ``--rate`` 1m bars a second for the whole run (a paced
replay is the live-like feed; ``--loop`` is not used because each looped pass waits for
the next minute edge of the wall clock before it starts, which would stall the rate), and
``--clients`` WebSocket clients in this process, ``clients / symbols`` on each
``bars:1m`` stream, every seq checked (tests/chaos/client.py). Default: 250 clients x
20 msg/s = 5,000 msg/s delivered, half of SPEC's 10,000.

Printed: the machine, RSS (VmRSS) of the gateway and the ingester after the warm-up and
at the end with the growth (target < 5%), delivered msg/s, and errors: seq gaps and
duplicates, reconnects, error frames, slow-consumer closes, the ingester's exit code.
Figures are printed, never asserted (SPEC section 8).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
import urllib.request
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")

from bench import machine  # noqa: E402
from tests.chaos.client import StreamClient  # noqa: E402
from tests.chaos.stack import Proc, Stack  # noqa: E402
from tests.ingest.dbnfile import bar, metadata, write  # noqa: E402

T0 = 1704205800  # 2024-01-02T14:30:00Z
TARGET_GROWTH = 0.05
FANOUT_TARGET = 10_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="length of the soak (default 10)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 minute, 50 clients on 10 symbols")
    parser.add_argument("--clients", type=int, help="WebSocket clients (default 250)")
    parser.add_argument("--symbols", type=int, help="streams (default 25)")
    parser.add_argument("--rate", type=float, default=20, help="bars a second per stream (default 20)")
    parser.add_argument("--warmup", type=float, default=15, help="seconds before the first RSS reading (default 15)")
    args = parser.parse_args()
    if args.quick:
        args.minutes = 1.0
    args.clients = args.clients or (50 if args.quick else 250)
    args.symbols = args.symbols or (10 if args.quick else 25)
    if not 0.5 <= args.minutes <= 24 * 60 or not 1 <= args.symbols <= args.clients <= 5000 or not 1 <= args.rate <= 60:
        parser.error("--minutes 0.5..1440, 1 <= --symbols <= --clients <= 5000, --rate 1..60")
    return args


def feed_file(tmp: Path, tickers: list[str], n: int) -> Path:
    ids = {t: 3000 + i for i, t in enumerate(tickers)}
    days = n // 1440 + 2
    header = metadata(symbols=ids, start=date(2024, 1, 2), end=date(2024, 1, 2) + timedelta(days=days))
    records = [bar(ids[t], T0 + 60 * i, 100 + i % 37, volume=100 + i % 1000) for i in range(n) for t in tickers]
    return write(tmp / "soak.dbn", header, records)


def metric(gateway: Proc, name: str) -> float:
    try:
        with urllib.request.urlopen(gateway.http + "/metrics", timeout=5) as r:  # noqa: S310 (loopback)
            text = r.read().decode()
    except OSError:
        return float("nan")
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def soak(args: argparse.Namespace, stack: Stack, tmp: Path) -> None:
    tickers = [f"SOAK{i:03d}" for i in range(args.symbols)]
    seconds = args.minutes * 60
    n = int(args.rate * (seconds + args.warmup + 30))  # enough feed for the whole run
    path = feed_file(tmp, tickers, n)
    stack.symbols_create(tickers)
    gateway = stack.gateway("gateway")
    clients = [StreamClient([gateway.ws_url], f"bars:1m:{tickers[i % len(tickers)]}") for i in range(args.clients)]
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(c.run(stop, deadline_s=seconds + args.warmup + 120)) for c in clients]
    deadline = time.monotonic() + 60
    while not all(c.seq is not None for c in clients) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    ingester = stack.ingest("replay", str(path), "--speed", str(60 * args.rate), name="ingester")
    await asyncio.sleep(args.warmup)
    rss0 = gateway.rss_kib(), ingester.rss_kib()
    count0, t0 = sum(c.messages for c in clients), time.monotonic()
    print(f"after {args.warmup:g} s warm-up: gateway RSS {rss0[0] / 1024:.1f} MiB, ingester RSS "
          f"{rss0[1] / 1024:.1f} MiB", flush=True)  # fmt: skip
    end = t0 + seconds
    step = max(10.0, seconds / 10)
    while time.monotonic() < end and ingester.alive() and gateway.alive():
        await asyncio.sleep(min(step, max(0.0, end - time.monotonic())))
        elapsed = time.monotonic() - t0
        rate = (sum(c.messages for c in clients) - count0) / elapsed if elapsed else 0.0
        print(f"  {elapsed:6.0f} s  {rate:8,.0f} msg/s delivered  gateway {gateway.rss_kib() / 1024:6.1f} MiB  "
              f"ingester {ingester.rss_kib() / 1024:6.1f} MiB", flush=True)  # fmt: skip
    elapsed = time.monotonic() - t0
    delivered = sum(c.messages for c in clients) - count0
    rss1 = gateway.rss_kib(), ingester.rss_kib()
    slow = metric(gateway, 'ws_closes_total{code="4008"}')
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    alive = ingester.alive()
    code = ingester.stop(timeout=30)
    gateway_ok = gateway.alive()
    print()
    for name, before, after in (("gateway", rss0[0], rss1[0]), ("ingester", rss0[1], rss1[1])):
        growth = (after - before) / before if before else float("nan")
        print(f"RSS {name:9} start {before / 1024:7.1f} MiB  end {after / 1024:7.1f} MiB  growth {growth:+.1%}  "
              f"(target < {TARGET_GROWTH:.0%}, ratio {abs(growth) / TARGET_GROWTH:.2f})")  # fmt: skip
    rate = delivered / elapsed if elapsed else 0.0
    asked = args.clients * args.rate
    print(f"delivered {delivered:,} messages in {elapsed:.0f} s: {rate:,.0f} msg/s (asked {asked:,.0f};"
          f" half the fan-out target is {FANOUT_TARGET // 2:,}, ratio {rate / (FANOUT_TARGET / 2):.2f})")  # fmt: skip
    errors = {
        "seq gaps": sum(c.gaps for c in clients),
        "seq duplicates": sum(c.duplicates for c in clients),
        "fresh snapshots": sum(c.resnapshots for c in clients),
        "reconnects": sum(c.connects - 1 for c in clients),
        "error frames": sum(1 for c in clients for e in c.errors if e.startswith("error frame")),
        "slow-consumer closes (4008)": int(slow) if slow == slow else -1,
        "ingester died": int(not alive),
        "gateway died": int(not gateway_ok),
    }
    print("errors: " + ", ".join(f"{k} {v}" for k, v in errors.items()) + f" (total {sum(errors.values())}; "
          f"target 0); ingester exit {code} after SIGTERM")  # fmt: skip


def main() -> None:
    args = parse_args()
    print(f"machine:  {machine()}")
    print("servers:  private redis-server and PostgreSQL 15 (plain, fsync off) on loopback ports, started here")
    print(f"load:     {args.clients} WebSocket clients (this process) on {args.symbols} bars:1m streams, "
          f"{args.rate:g} bars/s each: ~{args.clients * args.rate:,.0f} msg/s; 1 gateway, 1 ingester "
          f"(ingest replay --speed {60 * args.rate:g}); {args.minutes:g} min")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        stack = Stack.start("marketdata_bench_soak", Path(tmp))
        try:
            asyncio.run(soak(args, stack, Path(tmp)))
        finally:
            stack.close()


if __name__ == "__main__":
    main()
