"""The Grafana dashboard (deploy/grafana/marketdata.json) asks only for metrics the service exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from ops import metrics

DASHBOARD = Path(__file__).resolve().parent.parent.parent / "deploy" / "grafana" / "marketdata.json"

# Names in a PromQL expression that are not metrics.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
# Sample names of each metric type, as Prometheus scrapes them from prometheus_client.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum", ""),
}
# What the dashboard must show (issue 7: golden signals of HTTP and WebSocket, the ingest figures, the cache).
REQUIRED = {
    "http_requests_total", "http_request_duration_seconds_bucket", "http_requests_in_flight",
    "ws_connections", "ws_subscriptions", "ws_messages_sent_total", "ws_messages_conflated_total",
    "ws_messages_dropped_total", "ws_slow_consumer_closes_total", "ws_publish_to_send_seconds_bucket",
    "ingest_records_total", "ingest_batch_seconds_bucket", "ingest_lag_seconds", "ingest_queue_depth",
    "cache_requests_total",
}  # fmt: skip


def exposed_names() -> set[str]:
    """Every sample name the registry exposes (labelled metrics included, observed or not)."""
    return {f.name + suffix for f in metrics.REGISTRY.collect() for suffix in SUFFIXES[f.type]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, legends)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\$\w+", "", expr)  # dashboard variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name not in KEYWORDS:
            names.add(name)
    return names


def expressions(node: Any) -> list[str]:
    """Every ``expr`` of every target, at any depth (rows may nest panels)."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in expressions(value)]
    if isinstance(node, list):
        return [e for item in node for e in expressions(item)]
    return []


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_metric_names_are_parsed_from_promql():
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{route!="x"}[5m])))'
        " / on (route) group_left sum(up offset 5m) and max(time() - ingest_last_record_timestamp_seconds)"
    )
    assert metric_names(expr) == {"http_request_duration_seconds_bucket", "up", "ingest_last_record_timestamp_seconds"}


def test_every_metric_the_dashboard_queries_is_exposed(dashboard):
    used = {name for expr in expressions(dashboard) for name in metric_names(expr)}
    assert used >= REQUIRED
    assert used - exposed_names() == set()


def test_suffixes_follow_the_metric_type():
    names = exposed_names()
    assert {
        "ws_messages_sent_total",
        "ingest_batch_seconds_bucket",
        "ingest_batch_seconds_count",
        "ws_connections",
    } <= names
    assert not {"ws_connections_total", "ws_messages_sent_bucket", "ingest_batch_seconds"} & names


def test_every_query_uses_the_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["targets"], panel["title"]
        for holder in [panel, *panel["targets"]]:
            assert holder["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


@pytest.mark.django_db
def test_in_flight_counts_the_request_being_served(client):
    # /metrics is rendered while its own request is in flight: 1, then 1 again (it was let go).
    for _ in range(2):
        text = client.get("/metrics").content.decode()
        assert "\nhttp_requests_in_flight 1.0\n" in text
