"""Benchmark: a bounded soak at half the fan-out target; RSS of gateway and ingester over the run, errors.

Run from the repository root::

    .venv/bin/python bench/soak.py [--minutes 10] [--quick] [--clients 250] [--symbols 25] [--rate 20]
                                   [--warmup 15] [--every 10]

On private servers it starts itself (tests/chaos/servers.py: redis-server and a
PostgreSQL cluster on free loopback ports, never the machine's shared ones): one gateway
process (``python -m streaming.server``), the real ``manage.py ingest replay --speed``
of a DBN file of ``--symbols`` x ``--rate`` 1m bars a second for the whole run (a paced
replay is the live-like feed; ``--loop`` is not used because each looped pass waits for
the next minute edge of the wall clock before it starts, which would stall the rate), and
``--clients`` WebSocket clients in this process, ``clients / symbols`` on each
``bars:1m`` stream, every seq checked (tests/chaos/client.py). Default: 250 clients x
20 msg/s = 5,000 msg/s delivered, half of SPEC's 10,000.

Printed: the machine; a table of the RSS (VmRSS) of the gateway and the ingester at the
start (after the warm-up), every ``--every`` minutes of the soak after it while the run is
longer (so ``--minutes 60`` reads at start, 10, 20, 30, 40 and 50 minutes and at the
end), and at the end; the growth from the start reading to the end one (target < 5%;
the readings between are shown to see a trend, not used in it); delivered msg/s; and
errors: seq gaps and duplicates, reconnects, error frames, slow-consumer closes, the
ingester's exit code (target 0). Figures are printed, never asserted (SPEC section 8).
The run is bounded: the soak ends after ``--minutes`` (or when the gateway or the
ingester dies), every client gives up at ``--minutes`` + warm-up + 2 minutes, and the
ingester is stopped with SIGTERM, then SIGKILL after 30 s.

Options:

- ``--minutes M``: length of the soak after the warm-up (default 10; 0.5..1440).
- ``--quick``: smoke run: 1 minute, 50 clients on 10 symbols.
- ``--clients N``: WebSocket clients (default 250).
- ``--symbols N``: streams (default 25).
- ``--rate R``: bars a second per stream (default 20).
- ``--warmup S``: seconds before the start reading (default 15).
- ``--every M``: minutes between RSS readings from the start one (default 10).
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
    parser.add_argument(
        "--every", type=float, default=10, help="minutes between RSS readings from the start one (default 10)"
    )
    args = parser.parse_args()
    if args.quick:
        args.minutes = 1.0
    args.clients = args.clients or (50 if args.quick else 250)
    args.symbols = args.symbols or (10 if args.quick else 25)
    if not 0.5 <= args.minutes <= 24 * 60 or not 1 <= args.symbols <= args.clients <= 5000 or not 1 <= args.rate <= 60:
        parser.error("--minutes 0.5..1440, 1 <= --symbols <= --clients <= 5000, --rate 1..60")
    if not 0.1 <= args.every <= 24 * 60:
        parser.error("--every 0.1..1440")
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
    # RSS readings: the start one above, one every --every minutes of the soak (10, 20, ...
    # while shorter than the run), and the end one below. Progress lines between them.
    every = args.every * 60
    marks = [every * k for k in range(1, int(seconds // every) + 1) if every * k < seconds - 1]
    step = max(10.0, seconds / 10)
    wakes = sorted({*(step * k for k in range(1, int(seconds // step) + 1)), *marks, seconds})
    readings: list[tuple[str, float, int, int]] = [("start", 0.0, rss0[0], rss0[1])]
    for at in wakes:
        if not (ingester.alive() and gateway.alive()):
            break
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        elapsed = time.monotonic() - t0
        rss = gateway.rss_kib(), ingester.rss_kib()
        rate = (sum(c.messages for c in clients) - count0) / elapsed if elapsed else 0.0
        print(f"  {elapsed:6.0f} s  {rate:8,.0f} msg/s delivered  gateway {rss[0] / 1024:6.1f} MiB  "
              f"ingester {rss[1] / 1024:6.1f} MiB", flush=True)  # fmt: skip
        if at in marks:
            readings.append((f"{at / 60:g} min", elapsed, rss[0], rss[1]))
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
    readings.append(("end", elapsed, rss1[0], rss1[1]))
    print(rss_table(readings, args.warmup))
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


def rss_table(readings: list[tuple[str, float, int, int]], warmup: float) -> str:
    """RSS of gateway and ingester at each reading, then the growth from start to end (the target's)."""

    def when(label: str, at: float) -> str:
        return f"start (after the {warmup:g} s warm-up)" if label == "start" else f"{label} (at {at:,.0f} s)"

    width = max(len(when(label, at)) for label, at, _, _ in readings)
    lines = [f"{'RSS':{width}} {'gateway':>12} {'ingester':>12}"]
    for label, at, gateway, ingester in readings:
        lines.append(f"{when(label, at):{width}} {gateway / 1024:8.1f} MiB {ingester / 1024:8.1f} MiB")
    (_, _, gateway0, ingester0), (_, _, gateway1, ingester1) = readings[0], readings[-1]
    growth = [(after - before) / before if before else float("nan") for before, after in
              ((gateway0, gateway1), (ingester0, ingester1))]  # fmt: skip
    lines.append(
        f"{'growth, start -> end':{width}} {growth[0]:+12.1%} {growth[1]:+12.1%}   (target < {TARGET_GROWTH:.0%}; "
        f"ratio {abs(growth[0]) / TARGET_GROWTH:.2f} and {abs(growth[1]) / TARGET_GROWTH:.2f}; "
        "the readings between are shown, not part of it)"
    )
    return "\n".join(lines)


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
