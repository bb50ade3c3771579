"""Benchmark: ``ingest replay --max`` of 1,000,000 ohlcv-1m bars and 1,000,000 trades.

Run from the repository root::

    .venv/bin/python bench/ingest.py [--records 1000000] [--symbols 50] [--no-publish]
                                     [--publisher process|thread] [--paths plain,timescaledb]

It writes two DBN files with databento_dbn's encoder (read as real files are),
then runs the real command, ``python manage.py ingest replay FILE --max``, in a child
process against a database of its own (``marketdata_bench_ingest``, created and migrated
here, emptied before each run) and Redis database 14, so it never touches the development
data. Decode, normalise, upsert, derive and publish are all inside the timing. Beside it,
in the same run and on the same server, the baseline: a plain binary COPY of the same rows
into an unindexed table. Figures are printed, never asserted (SPEC section 8); the stored
row counts are checked so that a wrong run fails loudly instead of looking fast.

It runs on both storage paths, one after the other, with the same files: plain PostgreSQL
on the server DATABASE_URL names, and TimescaleDB on the server TIMESCALEDB_DATABASE_URL
names (default ``postgres://root@127.0.0.1:5433/marketdata``, the cluster
scripts/timescaledb.sh makes), each in a ``marketdata_bench_ingest`` of its own there,
migrated the same way, so the bars and trades are hypertables on the second. After each
ingest it checks the table it wrote: a hypertable (its chunks are printed) on TimescaleDB,
a plain table in a database without the extension on plain PostgreSQL; a run on the wrong
path exits. Where the TimescaleDB server does not answer or has no extension, that path is
skipped with one line saying why. At the end a table puts each path's figures side by
side, each with its own COPY baseline (on that path's server) and ratio.

Options:

- ``--records N``: bars, and trades, to ingest (default 1,000,000; 1,000..20,000,000).
- ``--symbols N``: distinct symbols (default 50).
- ``--no-publish``: store only (publish is on by default).
- ``--publisher process|thread``: where the ingester derives and publishes
  (INGEST_PUBLISH_PROCESS; default ``process``, as deployed).
- ``--paths plain,timescaledb``: the storage paths to run, in that order (default both).
- ``--timeout S``: give up on one ingest (killed, the run exits non-zero) after this many
  seconds (default 1800).

It also prints the CPU each record cost the ingester (with its publisher process,
``--publisher process``, the deployed default; ``thread`` for the ingester as one
process), PostgreSQL and Redis, and how busy that kept the cores: the figures that say
where a machine's time went. PostgreSQL's and Redis's are their whole processes' (every
PostgreSQL cluster of the machine: both paths' servers), so keep the machine otherwise
quiet.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# First on the path, so `ingest` is the project's package and never this file.
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    STORAGE_PATHS,
    add_paths_argument,
    machine,
    side_by_side,
    storage_check,
    storage_unavailable,
)
from bench import bench_env as common_env  # noqa: E402

BENCH_DB = "marketdata_bench_ingest"
BENCH_REDIS_DB = 14
NS = 1_000_000_000
TICK = 10_000_000  # $0.01 in fixed point
T0 = int(datetime(2024, 1, 2, 14, 30, tzinfo=UTC).timestamp())
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="bars, and trades, to ingest")
    parser.add_argument("--symbols", type=int, default=50, help="distinct symbols (default 50)")
    parser.add_argument("--no-publish", action="store_true", help="store only (publish is on by default)")
    parser.add_argument(
        "--publisher", choices=["process", "thread"], default="process",
        help="where the ingester derives and publishes (INGEST_PUBLISH_PROCESS; default: process, as deployed)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=int, default=1800, help="give up on one ingest after this many seconds")
    add_paths_argument(parser)
    args = parser.parse_args()
    if not 1_000 <= args.records <= 20_000_000:
        parser.error("--records must be within 1,000..20,000,000")
    if not 1 <= args.symbols <= 5000:
        parser.error("--symbols must be within 1..5000")
    return args


def metadata(schema: Any, symbols: dict[str, int]) -> bytes:
    import databento_dbn as dbn

    day = datetime(2024, 1, 1).date()
    end = datetime(2025, 1, 1).date()
    mappings = [
        SimpleNamespace(raw_symbol=s, intervals=[SimpleNamespace(start_date=day, end_date=end, symbol=str(i))])
        for s, i in symbols.items()
    ]
    return dbn.Metadata(
        dataset="XNAS.ITCH", schema=schema, start=T0 * NS, stype_in=dbn.SType.RAW_SYMBOL,
        stype_out=dbn.SType.INSTRUMENT_ID, symbols=list(symbols), partial=[], not_found=[], mappings=mappings,
        end=None, limit=None, ts_out=False, version=3,
    ).encode()  # fmt: skip


def write_files(out: Path, n: int, n_symbols: int) -> tuple[Path, Path, list[tuple], list[tuple]]:
    """The bar and trade files, and the same rows as COPY tuples for the baseline."""
    import databento_dbn as dbn
    import zstandard

    rng = random.Random(20240102)
    symbols = {f"SYM{i:04d}": 10_000 + i for i in range(n_symbols)}
    ids = list(symbols.values())
    prices = [rng.randint(1_000, 50_000) * TICK for _ in ids]
    bar_bytes, bar_rows = [], []
    for k in range(n):
        i = k % n_symbols
        minute = k // n_symbols
        p = prices[i] = max(TICK, prices[i] + rng.randint(-20, 20) * TICK)
        high, low = p + rng.randint(0, 10) * TICK, max(TICK, p - rng.randint(0, 10) * TICK)
        ts = (T0 + 60 * minute) * NS
        volume = rng.randint(100, 10_000)
        record = dbn.OHLCVMsg(rtype=int(dbn.RType.OHLCV_1M), publisher_id=2, instrument_id=ids[i], ts_event=ts,
                              open=p, high=high, low=low, close=p, volume=volume)  # fmt: skip
        bar_bytes.append(bytes(record))
        bar_rows.append((i + 1, "1m", EPOCH + timedelta(microseconds=ts // 1000), 2, p, high, low, p, volume, 0))
    trade_bytes, trade_rows = [], []
    for k in range(n):
        i = rng.randrange(n_symbols)
        ts = T0 * NS + k * 20_000_000  # 50 trades a second across the symbols
        p = prices[i] = max(TICK, prices[i] + rng.randint(-2, 2) * TICK)
        size = rng.randint(1, 500)
        side = rng.choice([dbn.Side.ASK, dbn.Side.BID])
        trade_bytes.append(bytes(dbn.TradeMsg(publisher_id=2, instrument_id=ids[i], ts_event=ts, ts_recv=ts + 5_000,
                                              price=p, size=size, action=dbn.Action.TRADE, side=side, flags=0,
                                              depth=0, ts_in_delta=0, sequence=k)))  # fmt: skip
        when = EPOCH + timedelta(microseconds=ts // 1000)
        trade_rows.append((i + 1, when, when, 2, k, 0, p, size, str(side.value), 0))
    compressor = zstandard.ZstdCompressor()
    bars_path, trades_path = out / "bench.ohlcv-1m.dbn.zst", out / "bench.trades.dbn.zst"
    bars_path.write_bytes(compressor.compress(metadata(dbn.Schema.OHLCV_1M, symbols) + b"".join(bar_bytes)))
    trades_path.write_bytes(compressor.compress(metadata(dbn.Schema.TRADES, symbols) + b"".join(trade_bytes)))
    # The same command on a file of no records: what a run costs before its first record.
    (out / "bench.empty.dbn.zst").write_bytes(compressor.compress(metadata(dbn.Schema.OHLCV_1M, symbols)))
    return bars_path, trades_path, bar_rows, trade_rows


def bench_env(storage: str) -> dict[str, str]:
    return common_env(BENCH_DB, BENCH_REDIS_DB, storage=storage)


def dsn(env: dict[str, str], dbname: str) -> str:
    import environ

    cfg = environ.Env.db_url_config(env["DATABASE_URL"])
    return f"host={cfg['HOST']} port={cfg['PORT'] or 5432} user={cfg['USER']} dbname={dbname}"


def prepare_db(env: dict[str, str]) -> None:
    import psycopg

    with psycopg.connect(dsn(env, "postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DB]).fetchone():
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=300)


def empty(env: dict[str, str]) -> None:
    import psycopg
    import redis

    with psycopg.connect(dsn(env, BENCH_DB), autocommit=True) as conn:
        conn.execute(
            "TRUNCATE marketdata_bar, marketdata_trade, marketdata_instrumentmapping, marketdata_feedstatus, "
            "marketdata_symbol CASCADE"
        )
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()


def count(env: dict[str, str], table: str) -> int:
    import psycopg

    with psycopg.connect(dsn(env, BENCH_DB)) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else 0


def server_cpu() -> dict[str, float]:
    """CPU seconds so far of this machine's PostgreSQL and Redis processes (with their reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"postgres": 0.0, "redis": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        kind = "postgres" if name.startswith("postgres") else "redis" if name.startswith("redis") else None
        if kind:
            out[kind] += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    return out


