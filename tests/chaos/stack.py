"""The service on private servers: gateway and ingester processes, their environment, and SQL checks.

Shared by tests/chaos and bench/chaos.py. Every process runs the real commands
(``python -m streaming.server``, ``manage.py ingest``) on loopback ports; every wait is bounded.

Also the one way every test and bench starts a gateway process (on any servers):
``gateway_start`` (or ``gateway_spawn`` then ``gateway_up``, to start several at once),
with the caller's environment, arguments, log and readiness probe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from .servers import PrivateServices, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
READY_S = 30.0
GATEWAY_APP = "config.asgi:application"
GATEWAY_ATTEMPTS = 3  # a port taken between choosing and binding it: another one, this many times in all


@dataclass
class Proc:
    """A child process with its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None
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
        return self.log.read_text(errors="replace")[-n:] if self.log is not None and self.log.exists() else ""

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

        def spawn() -> Proc:
            p: Proc = gateway_spawn(self.env(extra), self.log_dir / f"{name}-{len(self.procs)}.log", name=name)
            self.procs.append(p)
            return p

        return gateway_up(spawn(), spawn)

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


# THE GATEWAY PROCESS, for every test and bench

P = TypeVar("P", bound=Proc)
Probe = Callable[[Proc], bool]


class GatewayFailed(RuntimeError):
    """A gateway process that exited before it was ready, or was not ready in time; the tail of its log says why."""


def gateway_argv(port: int, *args: str, app: str = GATEWAY_APP) -> list[str]:
    """The gateway as the image runs it (``python -m streaming.server``: daphne with its scope extension)."""
    return [sys.executable, "-m", "streaming.server", "-b", "127.0.0.1", "-p", str(port), *args, app]


def gateway_spawn(
    env: Mapping[str, str],
    log: Path | None,
    *,
    name: str = "gateway",
    port: int | None = None,
    args: Sequence[str] = (),
    app: str = GATEWAY_APP,
    argv: Callable[[int], list[str]] | None = None,
    append: bool = False,
    new_session: bool = False,
    kind: type[P] = Proc,  # type: ignore[assignment]
) -> P:
    """Start a gateway on ``port`` (a free loopback one when None) without waiting for it.

    Its output goes to ``log`` (appended to with ``append``; None: nowhere). ``argv`` puts
    another server in the gateway's place (bench/fanout.py's baselines); ``kind`` is the
    Proc subclass to return.
    """
    port = port or free_port()
    command = argv(port) if argv is not None else gateway_argv(port, *args, app=app)
    popen: dict[str, Any] = {"cwd": ROOT, "env": dict(env), "start_new_session": new_session}
    if log is None:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    else:
        with log.open("ab" if append else "wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **popen)
    return kind(name, proc, log, port)


def http_ok(path: str = "/healthz", headers: Mapping[str, str] | None = None) -> Probe:
    """A probe: ``path`` answers with a 2xx status."""

    def probe(p: Proc) -> bool:
        request = urllib.request.Request(p.http + path, headers=dict(headers or {}))  # noqa: S310 (loopback)
        with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=1):  # noqa: S310
            return True
        return False

    return probe


HEALTHZ = http_ok()


def listening(p: Proc) -> bool:
    """A probe: the gateway's port accepts a connection."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", p.port), timeout=1):
        return True
    return False


def gateway_up(p: P, again: Callable[[], P] | None = None, *, ready: Probe = HEALTHZ, timeout: float = READY_S) -> P:
    """``p`` once ``ready`` holds, within ``timeout`` seconds.

    One that exits because its port was taken meanwhile is replaced by ``again()`` (on
    another port), at most GATEWAY_ATTEMPTS in all. Anything else (it exits for another
    reason, or is not ready in time: then it is stopped) raises GatewayFailed with the
    tail of its log.
    """
    for _ in range(GATEWAY_ATTEMPTS):
        deadline = time.monotonic() + timeout
        while p.alive():
            if ready(p):
                return p
            if time.monotonic() >= deadline:
                p.stop(timeout=2)
                raise GatewayFailed(f"gateway {p.name} did not start within {timeout:g} s:\n{p.log_tail()}")
            time.sleep(0.05)
        if again is None or (p.log is not None and "Address already in use" not in p.log_tail()):
            break
        p = again()
    raise GatewayFailed(f"gateway {p.name} did not start (exit {p.proc.returncode}):\n{p.log_tail()}")


def gateway_start(
    env: Mapping[str, str],
    log: Path | None,
    *,
    ready: Probe = HEALTHZ,
    timeout: float = READY_S,
    kind: type[P] = Proc,  # type: ignore[assignment]
    **spawn: Any,
) -> P:
    """A gateway process (``gateway_spawn``'s arguments) once ``ready`` holds (``gateway_up``)."""

    def again() -> P:
        return gateway_spawn(env, log, kind=kind, **spawn)

    return gateway_up(again(), None if spawn.get("port") else again, ready=ready, timeout=timeout)


def gateways_stop(procs: Sequence[Proc], timeout: float = 10) -> None:
    """SIGTERM every process at once, then wait for each (SIGKILL past ``timeout``)."""
    for p in procs:
        if p.alive():
            p.proc.terminate()
    for p in procs:
        p.stop(timeout=timeout)
