"""Benchmark: 1m bars through ``marketdata.services.bars_trades.bars_upsert`` beside a plain COPY.

Run from the repository root::

    .venv/bin/python bench/upsert.py [--rows 1000000] [--batch 1000] [--symbols 100]

It works in a database of its own, ``marketdata_bench`` on the server named by the
settings (created on first use through the ``postgres`` maintenance database, migrated
with ``migrate``, emptied before each run), so it never touches the development
database. All rows are generated before any clock starts; then, in one run:

1. baseline: one binary COPY of the same rows, from the same Python tuples, into a
   freshly created logged (not UNLOGGED) table with the same columns and defaults, no
   index; three times, the median printed;
2. upsert: every row through ``bars_upsert`` in ``--batch``-row batches into an empty
   ``marketdata_bar``;
3. re-upsert: the same batches again; every row is a duplicate and must stay untouched.

It prints rows/s for each, the ratio upsert/baseline, and the machine. Figures are
printed, never asserted (SPEC section 8); the counts are checked, so a wrong upsert
fails loudly instead of looking fast.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

BENCH_DB = "marketdata_bench"
BASELINE_TABLE = "bench_copy_baseline"
DATASET = "XNAS.ITCH"
# Extended US equity hours in January (EST): 04:00-20:00 ET = 09:00-01:00 UTC, 960 minutes
# a weekday, so about 40% of the bars fall in regular hours (the partial index's range).
SESSION_START_UTC = timedelta(hours=9)
SESSION_MINUTES = 960
FIRST_DAY = datetime(2024, 1, 2, tzinfo=UTC)
MAX_ROWS = 50_000_000  # the rows are generated in memory (~400 bytes each)
LOCK_KEY = 0x62656E6368  # pg advisory lock: one run at a time in BENCH_DB ("bench")
LOCK_WAIT_S = 900
BASELINE_RUNS = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="bars to write (default 1,000,000)")
    parser.add_argument("--batch", type=int, default=1000, help="bars per bars_upsert call (default 1000)")
    parser.add_argument("--symbols", type=int, default=100, help="distinct symbols, 1..5000 (default 100)")
    parser.add_argument("--seed", type=int, default=20240102, help="random seed for prices and volumes")
    args = parser.parse_args()
    if not 1 <= args.rows <= MAX_ROWS:
        parser.error(f"--rows must be within 1..{MAX_ROWS:,}")
    if not 1 <= args.batch <= args.rows:
        parser.error("--batch must be within 1..--rows")
    if not 1 <= args.symbols <= 5000:
        parser.error("--symbols must be within 1..5000")
    return args


def point_django_at_bench_db() -> dict:
    """Configure Django on BENCH_DB before any connection exists; return its settings dict."""
    import django
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["NAME"] == BENCH_DB:
        raise SystemExit(f"the settings already name {BENCH_DB}; point them at the usual database")
    db["NAME"] = BENCH_DB
    django.setup()
    from django.db import connection

    # The guard that this benchmark never writes to the development database.
    assert connection.settings_dict["NAME"] == BENCH_DB, connection.settings_dict["NAME"]
    return db


def create_bench_db(db: dict) -> None:
    """Create BENCH_DB through the maintenance database when it does not exist yet."""
    import psycopg
    from psycopg import sql

    params: dict[str, Any] = {
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "dbname": "postgres",
    }
    with psycopg.connect(**{k: v for k, v in params.items() if v is not None}, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))


def make_bars(n_rows: int, n_symbols: int, symbol_ids: list[int], seed: int) -> list:
    """1m bars as a live feed emits them: every symbol's bar for a minute, then the next minute.

    Prices are random walks in Databento fixed-point (1e-9); consecutive weekdays'
    extended sessions give the timestamps.
    """
    from marketdata.services.bars_trades import BarIn

    rng = random.Random(seed)
    prices = [rng.randint(5_000, 500_000) * 10_000_000 for _ in range(n_symbols)]  # $0.50 .. $50.00 x 10
    bars: list[BarIn] = []
    day = FIRST_DAY
    minute = 0
    while len(bars) < n_rows:
        if minute == SESSION_MINUTES:
            minute = 0
            day += timedelta(days=1)
        if day.weekday() >= 5:
            day += timedelta(days=7 - day.weekday())
        start = day + SESSION_START_UTC + timedelta(minutes=minute)
        minute += 1
        for i in range(min(n_symbols, n_rows - len(bars))):
            ts = start.replace()  # an object of its own, as a decoder makes (hashes are not shared)
            open_ = prices[i]
            close = max(10_000_000, open_ + rng.randint(-200, 200) * 1_000_000)
            high = max(open_, close) + rng.randint(0, 50) * 1_000_000
            low = max(1_000_000, min(open_, close) - rng.randint(0, 50) * 1_000_000)
            prices[i] = close
            bars.append(BarIn(symbol_ids[i], "1m", ts, 1, open_, high, low, close, rng.randint(100, 250_000)))
    return bars


def lock_bench_db() -> None:
    """Hold a session lock so two runs (say, two `make bench`) neither mix rows nor share the CPU."""
    from django.db import connection

    deadline = time.monotonic() + LOCK_WAIT_S
    with connection.cursor() as cursor:
        while True:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
            if cursor.fetchone()[0]:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"another bench/upsert.py run held {BENCH_DB} for {LOCK_WAIT_S} s; giving up")
            print(f"waiting for another bench/upsert.py run on {BENCH_DB} to finish ...", flush=True)
            time.sleep(5)


def reset_tables(symbol_count: int) -> list[int]:
    """Empty the bench database's bars and baseline table; make sure the symbols exist."""
    from django.db import connection

    from marketdata.models import Symbol

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE marketdata_bar")
        cursor.execute(f"DROP TABLE IF EXISTS {BASELINE_TABLE}")
    tickers = [f"BENCH{i:04d}" for i in range(symbol_count)]
    Symbol.objects.bulk_create(
        [Symbol(ticker=t, dataset=DATASET, description="bench/upsert.py") for t in tickers], ignore_conflicts=True
    )
    ids = dict(Symbol.objects.filter(ticker__in=tickers).values_list("ticker", "id"))
    return [ids[t] for t in tickers]


