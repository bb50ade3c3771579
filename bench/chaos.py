"""Benchmark: recovery under load. Kill a gateway, restart Redis, restart PostgreSQL, drop the live feed.

Run from the repository root::

    .venv/bin/python bench/chaos.py [--quick] [--clients 200] [--symbols 50] [--rate 10] [--seconds 20]

Everything runs on private servers this script starts and stops (tests/chaos/servers.py:
a redis-server and a PostgreSQL cluster on free loopback ports, in a temporary
directory), never the machine's shared ones, which other work uses. On them: two gateway
processes (``python -m streaming.server``) and the real ``manage.py ingest``.

For each scenario, fresh symbols and a fresh DBN file of ``--symbols`` x ``--rate`` 1m
bars a second, replayed paced (``ingest replay --speed``) for ``--seconds``, and
``--clients`` WebSocket clients (half on each gateway, each holding one ``bars:1m``
stream, reconnecting to the other gateway with ``resume`` when theirs goes; the client is
tests/chaos/client.py). A third of the way in, the fault:

1. ``kill -9`` of gateway one: its clients reconnect to gateway two and resume;
2. Redis restarted (its data lost): the ingester's publish waits, then goes on; clients
   get a fresh snapshot (seqs never go back);
3. PostgreSQL stopped for ``--down`` s, then started: the ingester holds back, then
   catches up;
4. the live feed dropped: ``ingest live`` against the local stand-in of Databento's live
   gateway (tests/ingest/databento_live.py), which aborts the TCP connection mid-feed;
   the ingester reconnects and fills the gap by intraday replay.

Printed per scenario: clients whole again (the longest outage of a client: from the
fault, or its lost connection, to the next in-order message or ``resumed``), ingester
caught up (from the recovery to the moment the clients hold every bar due by then),
messages lost (bars of the feed missing from a client's chart at the end), duplicated
(seqs or bars delivered twice), gaps, fresh snapshots. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")

from bench import machine  # noqa: E402
from tests.chaos.client import StreamClient  # noqa: E402
from tests.chaos.stack import Proc, Stack  # noqa: E402
from tests.ingest.dbnfile import bar, metadata, write  # noqa: E402

T0 = 1704205800  # 2024-01-02T14:30:00Z: the replayed file's first bar
P = 1_000_000_000
KEY = "db-" + "B" * 24 + "bench"
TARGET_WHOLE_S, TARGET_CAUGHT_UP_S = 10.0, 30.0
MAX_WAIT_S = 120.0  # any one wait of a scenario


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~60 s): 20 clients, 10 symbols, 12 s each")
    parser.add_argument("--clients", type=int, help="WebSocket clients per scenario (default 200)")
    parser.add_argument("--symbols", type=int, help="streams (default 50)")
    parser.add_argument("--rate", type=float, default=10, help="bars a second per symbol (default 10)")
    parser.add_argument("--seconds", type=float, help="feed length per scenario (default 20)")
    parser.add_argument("--down", type=float, default=3.0, help="PostgreSQL and Redis down for this long, s")
    parser.add_argument("--only", help="scenarios to run, e.g. 1,3 (default all)")
    args = parser.parse_args()
    args.clients = args.clients or (20 if args.quick else 200)
    args.symbols = args.symbols or (10 if args.quick else 50)
    args.seconds = args.seconds or (12.0 if args.quick else 20.0)
    args.only = {int(x) for x in (args.only or "1,2,3,4").split(",")}
    if not 1 <= args.symbols <= args.clients <= 2000 or not 1 <= args.rate <= 60 or not 5 <= args.seconds <= 600:
        parser.error("1 <= --symbols <= --clients <= 2000, --rate 1..60, --seconds 5..600")
    return args


@dataclass
class Result:
    name: str
    whole_s: float
    caught_up_s: float | None
    lost: int
    duplicated: int
    gaps: int
    resnapshots: int
    recovered: int
    reconnects: int
    note: str = ""


def iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Scenario:
    """Clients on fresh streams, a paced feed, a fault a third of the way in."""

    def __init__(self, stack: Stack, gateways: dict[str, Proc], args: argparse.Namespace, tag: str, tmp: Path):
        self.stack, self.gateways, self.args, self.tag, self.tmp = stack, gateways, args, tag, tmp
        self.tickers = [f"{tag}{i:03d}" for i in range(args.symbols)]
        self.n = int(args.rate * args.seconds)  # bars per symbol
        self.expected = [iso(T0 + 60 * i) for i in range(self.n)]
        urls = [gateways["one"].ws_url, gateways["two"].ws_url]
        self.clients = [
            StreamClient(urls if i % 2 == 0 else urls[::-1], f"bars:1m:{self.tickers[i % len(self.tickers)]}")
            for i in range(args.clients)
        ]
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Future[Any]] = []
        self.started = 0.0

    def feed_file(self) -> Path:
        ids = {t: 1000 + i for i, t in enumerate(self.tickers)}
        records = [bar(ids[t], T0 + 60 * i, 100 + i % 37, volume=100 + i) for i in range(self.n) for t in self.tickers]
        return write(self.tmp / f"{self.tag}.dbn", metadata(symbols=ids), records)

    async def connect(self) -> None:
        self.stack.symbols_create(self.tickers)
        self.tasks = [asyncio.ensure_future(c.run(self.stop, deadline_s=MAX_WAIT_S * 3)) for c in self.clients]
        await until(lambda: all(c.seq is not None for c in self.clients), "clients subscribed")

    def start_replay(self) -> Proc:
        self.started = time.monotonic()
        return self.stack.ingest("replay", str(self.feed_file()), "--speed", str(60 * self.args.rate), name=self.tag)

    def due(self, at: float) -> int:
        """Bars per symbol the paced feed has sent by ``at`` (monotonic)."""
        return min(self.n, int((at - self.started) * self.args.rate) + 1)

    async def caught_up_after(self, since: float) -> float:
        """Seconds from ``since`` until every client holds every bar due (one bar of slack)."""

        def behind() -> bool:
            due = self.due(time.monotonic()) - 1
            return any(len(c.bars) < min(due, self.n) for c in self.clients)

        await until(lambda: not behind(), "clients caught up")
        return time.monotonic() - since

    async def finish(self) -> None:
        await until(lambda: all(len(c.bars) >= self.n for c in self.clients), "every bar at every client", strict=False)
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def result(self, name: str, whole_s: float, caught_up_s: float | None, note: str = "") -> Result:
        cs = self.clients
        return Result(
            name, whole_s, caught_up_s,
            lost=sum(len(set(self.expected) - set(c.bars)) for c in cs),
            duplicated=sum(c.duplicates + c.duplicate_data for c in cs),
            gaps=sum(c.gaps for c in cs), resnapshots=sum(c.resnapshots for c in cs),
            recovered=sum(c.recovered for c in cs), reconnects=sum(c.connects - 1 for c in cs), note=note,
        )  # fmt: skip

    def longest_outage(self) -> float:
        return max((max(c.outages) for c in self.clients if c.outages), default=0.0)


async def until(predicate: Any, what: str, wait_s: float = MAX_WAIT_S, strict: bool = True) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    if strict:
        raise SystemExit(f"not within {wait_s} s: {what}")
    return False


async def fault_point(s: Scenario) -> None:
    await asyncio.sleep(s.args.seconds / 3)


async def gateway_killed(stack: Stack, gateways: dict[str, Proc], args: argparse.Namespace, tmp: Path) -> Result:
    s = Scenario(stack, gateways, args, "KIL", tmp)
    await s.connect()
    ingester = s.start_replay()
    await fault_point(s)
    gateways["one"].kill9()
    await s.finish()
    ingester.wait(30)
    gateways["one"] = stack.gateway("one")
    return s.result("gateway kill -9", s.longest_outage(), None, "clients of gateway one resume on gateway two")


async def redis_restarted(stack: Stack, gateways: dict[str, Proc], args: argparse.Namespace, tmp: Path) -> Result:
    s = Scenario(stack, gateways, args, "RDS", tmp)
    await s.connect()
    ingester = s.start_replay()
    await fault_point(s)
    for c in s.clients:
        c.mark_lost()
    await asyncio.to_thread(stack.services.redis.restart, args.down)
    back = time.monotonic()
    caught = await s.caught_up_after(back)
    await s.finish()
    code = ingester.wait(30)
    return s.result(f"Redis restart ({args.down:g} s down)", s.longest_outage(), caught,
                    f"ingester exit {code}; outage counted from the restart")  # fmt: skip


async def postgres_restarted(stack: Stack, gateways: dict[str, Proc], args: argparse.Namespace, tmp: Path) -> Result:
    s = Scenario(stack, gateways, args, "PGR", tmp)
    await s.connect()
    ingester = s.start_replay()
    await fault_point(s)
    await asyncio.to_thread(stack.services.pg.stop)
    await asyncio.sleep(args.down)
    await asyncio.to_thread(stack.services.pg.start)
    back = time.monotonic()
    caught = await s.caught_up_after(back)
    await s.finish()
    code = ingester.wait(30)
    stored = len(stack.bars_stored(s.tickers[0]))
    return s.result(f"PostgreSQL restart ({args.down:g} s down)", s.longest_outage(), caught,
                    f"ingester exit {code}; {stored}/{s.n} bars of {s.tickers[0]} stored")  # fmt: skip


async def live_dropped(stack: Stack, gateways: dict[str, Proc], args: argparse.Namespace, tmp: Path) -> Result:
    import databento_dbn as dbn

    from tests.ingest.databento_live import LiveGateway, Plan

    s = Scenario(stack, gateways, args, "LIV", tmp)
    ids = {t: 2000 + i for i, t in enumerate(s.tickers)}
    t0 = time.time_ns() - 3 * 3600 * P
    t0 -= t0 % (60 * P)
    s.expected = [iso((t0 + 60 * P * i) // P) for i in range(s.n)]
    records = []
    for i in range(s.n):
        for iid in ids.values():
            records.append(dbn.OHLCVMsg(rtype=int(dbn.RType.OHLCV_1M), publisher_id=2, instrument_id=iid,
                                        ts_event=t0 + 60 * P * i, open=100 * P, high=101 * P, low=99 * P,
                                        close=100 * P, volume=100 + i))  # fmt: skip
    await s.connect()
    pace = 1 / (args.rate * args.symbols)
    drop = len(records) // 3 + args.symbols // 2  # mid-minute: some symbols have the bar, some not
    with LiveGateway(keys=[KEY], symbols=ids, records=records, dataset="XNAS.ITCH",
                     plans=[Plan(drop_after=drop)], heartbeat_s=1.0, pace_s=pace) as lsg:  # fmt: skip
        start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=t0 // 1000)
        s.started = time.monotonic()
        ingester = stack.ingest(
            "live", "--dataset", "XNAS.ITCH", "--schema", "ohlcv-1m", "--symbols", ",".join(s.tickers),
            "--start", start.isoformat(), "--gateway", lsg.address, extra={"DATABENTO_API_KEY": KEY}, name="LIV",
        )  # fmt: skip
        await until(lambda: bool(lsg.connections) and lsg.connections[0].done.is_set(), "the drop")
        dropped = time.monotonic()
        for c in s.clients:
            c.mark_lost()
        await until(lambda: len(lsg.connections) >= 2 and lsg.connections[1].started, "the reconnect")
        reconnected = time.monotonic() - dropped
        sent_before = len(lsg.connections[0].sent) // args.symbols
        await until(lambda: all(len(c.bars) >= sent_before for c in s.clients), "the gap filled")
        filled = time.monotonic() - dropped
        await s.finish()
        code = ingester.stop()
    return s.result("live feed dropped", s.longest_outage(), filled,
                    f"reconnected after {reconnected:.2f} s (backoff); ingester exit {code}")  # fmt: skip


SCENARIOS = {1: gateway_killed, 2: redis_restarted, 3: postgres_restarted, 4: live_dropped}


async def run(args: argparse.Namespace, stack: Stack, tmp: Path) -> list[Result]:
    gateways = {"one": stack.gateway("one"), "two": stack.gateway("two")}
    results = []
    for number, scenario in SCENARIOS.items():
        if number in args.only:
            started = time.monotonic()
            result = await scenario(stack, gateways, args, tmp)
            print(line(result), f"  [{time.monotonic() - started:.0f} s]", flush=True)
            results.append(result)
    return results


def line(r: Result) -> str:
    caught = f"{r.caught_up_s:6.2f} s" if r.caught_up_s is not None else "     - "
    return (
        f"{r.name:32} whole again {r.whole_s:6.2f} s  caught up {caught}  lost {r.lost}  duplicated {r.duplicated}"
        f"  gaps {r.gaps}  fresh snapshots {r.resnapshots}  resumed {r.recovered}  reconnects {r.reconnects}"
        f"  ({r.note})"
    )


def main() -> None:
    args = parse_args()
    print(f"machine:  {machine()}")
    print("servers:  private redis-server and PostgreSQL 15 (plain, fsync off) on loopback ports, started here")
    print(f"layout:   2 gateway processes, 1 ingester process, {args.clients} WebSocket clients in this process")
    delivered = args.clients * args.rate
    print(f"load:     {args.symbols} streams x {args.rate:g} bars/s, {args.clients} clients "
          f"(~{delivered:,.0f} msg/s delivered), {args.seconds:g} s per scenario; fault at 1/3")  # fmt: skip
    print()
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        stack = Stack.start("marketdata_bench_chaos", Path(tmp))
        try:
            results = asyncio.run(run(args, stack, Path(tmp)))
        finally:
            stack.close()
    print()
    worst_whole = max(r.whole_s for r in results)
    worst_caught = max((r.caught_up_s for r in results if r.caught_up_s is not None), default=0.0)
    print(f"target (SPEC section 8): clients whole again < {TARGET_WHOLE_S:g} s (worst {worst_whole:.2f} s, "
          f"ratio {worst_whole / TARGET_WHOLE_S:.2f}); ingester caught up < {TARGET_CAUGHT_UP_S:g} s (worst "
          f"{worst_caught:.2f} s, ratio {worst_caught / TARGET_CAUGHT_UP_S:.2f}); 0 lost (total "
          f"{sum(r.lost for r in results)}), 0 duplicated (total {sum(r.duplicated for r in results)})")  # fmt: skip
    print("baseline: the seed's chaos goal, recovery < 30 s")


if __name__ == "__main__":
    main()
