"""The service on private servers: gateway and ingester processes, their environment, and SQL checks.

Shared by tests/chaos and bench/chaos.py. Every process runs the real commands
(``python -m streaming.server``, ``manage.py ingest``) on loopback ports; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from .servers import PrivateServices, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
READY_S = 30.0


@dataclass
class Proc:
    """A child process with its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/v1/stream"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)

    def wait(self, timeout: float) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return int(self.proc.wait(timeout=timeout))
        return None

    def rss_kib(self) -> int:
        """VmRSS of the process (KiB), 0 once it has exited."""
        with contextlib.suppress(OSError), open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


@dataclass
class Stack:
    """Private Redis and PostgreSQL, one migrated database, and the processes started on them."""

    services: PrivateServices
    database: str
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    @classmethod
    def start(cls, database: str, log_dir: Path, extra_env: dict[str, str] | None = None) -> Stack:
        services = PrivateServices().start()
        stack = cls(services, database, log_dir, extra_env or {})
        try:
            services.pg.create_database(database)
            done = subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=stack.env(),
                                  capture_output=True, timeout=180, check=False)  # fmt: skip
            if done.returncode:
                raise RuntimeError("migrate failed:\n" + done.stderr.decode()[-3000:])
        except BaseException:
            services.close()
            raise
        return stack

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.stop(timeout=5)
        self.services.close()

    @property
    def database_url(self) -> str:
        return self.services.pg.url(self.database)

    @property
    def redis_url(self) -> str:
        return self.services.redis.url(0)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("WS_", "STREAMING_", "DJANGO_", "PROMETHEUS"))}
        return {
            **keep,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "TEST_REDIS_URL": self.redis_url,
            "CHANNELS_PREFIX": "chaos",
            # As in production: seqs start at the stream's creation time, so they never go
            # back when Redis loses its data.
            "STREAM_SEQ_EPOCH": "true",
            "DATABASE_POOL_TIMEOUT": "2",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
            # The load (bench/soak.py, bench/chaos.py) is many anonymous clients from one
            # loopback address, which the per-address cap would refuse past 100 and
            # admission (ops/admission.py) would serve one at a time.
            "WS_MAX_ANON_CONNECTIONS_PER_IP": "1000000",
            "ADMISSION_IN_FLIGHT_PER_IP": "1000000",
            **self.extra_env,
            **(extra or {}),
        }

    def _spawn(self, name: str, argv: list[str], extra: dict[str, str] | None, port: int = 0) -> Proc:
        log = self.log_dir / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env(extra), stdout=out, stderr=subprocess.STDOUT)
        p = Proc(name, proc, log, port)
        self.procs.append(p)
        return p

    def gateway(self, name: str = "gateway", extra: dict[str, str] | None = None) -> Proc:
        """A gateway process on a free loopback port, once /healthz answers."""
        for _ in range(3):  # a port taken between choosing and binding it: another one
            port = free_port()
            argv = [sys.executable, "-m", "streaming.server", "-b", "127.0.0.1", "-p", str(port),
                    "config.asgi:application"]  # fmt: skip
            p = self._spawn(name, argv, extra, port)
            deadline = time.monotonic() + READY_S
            while time.monotonic() < deadline and p.alive():
                with contextlib.suppress(OSError), urllib.request.urlopen(p.http + "/healthz", timeout=1):  # noqa: S310
                    return p
                time.sleep(0.05)
            p.stop(timeout=2)
        raise RuntimeError(f"gateway {name} did not start:\n{p.log_tail()}")

    def ingest(self, *args: str, name: str = "ingester", extra: dict[str, str] | None = None) -> Proc:
        """``manage.py ingest ARGS`` in its own process."""
        return self._spawn(name, [sys.executable, "manage.py", "ingest", *args], extra)

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(query, params).fetchall()

    def symbols_create(self, tickers: list[str], dataset: str = "XNAS.ITCH") -> None:
        """Symbols a client may subscribe to before their first bar arrives."""
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            for ticker in tickers:
                conn.execute(
                    "INSERT INTO marketdata_symbol (ticker, dataset, active, description, created_at) "
                    "VALUES (%s, %s, true, '', now()) ON CONFLICT (ticker) DO NOTHING",
                    (ticker, dataset),
                )

    def bars_stored(self, ticker: str, timeframe: str = "1m") -> list[tuple[Any, ...]]:
        """(ts, open, high, low, close, volume) of a symbol's stored bars, in time order."""
        return self.sql(
            "SELECT b.ts, b.open, b.high, b.low, b.close, b.volume FROM marketdata_bar b "
            "JOIN marketdata_symbol s ON s.id = b.symbol_id WHERE s.ticker = %s AND b.timeframe = %s ORDER BY b.ts",
            (ticker, timeframe),
        )
