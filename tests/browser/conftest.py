"""Fixtures of the browser tests: the real gateway on a loopback port, headless Chromium."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from tests.browser.chromium import headless_chromium

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """The gateway as it is deployed (streaming.server: daphne) on the test database, restartable on one port."""

    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
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

    def start(self) -> None:
        """Start the server and wait until /healthz answers."""
        with self.log_path.open("ab") as log:
            # As deployed: streaming.server is daphne with the slow-client extension.
            argv = ["-m", "streaming.server", "-b", "127.0.0.1", "-p", str(self.port), "config.asgi:application"]
            self.proc = subprocess.Popen(
                [sys.executable, *argv], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:  # noqa: S310 (loopback)
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"the gateway did not answer /healthz within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): its sockets stay open but nothing is sent."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
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
