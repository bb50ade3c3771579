"""Benchmark: REST and WebSocket users together under locust, then a spike of 10x users in 10 s.

Run from the repository root::

    .venv/bin/python bench/load.py [--quick] [--users 50] [--seconds 30]

On private servers it starts itself (tests/chaos/servers.py: redis-server and a
PostgreSQL cluster on free loopback ports): the demo data (``manage.py demo_data``, its
history replayed with ``ingest replay --max``, its live session replayed paced with
``ingest replay --speed``, publishing), one gateway process (``python -m
streaming.server``), and locust headless with two user classes in equal numbers:

- ``RestUser`` (locust's FastHttpUser): ``/v1/ohlcv`` pages of a random demo symbol, a
  request every 0.5-1.5 s;
- ``WsUser`` (a custom locust User over ``websocket-client``, which gevent patches, so a
  blocking socket yields): opens ``/ws/v1/stream`` and subscribes with a 100-bar snapshot
  (timed as ``ws subscribe``), then every 0.5-1.5 s a ``ping`` answered by ``pong`` (timed
  as ``ws ping``), reading and seq-checking the stream's bars in between (a gap or
  duplicate is a failure of ``ws seq``).

Run 1: ``--users`` users for ``--seconds``. Run 2 (spike): ``--users`` for a third of
the time, then 10x as many within 10 s, held for the rest. Printed per kind: requests,
p50/p95/p99 (ms, locust's), error rate; the spike's error rate against SPEC's < 1%.
Figures are printed, never asserted (SPEC section 8).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import machine  # noqa: E402

TARGET_ERROR_RATE = 0.01

if __name__ != "__main__" and "locust" in sys.modules:  # loaded by locust as its locustfile
    import json
    import random

    import websocket  # websocket-client
    from locust import FastHttpUser, LoadTestShape, User, between, events, task

    _HOST = os.environ["BENCH_HOST"]
    _SYMBOLS = os.environ["BENCH_SYMBOLS"].split(",")
    _SPIKE = os.environ.get("BENCH_SPIKE")

    def _fire(name: str, started: float, exc: Exception | None = None, length: int = 0) -> None:
        events.request.fire(request_type="WS", name=name, response_time=(time.perf_counter() - started) * 1000,
                            response_length=length, exception=exc, context={})  # fmt: skip

    class RestUser(FastHttpUser):
        """A chart's history: a page of 1m bars of a random demo symbol."""

        wait_time = between(0.5, 1.5)

        @task
        def ohlcv(self) -> None:
            symbol = random.choice(_SYMBOLS)
            with self.client.get(f"/v1/ohlcv?symbol={symbol}&tf=1m&limit=500", name="rest /v1/ohlcv",
                                 catch_response=True) as r:  # fmt: skip
                if r.status_code != 200:
                    r.failure(f"status {r.status_code}")

    class WsUser(User):
        """A live chart: one stream, a snapshot, bars as they come, a ping now and then."""

        wait_time = between(0.5, 1.5)

        def on_start(self) -> None:
            self.ws: websocket.WebSocket | None = None
            self.seq = 0
            self.stream = f"bars:1m:{random.choice(_SYMBOLS)}"
            started = time.perf_counter()
            try:
                self.ws = websocket.create_connection(_HOST.replace("http", "ws") + "/ws/v1/stream", timeout=10)
                self.ws.send(json.dumps({"op": "subscribe", "id": 1, "streams": [self.stream], "snapshot": 100}))
                while True:
                    m = json.loads(self.ws.recv())
                    if m["type"] == "subscribed":
                        self.seq = m["seq"]
                        break
                    if m["type"] == "error":
                        raise RuntimeError(m["code"])
                _fire("ws subscribe", started)
            except Exception as exc:
                _fire("ws subscribe", started, exc)
                self.ws = None

        def on_stop(self) -> None:
            if self.ws is not None:
                self.ws.close()

        def _on(self, m: dict) -> None:
            if m.get("type") == "bar" and m.get("stream") == self.stream:
                seq = m["seq"]
                if self.seq and seq != self.seq + 1:
                    _fire("ws seq", time.perf_counter(), RuntimeError(f"seq {seq} after {self.seq}"))
                self.seq = max(self.seq, seq)
            elif m.get("type") == "resumed" and not m.get("recovered"):
                self.seq = m["seq"]

        @task
        def ping(self) -> None:
            if self.ws is None:
                self.on_start()
                return
            started = time.perf_counter()
            try:
                self.ws.send('{"op":"ping","id":"p"}')
                while True:
                    m = json.loads(self.ws.recv())
                    if m.get("type") == "pong":
                        break
                    self._on(m)
                _fire("ws ping", started)
            except Exception as exc:
                _fire("ws ping", started, exc)
                self.ws = None

    if _SPIKE:

        class Spike(LoadTestShape):
            """``users`` for a third of the run, then 10x within 10 s, held to the end."""

            users, seconds = (int(x) for x in (_SPIKE or "").split(","))

            def tick(self) -> tuple[int, float] | None:
                t = self.get_run_time()
                if t > self.seconds:
                    return None
                if t < self.seconds / 3:
                    return self.users, self.users
                return self.users * 10, self.users * 9 / 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~60 s): 10 users, 20 s per run")
    parser.add_argument("--users", type=int, help="users before the spike, half REST half WebSocket (default 50)")
    parser.add_argument("--seconds", type=int, help="length of each run (default 30; the spike run is 1.5x)")
    args = parser.parse_args()
    args.users = args.users or (10 if args.quick else 50)
    args.seconds = args.seconds or (20 if args.quick else 30)
    if not 2 <= args.users <= 500 or not 10 <= args.seconds <= 3600:
        parser.error("--users 2..500, --seconds 10..3600")
    return args


