"""OpenTelemetry: spans exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set, nothing when not.

The collector is a stand-in: an HTTP server on a loopback port that records what is
POSTed to /v1/traces and decodes it with opentelemetry-proto. The gateway and the
ingester run as real subprocesses (tracing is set up once per process, at its start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings

from tests.chaos.stack import Proc, gateway_start, http_ok
from tests.ingest.dbnfile import bar, metadata, write

ROOT = Path(__file__).resolve().parent.parent.parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SECRET = "mdg_" + "s3cr3t" * 7
WAIT_S = 20.0


class Collector:
    """An OTLP/HTTP traces endpoint on loopback: every span it was sent, decoded."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with lock:
                    collector.paths.append(self.path)
                    for resource_spans in request.resource_spans:
                        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                collector.spans.append(
                                    {
                                        "name": span.name,
                                        "trace_id": span.trace_id.hex(),
                                        "span_id": span.span_id.hex(),
                                        "parent_span_id": span.parent_span_id.hex(),
                                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                                        "service": resource.get("service.name"),
                                    }
                                )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, predicate: Any, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            found = [s for s in list(self.spans) if predicate(s)]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no span {what} within {WAIT_S} s; got {[s['name'] for s in self.spans]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def _env(**extra: str) -> dict[str, str]:
    """The test database and Redis for a child process; no OTEL_* from outside."""
    db = settings.DATABASES["default"]  # pytest-django's test database by now
    auth = quote(db["USER"] or "", safe="") + (":" + quote(db["PASSWORD"], safe="") if db.get("PASSWORD") else "")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_MULTIPROC"))}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        TEST_REDIS_URL=settings.REDIS_URL,
        CHANNELS_PREFIX=settings.CHANNELS_PREFIX,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _otel_env(collector: Collector) -> dict[str, str]:
    return _env(OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY="50")


def _get(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (loopback)
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return int(response.status)


@pytest.mark.django_db
def test_gateway_exports_django_psycopg_and_redis_spans_continuing_the_traceparent(collector, tmp_path):
    gateway: Proc = gateway_start(_otel_env(collector), tmp_path / "gateway.log", ready=http_ok("/metrics"))
    port = gateway.port
    try:
        traceparent = f"00-{TRACE_ID}-{PARENT}-01"
        assert _get(f"http://127.0.0.1:{port}/healthz?token={SECRET}&x=1", {"traceparent": traceparent}) == 200
        assert _get(f"http://127.0.0.1:{port}/readyz", {"traceparent": traceparent}) == 200

        ours = lambda s: s["trace_id"] == TRACE_ID  # noqa: E731
        server = collector.wait_for(lambda s: ours(s) and s["attributes"].get("http.route") == "healthz", "healthz")
        assert server[0]["parent_span_id"] == PARENT  # a child of the caller's span
        assert server[0]["service"] == "marketdata-gateway"
        # The query is kept in the URL attributes, its token redacted (as in the logs).
        urls = {k: v for k, v in server[0]["attributes"].items() if k in ("http.url", "http.target", "url.full")}
        assert urls
        assert all(v.endswith("?token=[REDACTED]&x=1") for v in urls.values()), urls
        assert not [s for s in collector.spans if SECRET in json.dumps(s["attributes"])]
        ready = collector.wait_for(lambda s: ours(s) and s["attributes"].get("http.route") == "readyz", "readyz")[0]
        db = collector.wait_for(lambda s: ours(s) and s["attributes"].get("db.system") == "postgresql", "psycopg")
        cache = collector.wait_for(lambda s: ours(s) and s["attributes"].get("db.system") == "redis", "redis")
        assert db[0]["parent_span_id"] == cache[0]["parent_span_id"] == ready["span_id"]
        assert collector.paths[0] == "/v1/traces"
    finally:
        gateway.stop(timeout=10)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("redis_client")
def test_ingester_exports_an_ingest_batch_span_around_write_and_publish(collector, tmp_path):
    records = [bar(7, 1704205800 + 60 * i, 100) for i in range(5)]
    path = write(tmp_path / "bars.dbn", metadata(symbols={"AAPL": 7}), records)
    subprocess.run(
        [sys.executable, "manage.py", "ingest", "replay", str(path), "--max"],
        cwd=ROOT, env=_otel_env(collector), check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    batch = collector.wait_for(lambda s: s["name"] == "ingest.batch", "ingest.batch")[0]
    assert batch["attributes"] == {
        "dataset": "XNAS.ITCH",
        "batch": 0,
        "bars": 5,
        "trades": 0,
        "quotes": 0,
        "statuses": 0,
    }
    assert batch["service"] == "marketdata-ingest"
    inside = lambda s: s["trace_id"] == batch["trace_id"] and s["parent_span_id"] == batch["span_id"]  # noqa: E731
    collector.wait_for(lambda s: inside(s) and s["attributes"].get("db.system") == "postgresql", "write in the batch")
    # The cache bump and the hand-off to the publisher run after the commit in a thread of their own.
    after = collector.wait_for(lambda s: inside(s) and s["name"] == "ingest.after_commit", "ingest.after_commit")[0]
    collector.wait_for(
        lambda s: s["parent_span_id"] == after["span_id"] and s["attributes"].get("db.system") == "redis",
        "cache bump after the commit",
    )
    # The publisher's own span (its transaction goes out on a raw connection: no redis span of its own).
    published = collector.wait_for(lambda s: s["name"] == "publish.batch", "publish.batch")[0]
    assert published["attributes"]["messages"] >= 5  # the five bars, and the derived ones


def test_without_the_endpoint_nothing_of_tracing_is_loaded():
    """No SDK tracer, exporter or instrumentation imported, no middleware added: the gateway and ingester paths."""
    probe = """
import json, sys
import config.asgi
import ingest.pipeline
from django.conf import settings
from ops import tracing
loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter",
                                                         "opentelemetry.instrumentation")))
print(json.dumps({"loaded": loaded, "middleware": [m for m in settings.MIDDLEWARE if "opentelemetry" in m],
                  "enabled": tracing.enabled(), "noop": tracing.span("x") is tracing.span("y")}))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=_env(), capture_output=True, text=True, check=True, timeout=60
    )
    state = json.loads(result.stdout.splitlines()[-1])
    assert state == {"loaded": [], "middleware": [], "enabled": False, "noop": True}