def ingest(env: dict[str, str], path: Path, publish: bool, timeout: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of the ingest command, and CPU seconds by whom: the command (with its
    publisher process), PostgreSQL and Redis (all of the machine's: keep it otherwise quiet)."""
    args = [sys.executable, "manage.py", "ingest", "replay", str(path), "--max", *([] if publish else ["--no-publish"])]
    time.sleep(0.5)  # the sessions of the steps before end, and their CPU is counted, before this one's
    before = server_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = started + timeout
    try:
        while True:  # os.wait4 for its resource usage; polled, so that the time limit holds
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                raise SystemExit(f"ingest of {path.name} gave up after --timeout {timeout} s")
            time.sleep(0.005)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"ingest of {path.name} failed with exit code {proc.returncode}")
    time.sleep(0.5)  # its sessions end and are reaped: an exited backend's CPU moves to the postmaster's
    after = server_cpu()
    cpu = {"ingester": usage.ru_utime + usage.ru_stime, **{k: after[k] - before[k] for k in after}}
    return elapsed, cpu


def startup(env: dict[str, str], empty_file: Path, publish: bool, timeout: int) -> float:
    """What a run costs before its first record: the same command on a file of no records
    (loading Django, and with publishing on its publisher process's start too)."""
    empty(env)
    wall, _ = ingest(env, empty_file, publish, timeout)
    return wall


def baseline(env: dict[str, str], rows: list[tuple], columns: str, types: list[str]) -> float:
    """Rows/s of one plain binary COPY of the same rows into an unindexed table."""
    import psycopg

    with psycopg.connect(dsn(env, BENCH_DB)) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_baseline")
        conn.execute(f"CREATE TABLE bench_baseline ({columns})")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY bench_baseline FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
        conn.commit()
        elapsed = time.perf_counter() - started
        conn.execute("DROP TABLE bench_baseline")
        conn.commit()
    return len(rows) / elapsed


BAR_COLUMNS = (
    "symbol_id bigint, timeframe text, ts timestamptz, publisher_id int, open bigint, high bigint, low bigint, "
    "close bigint, volume bigint, anomalies smallint"
)
BAR_TYPES = ["int8", "text", "timestamptz", "int4", "int8", "int8", "int8", "int8", "int8", "int2"]
TRADE_COLUMNS = (
    "symbol_id bigint, ts_event timestamptz, ts_recv timestamptz, publisher_id int, sequence bigint, ordinal smallint, "
    "price bigint, size bigint, side text, flags smallint"
)
TRADE_TYPES = ["int8", "timestamptz", "timestamptz", "int4", "int8", "int2", "int8", "int8", "text", "int2"]


def run_path(storage: str, args: argparse.Namespace, files: tuple[Path, Path, list[tuple], list[tuple]]) -> dict:
    """One storage path's figures: the start, then bars and trades, each beside its COPY baseline."""
    bars_path, trades_path, bar_rows, trade_rows = files
    env = bench_env(storage)
    env["INGEST_PUBLISH_PROCESS"] = "true" if args.publisher == "process" else "false"
    where = env["DATABASE_URL"].rsplit("@", 1)[-1]
    print(f"\n== {STORAGE_PATHS[storage]}: {where}", flush=True)
    prepare_db(env)
    storage_check(env["DATABASE_URL"], storage, ["marketdata_bar", "marketdata_trade"])  # before any timing
    overhead = startup(env, bars_path.with_name("bench.empty.dbn.zst"), not args.no_publish, args.timeout)
    figures: dict = {"start": overhead, "tables": {}}
    publish = "off" if args.no_publish else f"on, from a {args.publisher}"
    print(
        f"start (subtracted): {overhead:.2f} s, the same command replaying a file of no records "
        f"(Django, and the publisher process's start); publish: {publish}"
    )
    for label, path, table, rows, columns, types in (
        ("bars", bars_path, "marketdata_bar", bar_rows, BAR_COLUMNS, BAR_TYPES),
        ("trades", trades_path, "marketdata_trade", trade_rows, TRADE_COLUMNS, TRADE_TYPES),
    ):
        empty(env)
        wall, cpu = ingest(env, path, not args.no_publish, args.timeout)
        elapsed = wall - overhead
        stored = count(env, table)
        if stored != args.records:
            raise SystemExit(f"{storage}: {label}: stored {stored:,} rows, expected {args.records:,}")
        # Before the next empty(): TRUNCATE drops a hypertable's chunks.
        what = storage_check(env["DATABASE_URL"], storage, [table])[table]
        rate = args.records / elapsed
        base = baseline(env, rows, columns, types)
        print(
            f"{label:6s}: ingest replay --max {rate:10,.0f} records/s ({elapsed:.1f} s; "
            f"{args.records / wall:,.0f}/s counting the start)   "
            f"plain COPY {base:10,.0f} rows/s   ratio {rate / base:.2f}   target 150,000/s"
        )
        per = {k: v / args.records * 1e6 for k, v in cpu.items()}
        busy = sum(cpu.values()) / (wall * len(os.sched_getaffinity(0)))
        whose = "with its publisher process and" if args.publisher == "process" else "publisher thread included,"
        print(
            f"        CPU per record: ingester {per['ingester']:.1f} us ({whose} its start), "
            f"PostgreSQL {per['postgres']:.1f} us, Redis {per['redis']:.1f} us; cores {busy:.0%} busy"
        )
        print(f"        storage: {table} is a {what}", flush=True)
        figures["tables"][label] = {
            "rate": rate, "with_start": args.records / wall, "copy": base, "ratio": rate / base, "cpu": per,
            "busy": busy, "storage": what,
        }  # fmt: skip
    empty(env)
    return figures


def table(figures: dict[str, dict]) -> str:
    """Each path's figures side by side."""
    rows: list[tuple[str, dict[str, str]]] = [
        ("start (subtracted), s", {s: f"{f['start']:.2f}" for s, f in figures.items()}),
    ]
    for label in ("bars", "trades"):
        per = {s: f["tables"][label] for s, f in figures.items()}
        rows += [
            (f"{label}: ingest replay --max, records/s", {s: f"{t['rate']:,.0f}" for s, t in per.items()}),
            (f"{label}: counting the start, records/s", {s: f"{t['with_start']:,.0f}" for s, t in per.items()}),
            (f"{label}: plain COPY (baseline), rows/s", {s: f"{t['copy']:,.0f}" for s, t in per.items()}),
            (f"{label}: ratio to COPY", {s: f"{t['ratio']:.2f}" for s, t in per.items()}),
            (f"{label}: CPU/record ingester, us", {s: f"{t['cpu']['ingester']:.1f}" for s, t in per.items()}),
            (f"{label}: CPU/record PostgreSQL, us", {s: f"{t['cpu']['postgres']:.1f}" for s, t in per.items()}),
            (f"{label}: CPU/record Redis, us", {s: f"{t['cpu']['redis']:.1f}" for s, t in per.items()}),
            (f"{label}: cores busy", {s: f"{t['busy']:.0%}" for s, t in per.items()}),
            (f"{label}: storage", {s: t["storage"] for s, t in per.items()}),
        ]
    return side_by_side(rows, list(figures))


def main() -> None:
    args = parse_args()
    print(f"machine: {machine()}")
    runnable = []
    for storage in args.paths:
        why = storage_unavailable(storage)
        if why:
            print(f"{storage}: skipped: {why}")
        else:
            runnable.append(storage)
    if not runnable:
        return
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        t = time.perf_counter()
        files = write_files(Path(tmp), args.records, args.symbols)
        print(f"wrote {args.records:,} bars and {args.records:,} trades in {time.perf_counter() - t:.1f} s")
        for storage in runnable:
            figures[storage] = run_path(storage, args, files)
    print()
    print(table(figures))
    print("target (SPEC section 8): 150,000 records/s")


if __name__ == "__main__":
    main()
