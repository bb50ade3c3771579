"""Benchmarks: each file runs as a script and prints its figures (SPEC section 8)."""

from __future__ import annotations

import os
import platform


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


def bench_env(database: str, redis_db: int, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's child processes: its own database and Redis database
    on the servers DATABASE_URL and REDIS_URL name, local settings with DEBUG off (as
    deployed: no query log kept per database call), quiet logs."""
    import environ

    base = environ.Env.db_url_config(os.environ.get("DATABASE_URL", "postgres://root@127.0.0.1:5432/marketdata"))
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
