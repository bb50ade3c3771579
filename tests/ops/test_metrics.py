"""/metrics across processes (prometheus_client multiprocess mode) and the ingester's own metrics port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops import metrics

ROOT = Path(__file__).resolve().parent.parent.parent

# A gateway-like process: n connections, 10n messages sent, one request, ingest lag n.
WORKER = """
import sys
from ops import metrics
n = int(sys.argv[1])
metrics.WS_CONNECTIONS.inc(n)
metrics.WS_MESSAGES_SENT.inc(10 * n)
metrics.HTTP_LATENCY.labels("healthz").observe(0.003)
metrics.INGEST_LAG.labels("XNAS.ITCH").set(n)
print("ready", flush=True)
sys.stdin.read()
"""


def samples(text: str) -> dict[str, float]:
    """``name{label="v",...}`` -> value, labels sorted."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class Workers:
    def __init__(self, directory: Path) -> None:
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        self.procs: list[subprocess.Popen] = []

    def start(self, n: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(n)], cwd=ROOT, env=self.env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        self.procs.append(proc)
        return proc

    def run(self, n: int) -> int:
        """A worker that writes its metrics and exits: its pid."""
        proc = self.start(n)
        proc.communicate("", timeout=10)
        return proc.pid

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path / "prom")
    (tmp_path / "prom").mkdir()
    yield w
    w.close()


@pytest.mark.django_db
def test_metrics_of_two_processes_are_merged_and_a_killed_ones_connections_forgotten(
    client, workers, tmp_path, monkeypatch
):
    workers.start(3)
    killed = workers.start(4)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))

    merged = samples(client.get("/metrics").content.decode())
    assert merged["ws_connections"] == 7
    assert merged["ws_messages_sent_total"] == 70
    assert merged['http_request_duration_seconds_count{route="healthz"}'] == 2
    assert merged['ingest_lag_seconds{dataset="XNAS.ITCH"}'] == 4  # the worst of the live processes

    killed.send_signal(signal.SIGKILL)
    killed.wait()
    merged = samples(client.get("/metrics").content.decode())
    assert merged["ws_connections"] == 3  # its live gauges went with it
    assert merged["ws_messages_sent_total"] == 70  # its counts stay: sums never go backwards
    assert merged['ingest_lag_seconds{dataset="XNAS.ITCH"}'] == 3


def _prepare(directory: Path) -> list[str]:
    """Run ops.multiprocess.prepare in a fresh process (as streaming.server does first); the files left."""
    subprocess.run(
        [sys.executable, "-c", "from ops import multiprocess; multiprocess.prepare()"],
        cwd=ROOT, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}, check=True, timeout=30,
    )  # fmt: skip
    return sorted(p.name for p in directory.iterdir())


def test_server_start_wipes_the_directory_when_no_other_process_uses_it(workers, tmp_path):
    dead = workers.run(2)
    assert f"gauge_livesum_{dead}.db" in os.listdir(tmp_path / "prom")
    assert _prepare(tmp_path / "prom") == []


def test_server_start_keeps_running_siblings_and_drops_dead_processes_live_gauges(workers, tmp_path):
    sibling = workers.start(1).pid
    dead = workers.run(2)
    left = _prepare(tmp_path / "prom")
    assert f"gauge_livesum_{sibling}.db" in left
    assert f"counter_{sibling}.db" in left
    assert f"counter_{dead}.db" in left
    assert f"gauge_livesum_{dead}.db" not in left


def test_prepare_creates_a_missing_directory(tmp_path):
    assert _prepare(tmp_path / "new" / "prom") == []


def test_ingester_metrics_port_serves_the_registry():
    server, thread = metrics.serve(0, addr="127.0.0.1")
    try:
        metrics.INGEST_QUEUE_DEPTH.set(17)
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert samples(response.read().decode())["ingest_queue_depth"] == 17
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_ingester_metrics_port_requires_the_metrics_token_when_set():
    server, thread = metrics.serve(0, addr="127.0.0.1", token="s3cret-token")
    port = server.server_address[1]

    def get(headers: dict[str, str]) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (loopback)
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    try:
        assert get({}) == 401
        assert get({"Authorization": "Bearer s3cret-tokenx"}) == 403
        assert get({"Authorization": "Bearer s3cret-token"}) == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