def checkpoint() -> None:
    """Flush dirty pages so one phase's checkpoint does not land in the next one's timing."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CHECKPOINT")


def run_baseline(bars: list) -> float:
    """One binary COPY of every row into a new unindexed table, committed; seconds."""
    from django.db import connection, transaction

    from marketdata.services.bars_trades import BAR_COLUMNS, BAR_TYPES

    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {BASELINE_TABLE}")
        # Same columns, types, NOT NULL and defaults as the target; no key, no index; and
        # ingested_at defaulting to now(), not the target's volatile clock_timestamp(), so
        # the baseline COPY keeps PostgreSQL's multi-insert path (the fastest there is).
        cursor.execute(f"CREATE TABLE {BASELINE_TABLE} (LIKE marketdata_bar INCLUDING DEFAULTS)")
        cursor.execute(f"ALTER TABLE {BASELINE_TABLE} ALTER COLUMN ingested_at SET DEFAULT now()")
    checkpoint()
    started = time.perf_counter()
    with transaction.atomic(), connection.cursor() as cursor:
        statement = f"COPY {BASELINE_TABLE} ({', '.join(BAR_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
        with cursor.cursor.copy(statement) as copy:
            copy.set_types(BAR_TYPES)
            for row in bars:
                copy.write_row(row)
    elapsed = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {BASELINE_TABLE}")
        (count,) = cursor.fetchone()
        cursor.execute(f"DROP TABLE {BASELINE_TABLE}")
    if count != len(bars):
        raise SystemExit(f"baseline COPY stored {count} rows, expected {len(bars)}")
    return elapsed


class OtherLoad:
    """How much of the machine's CPU other processes took while a phase ran (Linux, local server only).

    Everything but this process and its database backend; the machine is shared, so a
    figure measured beside a busy neighbour says so.
    """

    def __init__(self, backend_pid: int | None) -> None:
        self.backend_pid = backend_pid
        self.start: tuple[float, float, float] | None = None
        self.share: float | None = None

    def _sample(self) -> tuple[float, float, float] | None:
        if self.backend_pid is None:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat", encoding="ascii") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            with open(f"/proc/{self.backend_pid}/stat", encoding="ascii", errors="replace") as f:
                backend = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError, ValueError):
            return None
        busy = (sum(cpu) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
        ours = (int(backend[11]) + int(backend[12])) / tick + sum(os.times()[:2])
        return busy, ours, time.monotonic()

    def __enter__(self) -> OtherLoad:
        self.start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        if self.start is not None and end is not None and end[2] > self.start[2]:
            others = (end[0] - self.start[0]) - (end[1] - self.start[1])
            self.share = max(0.0, others / ((end[2] - self.start[2]) * (os.cpu_count() or 1)))

    def __str__(self) -> str:
        return "n/a" if self.share is None else f"{self.share:.0%}"


def backend_pid() -> int | None:
    """The benchmark connection's server process, when the server runs on this machine."""
    from django.db import connection

    if connection.settings_dict.get("HOST") not in ("", None, "127.0.0.1", "localhost", "::1"):
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def run_upsert(bars: list, batch: int) -> tuple[float, int, int, int]:
    """Every row through bars_upsert in batches; seconds and summed inserted/updated/unchanged."""
    from marketdata.services.bars_trades import bars_upsert

    inserted = updated = unchanged = 0
    started = time.perf_counter()
    for start in range(0, len(bars), batch):
        result = bars_upsert(bars=bars[start : start + batch])
        inserted += result.inserted
        updated += result.updated
        unchanged += result.unchanged
    return time.perf_counter() - started, inserted, updated, unchanged


