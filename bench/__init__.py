"""Benchmarks: each file runs as a script and prints its figures (SPEC section 8)."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Mapping, Sequence


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def machine() -> str:
    """One line on the machine a benchmark ran on: cores, CPU model, Python."""
    usable = len(os.sched_getaffinity(0))
    return f"{os.cpu_count()} cores ({usable} usable), {cpu_model()}, Python {platform.python_version()}"


# Every simulated client of a load bench comes from one loopback address: the production
# per-address limits (the cap on anonymous sockets, the requests and handshakes served at
# once, ops/admission.py) would refuse or queue all but a few of them.
LOOPBACK_LIMITS = {"WS_MAX_ANON_CONNECTIONS_PER_IP": "1000000", "ADMISSION_IN_FLIGHT_PER_IP": "1000000"}


def bench_env(database: str, redis_db: int, *, storage: str = "plain", **extra: str) -> dict[str, str]:
    """The environment of a benchmark's child processes: its own database and Redis database
    on the servers REDIS_URL and ``server_url(storage)`` name (DATABASE_URL for plain
    PostgreSQL), local settings with DEBUG off (as deployed: no query log kept per database
    call), quiet logs."""
    import environ

    base = environ.Env.db_url_config(server_url(storage))
    host, port, user = base.get("HOST") or "127.0.0.1", base.get("PORT") or 5432, base.get("USER") or "root"
    redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DATABASE_URL": f"postgres://{user}@{host}:{port}/{database}",
        "REDIS_URL": f"{redis}/{redis_db}",
        "DJANGO_DEBUG": "false",
        "LOG_LEVEL": "WARNING",
        **LOOPBACK_LIMITS,
        **extra,
    }


# STORAGE PATHS
# The two storage paths a benchmark measures in one run: plain PostgreSQL on the server
# DATABASE_URL names, and TimescaleDB on the server TIMESCALEDB_DATABASE_URL names (the
# cluster scripts/timescaledb.sh builds, where make test's second run goes too). Each gets
# a database of its own there, created and migrated the same way, so on TimescaleDB the
# migrations make the hypertables.
STORAGE_PATHS = {"plain": "plain PostgreSQL", "timescaledb": "TimescaleDB"}
SERVER_URLS = {
    "plain": ("DATABASE_URL", "postgres://root@127.0.0.1:5432/marketdata"),
    "timescaledb": ("TIMESCALEDB_DATABASE_URL", "postgres://root@127.0.0.1:5433/marketdata"),
}


def server_url(storage: str) -> str:
    """The URL of the server a storage path runs on (a bench uses a database of its own there, not the one named)."""
    name, default = SERVER_URLS[storage]
    return os.environ.get(name, default)


def storage_paths(value: str) -> list[str]:
    """Parse ``--paths``: names of STORAGE_PATHS, comma-separated, each run once in the order given."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names or any(name not in STORAGE_PATHS for name in names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(STORAGE_PATHS)}, got {value!r}"
        )
    return list(dict.fromkeys(names))


def add_paths_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--paths`` (default: every storage path)."""
    parser.add_argument(
        "--paths", type=storage_paths, default=list(STORAGE_PATHS), metavar="plain,timescaledb",
        help="storage paths to run, in this order (default: both; TimescaleDB is skipped with a line saying why "
        "where the server at TIMESCALEDB_DATABASE_URL does not answer or has no extension)",
    )  # fmt: skip


def _settings_for_sql() -> None:
    # marketdata.db.base reads a setting when it is imported (django-timescaledb's backend
    # base): the settings a bench's children run with, never the test ones.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")


def storage_unavailable(storage: str) -> str | None:
    """Why a storage path cannot run here (None when it can): the TimescaleDB server does not
    answer, or does not offer and preload the extension. Plain PostgreSQL always runs (a
    server that does not answer there is a failure, as before)."""
    if storage == "plain":
        return None
    import environ
    import psycopg

    _settings_for_sql()
    from marketdata.db.base import AVAILABLE_SQL

    name = SERVER_URLS[storage][0]
    cfg = environ.Env.db_url_config(server_url(storage))
    where = f"{cfg.get('HOST') or '127.0.0.1'}:{cfg.get('PORT') or 5432}"
    params = {
        "host": cfg.get("HOST"),
        "port": cfg.get("PORT"),
        "user": cfg.get("USER"),
        "password": cfg.get("PASSWORD"),
    }
    try:
        with psycopg.connect(dbname="postgres", connect_timeout=3, **{k: v for k, v in params.items() if v}) as conn:
            row = conn.execute(AVAILABLE_SQL).fetchone()
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"no server answers at {where} ({name}; scripts/timescaledb.sh starts one): {first}"
    if not (row and row[0]):
        return f"the server at {where} ({name}) does not offer and preload the timescaledb extension"
    return None


def storage_check(url: str, storage: str, tables: Sequence[str]) -> dict[str, str]:
    """What each table at ``url`` is: "hypertable, N chunks" on TimescaleDB, "plain table" on plain.

    Anything else is a SystemExit (a plain path's database with the extension, a TimescaleDB
    path's table that is not a hypertable): figures printed under the wrong path's name are
    worse than none.
    """
    import psycopg

    _settings_for_sql()
    from marketdata.db.base import INSTALLED_SQL

    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(INSTALLED_SQL).fetchone()
        installed = bool(row and row[0])
        if storage == "plain":
            if installed:
                raise SystemExit(
                    f"plain: the database at {SERVER_URLS[storage][0]} has the timescaledb extension; "
                    "point it at a plain PostgreSQL server"
                )
            return dict.fromkeys(tables, "plain table")
        if not installed:
            raise SystemExit(f"{storage}: the bench database has no timescaledb extension after migrate")
        chunks: dict[str, int] = dict(
            conn.execute(
                "SELECT hypertable_name::text, num_chunks FROM timescaledb_information.hypertables "
                "WHERE hypertable_name = ANY(%s)",
                [list(tables)],
            ).fetchall()
        )
    missing = [t for t in tables if t not in chunks]
    if missing:
        raise SystemExit(f"{storage}: not hypertables: {', '.join(missing)}")
    return {t: f"hypertable, {chunks[t]} chunk{'' if chunks[t] == 1 else 's'}" for t in tables}


def side_by_side(rows: Sequence[tuple[str, Mapping[str, str]]], storages: Sequence[str]) -> str:
    """A table of figures, one row each, with one column per storage path ("-" where it has none)."""
    headers = [STORAGE_PATHS[s] for s in storages]
    label_width = max([len(label) for label, _ in rows] + [0])
    widths = [
        max([len(h)] + [len(cells.get(s, "-")) for _, cells in rows]) for h, s in zip(headers, storages, strict=True)
    ]
    lines = [" " * label_width + "".join(f"   {h:>{w}}" for h, w in zip(headers, widths, strict=True))]
    for label, cells in rows:
        lines.append(
            f"{label:<{label_width}}"
            + "".join(f"   {cells.get(s, '-'):>{w}}" for s, w in zip(storages, widths, strict=True))
        )
    return "\n".join(lines)
