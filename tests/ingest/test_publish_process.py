"""The publisher in a process of its own: it stops with the run, drains what was submitted,
and its death fails the run instead of hanging it (ingest/publisher_hosts.py).

Process host only: each case is about the child itself (signals to its process group, a
SIGKILL, its start-up); the runs they share with the thread host are in the pipeline suites
(tests/ingest/conftest.py's publish_host)."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import databento_dbn as dbn
import pytest
from django.conf import settings
from django.db import connection

from ingest.publisher import STOP
from ingest.publisher_hosts import ProcessHost, PublisherFailedError
from ingest.sources.replay import run_replay
from marketdata.models import Bar

from .dbnfile import bar, metadata, write
from .test_replay import buffer_frames

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent
T0 = 1704205800  # 2024-01-02T14:30:00Z


def _seconds(tmp_path: Path, n: int) -> Path:
    return write(
        tmp_path / "seconds.dbn",
        metadata(symbols={"AAPL": 7}, schema=dbn.Schema.OHLCV_1S),
        [bar(7, T0 + i, 100 + i % 7, rtype=dbn.RType.OHLCV_1S) for i in range(n)],
    )


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_publishes_everything_written_and_the_child_exits(tmp_path, redis_client):
    path = _seconds(tmp_path, 600)
    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "TEST_REDIS_URL": settings.REDIS_URL,
        "CHANNELS_PREFIX": settings.CHANNELS_PREFIX,
        "INGEST_PUBLISH_PROCESS": "true",
    }
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "ingest", "replay", str(path), "--speed", "100"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not redis_client.exists("md:buf:bars:1s:AAPL") and time.monotonic() < deadline:
        time.sleep(0.05)  # the child is up and publishing
    children = [p for p in _children(proc.pid) if _running(p)]
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 0, err
    written = int(re.search(r"written=(\d+)", out).group(1))  # type: ignore[union-attr]
    assert 0 < written < 600  # stopped part way
    assert Bar.objects.count() == written
    published = [f["data"]["ts"] for f in buffer_frames(redis_client, "bars:1s:AAPL")]
    assert len(published) == len(set(published)) == written  # every stored bar went out, once
    assert children
    assert not any(_running(p) for p in children)  # the publisher (and all else) exited


def test_a_publisher_process_that_dies_fails_the_run_without_hanging(tmp_path, redis_client, settings):
    settings.INGEST_PUBLISH_PROCESS = True
    path = _seconds(tmp_path, 3000)
    killed: list[int] = []

    def kill_the_publisher() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            child = next((p for p in multiprocessing.active_children() if p.name == "ingest-publisher"), None)
            if child is not None and child.pid and redis_client.exists("md:buf:bars:1s:AAPL"):
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_publisher)
    killer.start()
    started = time.monotonic()
    with pytest.raises(RuntimeError) as failed:
        run_replay(paths=[path], speed=100, loop=False, symbols=None, publish=True, install_signals=False)
    killer.join()

    assert killed
    assert isinstance(failed.value.__cause__, PublisherFailedError)
    assert "exited with -9" in str(failed.value.__cause__)
    assert time.monotonic() - started < 30  # 3,000 paced records would have taken 30 s
    with connection.cursor() as cursor:  # and the failed run let go of its feed lock
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert cursor.fetchone() == (0,)


def test_a_process_host_is_made_once_its_child_can_publish_so_no_batch_waits_for_its_start():
    failures: list[BaseException] = []
    host = ProcessHost("ready-test", closing=lambda: False, warn=lambda what: None, failed=failures.append)
    try:
        assert host._ready.is_set()  # a batch submitted now is published at once, not after Django's setup
        assert host.alive()
    finally:
        assert host.put(STOP, timeout=10)
        host.join()
    assert not failures
    assert not host.alive()