def machine() -> dict[str, str]:
    from django.db import connection

    from bench import cpu_model
    from marketdata.storage import timescaledb_enabled

    model = cpu_model()
    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        (pg_version,) = cursor.fetchone()
        settings = {}
        for name in ("synchronous_commit", "fsync", "wal_level", "shared_buffers"):
            cursor.execute(f"SHOW {name}")
            settings[name] = cursor.fetchone()[0]
    import psycopg

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": f"{os.cpu_count()} ({usable} usable by this process)",
        "cpu": model,
        "postgresql": pg_version,
        "server settings": ", ".join(f"{k}={v}" for k, v in settings.items()),
        "storage path": "TimescaleDB" if timescaledb_enabled() else "plain PostgreSQL",
        "python": f"{platform.python_version()}, psycopg {psycopg.__version__} ({psycopg.pq.__impl__})",
    }


def main() -> None:
    args = parse_args()
    db = point_django_at_bench_db()
    create_bench_db(db)

    from django.core.management import call_command

    lock_bench_db()
    call_command("migrate", verbosity=0, interactive=False)
    symbol_ids = reset_tables(args.symbols)

    t0 = time.perf_counter()
    bars = make_bars(args.rows, args.symbols, symbol_ids, args.seed)
    print(
        f"generated {len(bars):,} 1m bars, {args.symbols} symbols, "
        f"{bars[0].ts:%Y-%m-%d %H:%M} .. {bars[-1].ts:%Y-%m-%d %H:%M} UTC in {time.perf_counter() - t0:.1f} s"
    )
    print(f"database: {BENCH_DB} (emptied before this run)")
    for key, value in machine().items():
        print(f"{key + ':':17} {value}")
    print()

    n = len(bars)
    # The baseline is short (about a second) and so the noisiest figure: median of three.
    baseline_rates = sorted(n / run_baseline(bars) for _ in range(BASELINE_RUNS))
    baseline_rate = statistics.median(baseline_rates)
    print(
        f"baseline   one binary COPY, {n:,} rows, logged table without index: "
        f"{baseline_rate:>10,.0f} rows/s (median of {BASELINE_RUNS}: "
        f"{', '.join(f'{r:,.0f}' for r in baseline_rates)})"
    )

    pid = backend_pid()
    checkpoint()
    with OtherLoad(pid) as load:
        upsert_s, inserted, updated, unchanged = run_upsert(bars, args.batch)
    if (inserted, updated, unchanged) != (n, 0, 0):
        raise SystemExit(f"upsert into an empty table: inserted={inserted} updated={updated} unchanged={unchanged}")
    upsert_rate = n / upsert_s
    print(
        f"upsert     bars_upsert, {args.batch:,}-row batches, empty table:      "
        f"{upsert_rate:>10,.0f} rows/s ({upsert_s:.2f} s; other processes took {load} of the CPU)"
    )

    checkpoint()
    with OtherLoad(pid) as load:
        again_s, inserted, updated, unchanged = run_upsert(bars, args.batch)
    if (inserted, updated, unchanged) != (0, 0, n):
        raise SystemExit(f"re-upsert of identical bars: inserted={inserted} updated={updated} unchanged={unchanged}")
    print(
        f"re-upsert  bars_upsert, same batches, all duplicates (untouched): "
        f"{n / again_s:>10,.0f} rows/s ({again_s:.2f} s; other processes took {load} of the CPU)"
    )
    print()
    print(f"ratio upsert/baseline: {upsert_rate / baseline_rate:.2f}")
    print("target (SPEC section 8): >= 150,000 bars/s on a 2-core machine")


if __name__ == "__main__":
    main()
