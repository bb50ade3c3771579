"""Fixtures of the browser tests: the real gateway on a loopback port, headless Chromium."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from tests.browser.chromium import headless_chromium
from tests.chaos.servers import free_port
from tests.chaos.stack import Proc, gateway_start

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT_S = 30


class Gateway:
    """The gateway as it is deployed (streaming.server: daphne) on the test database, restartable on one port."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: Proc | None = None
        db = settings.DATABASES["default"]
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            # pytest-django's test database (the subprocess sees what the test committed).
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "DATABASE_POOL_MAX": "4",
            "TEST_REDIS_URL": settings.REDIS_URL,
            # The test settings derive the channel prefix from the database name, which
            # pytest-django changed after this process read it: hand this process's over.
            "CHANNELS_PREFIX": getattr(settings, "CHANNELS_PREFIX", "asgi"),
            "STREAMING_ALLOW_ANONYMOUS": "true",
        }

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.process is not None
        return self.process.proc

    def start(self) -> None:
        """Start the server on its port (its log appended to) and wait until /healthz answers."""
        self.process = gateway_start(self.env, self.log_path, port=self.port, append=True, timeout=START_TIMEOUT_S)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.process is None:
            return
        self.process.stop(timeout=10)
        self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): its sockets stay open but nothing is sent."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def gateway(transactional_db: None, tmp_path: Path) -> Iterator[Gateway]:
    """The real gateway on a free loopback port; stopped before the test database is flushed."""
    server = Gateway(tmp_path / "gateway.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """Headless Chromium through chromedriver; skipped with the reason where they are not installed."""
    with headless_chromium(tmp_path) as driver:
        yield driver