def run_locust(base: str, symbols: list[str], users: int, seconds: int, spike: bool, workdir: Path, label: str):
    prefix = workdir / label
    env = {**os.environ, "BENCH_HOST": base, "BENCH_SYMBOLS": ",".join(symbols)}
    cmd = [sys.executable, "-m", "locust", "-f", str(Path(__file__).resolve()), "--headless", "--only-summary",
           "--host", base, "--csv", str(prefix), "--loglevel", "WARNING", "--stop-timeout", "5"]  # fmt: skip
    if spike:
        env["BENCH_SPIKE"] = f"{users},{seconds}"
    else:
        cmd += ["-u", str(users), "-r", str(users), "-t", f"{seconds}s"]
    with (workdir / f"locust-{label}.log").open("wb") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + 120,
                       check=False)  # fmt: skip
    with open(f"{prefix}_failures.csv", newline="") as f:
        for row in csv.DictReader(f):
            print(f"  failure: {row['Name']}: {row['Error'][:160]} x{row['Occurrences']}")
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def report(label: str, rows: dict) -> float:
    print(f"{label}:")
    worst = 0.0
    for name, row in rows.items():
        count, failures = int(row["Request Count"]), int(row["Failure Count"])
        rate = failures / count if count else 0.0
        worst = max(worst, rate) if name != "Aggregated" else worst
        print(f"  {name:18} {count:>7,} requests  {float(row['Requests/s']):7.1f}/s  p50 {row['50%']:>5} ms  "
              f"p95 {row['95%']:>5} ms  p99 {row['99%']:>5} ms  errors {failures} ({rate:.2%})")  # fmt: skip
    return worst


def main() -> None:
    args = parse_args()
    from tests.chaos.stack import Stack

    print(f"machine:  {machine()}")
    print("servers:  private redis-server and PostgreSQL 15 (plain, fsync off) on loopback ports, started here")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        workdir = Path(tmp)
        stack = Stack.start(
            "marketdata_bench_load",
            workdir,
            {"API_THROTTLE_PRINCIPAL": "", "API_THROTTLE_IP": "", "DATABASE_POOL_TIMEOUT": "10"},
        )
        try:
            demo = workdir / "demo"
            done = subprocess.run([sys.executable, "manage.py", "demo_data", "--symbols", "10", "--days", "2",
                                   "--out", str(demo)], cwd=ROOT, env=stack.env(), capture_output=True, timeout=300,
                                  check=False)  # fmt: skip
            if done.returncode:
                raise SystemExit("demo_data failed:\n" + done.stderr.decode()[-2000:])
            files = sorted(demo.glob("*.dbn*"))
            history = [f for f in files if "live" not in f.name]
            live = [f for f in files if "live" in f.name]
            loaded = stack.ingest("replay", *map(str, history), "--max", name="history")
            if loaded.wait(300) != 0:
                raise SystemExit("history replay failed:\n" + loaded.log_tail())
            symbols = [r[0] for r in stack.sql("SELECT ticker FROM marketdata_symbol ORDER BY ticker")]
            feed = stack.ingest("replay", *map(str, live), "--speed", "1", "--loop", name="live")
            gateway = stack.gateway("gateway")
            print(f"data:     demo_data, {len(symbols)} symbols, 2 days of 1m history; its live session replayed "
                  "at real speed (--loop), publishing")  # fmt: skip
            print(f"load:     locust, REST and WebSocket users in equal numbers; run 1: {args.users} users for "
                  f"{args.seconds} s; run 2: {args.users} users, then {args.users * 10} within 10 s "
                  f"({args.seconds * 3 // 2} s)")  # fmt: skip
            print()
            report("steady", run_locust(gateway.http, symbols, args.users, args.seconds, False, workdir, "steady"))
            worst = report("spike", run_locust(gateway.http, symbols, args.users, args.seconds * 3 // 2, True,
                                               workdir, "spike"))  # fmt: skip
            print()
            print(f"spike error rate (worst kind) {worst:.2%}: target < {TARGET_ERROR_RATE:.0%} "
                  f"(ratio {worst / TARGET_ERROR_RATE:.2f})")  # fmt: skip
            feed.stop()
        finally:
            stack.close()


if __name__ == "__main__":
    main()
