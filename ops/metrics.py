"""The one Prometheus registry; every metric of the service is declared here or added to it.

Several processes (gateway processes behind one port, say) share their metrics through
prometheus_client's multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set (see
ops.multiprocess): every gauge says how its per-process values combine
(``multiprocess_mode``), and ``render`` merges them.
"""

from __future__ import annotations

import os
from threading import Thread
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

from . import multiprocess

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests by route and status class.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency by route.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
HTTP_IN_FLIGHT = Gauge(
    "http_requests_in_flight",
    "HTTP requests being served (saturation: each holds a worker thread).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
DB_WRITE_ROWS = Counter(
    "marketdata_rows_written_total", "Rows written by bars_upsert/trades_insert.", ["table"], registry=REGISTRY
)
DB_WRITE_LATENCY = Histogram(
    "marketdata_write_batch_seconds",
    "Time to write one batch (COPY + upsert + commit).",
    ["table"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
DB_APPEND_FALLBACKS = Counter(
    "marketdata_bar_append_fallbacks_total",
    "Append-only bar batches that met a stored key (another writer) and took the staged upsert.",
    registry=REGISTRY,
)
RETENTION_DELETED = Counter(
    "marketdata_retention_deleted_rows_total", "Rows deleted by retention_apply.", ["table"], registry=REGISTRY
)
READY = Gauge(
    "service_ready",
    "1 when /readyz last answered ready, else 0.",
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",
)


def _registry() -> CollectorRegistry:
    path = multiprocess.directory()
    if path is None:
        return REGISTRY
    multiprocess.dead_gauges_remove(path)
    merged = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(merged, path=str(path))
    return merged


def render() -> bytes:
    """Render the registry, merged across processes when PROMETHEUS_MULTIPROC_DIR is set."""
    return generate_latest(_registry())


def serve(port: int, addr: str = "0.0.0.0", token: str | None = None) -> tuple[Any, Thread]:  # noqa: S104 (scraped from outside the pod)
    """Serve the metrics on a port of their own from a daemon thread (the ingester has no HTTP server).

    With a token (default: the METRICS_TOKEN variable) a scrape must send ``Authorization:
    Bearer <token>``, as for the gateway's /metrics: 401 without, 403 with another.
    """
    import hmac
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    if token is None:  # called before Django's settings load (manage.py): the variable they read
        token = os.environ.get("METRICS_TOKEN", "")
    expected = token.encode()
    metrics_app = make_wsgi_app(_registry())

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if expected:
            scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                start_response("401 Unauthorized", [("WWW-Authenticate", 'Bearer realm="metrics"')])
                return [b"metrics: an Authorization: Bearer <METRICS_TOKEN> header is required\n"]
            if not hmac.compare_digest(given.strip().encode(), expected):
                start_response("403 Forbidden", [("Content-Type", "text/plain")])
                return [b"metrics: wrong token\n"]
        return metrics_app(environ, start_response)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """No line per scrape on stderr."""

    server = make_server(addr, port, app, Server, handler_class=QuietHandler)
    thread = Thread(target=server.serve_forever, daemon=True, name="metrics-server")
    thread.start()
    return server, thread


# INGEST
INGEST_RECORDS = Counter("ingest_records_total", "Records written by the ingester.", ["table"], registry=REGISTRY)
INGEST_BATCH_SECONDS = Histogram(
    "ingest_batch_seconds", "Write time of one ingest batch.", ["table"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)  # fmt: skip
INGEST_QUEUE_DEPTH = Gauge(
    "ingest_queue_depth", "Records waiting for the batch writer.", registry=REGISTRY, multiprocess_mode="livesum"
)
INGEST_LAG = Gauge(
    "ingest_lag_seconds",
    "The newest written record's age when it was written.",
    ["dataset"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
# Lag as of now, even when the feed has stopped: time() - ingest_last_record_timestamp_seconds.
INGEST_LAST_RECORD = Gauge(
    "ingest_last_record_timestamp_seconds",
    "Event time (Unix seconds) of the newest written record.",
    ["dataset"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
INGEST_BACKPRESSURE = Counter(
    "ingest_backpressure_waits_total", "Times the source waited on a full queue.", registry=REGISTRY
)

# CACHE
CACHE_REQUESTS = Counter("cache_requests_total", "Hot-cache lookups by result.", ["result"], registry=REGISTRY)
CACHE_ERRORS = Counter(
    "cache_errors_total", "Hot-cache operations that failed (Redis down).", ["op"], registry=REGISTRY
)

# ADMISSION (ops/admission.py)
ADMISSION_WAITED = Counter(
    "admission_waited_total",
    "HTTP requests and WebSocket handshakes that waited for their client address's turn.",
    ["kind"],
    registry=REGISTRY,
)
ADMISSION_REFUSED = Counter(
    "admission_refused_total",
    "HTTP requests (429) and WebSockets (4029) refused: their client address had too many waiting.",
    ["kind"],
    registry=REGISTRY,
)

# API
API_THROTTLED = Counter(
    "api_throttled_total", "History API requests refused with 429, by throttle scope.", ["scope"], registry=REGISTRY
)
API_CACHE = Counter(
    "api_cache_answers_total",
    "History API answers (one per symbol for /v1/latest) served from the hot cache or computed.",
    ["endpoint", "result"],
    registry=REGISTRY,
)

# WEBSOCKET GATEWAY
WS_CONNECTIONS = Gauge("ws_connections", "Open WebSocket connections.", registry=REGISTRY, multiprocess_mode="livesum")
WS_SUBSCRIPTIONS = Gauge(
    "ws_subscriptions", "Stream subscriptions over all connections.", registry=REGISTRY, multiprocess_mode="livesum"
)
WS_MESSAGES_SENT = Counter(
    "ws_messages_sent_total",
    "Messages handed to client sockets: stream messages, replies, status and heartbeats.",
    registry=REGISTRY,
)
WS_CONFLATED = Counter(
    "ws_messages_conflated_total", "Stream messages replaced by a newer one under throttle_ms.", registry=REGISTRY
)
WS_DROPPED = Counter(
    "ws_messages_dropped_total",
    "Stream messages not sent, by cause: duplicate (seq already sent) or closed (slow consumer closed).",
    ["cause"],
    registry=REGISTRY,
)
WS_SLOW_CLOSES = Counter(
    "ws_slow_consumer_closes_total", "Connections closed with 4008: their send queue overflowed.", registry=REGISTRY
)
WS_CLOSES = Counter("ws_closes_total", "Connections closed by the server, by close code.", ["code"], registry=REGISTRY)
WS_CLIENT_ERRORS = Counter(
    "ws_client_errors_total", "Error frames sent in answer to client messages, by code.", ["code"], registry=REGISTRY
)
WS_GAPS = Counter(
    "ws_gaps_total",
    "Seq gaps seen on the pub/sub path, by outcome: filled from the replay buffer, or resnapshot.",
    ["outcome"],
    registry=REGISTRY,
)
WS_PUBLISH_TO_SEND = Histogram(
    "ws_publish_to_send_seconds",
    "Publish (ingester commit) to handing a message to the client's socket.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
