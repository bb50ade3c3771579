"""Liveness, readiness (against the real PostgreSQL and Redis), metrics and request ids."""

from __future__ import annotations

import json
import socket

import pytest

pytestmark = pytest.mark.django_db


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_ok_with_database_and_redis(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readyz_503_names_redis_when_unreachable(client, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{_closed_port()}/0"
    response = client.get("/readyz")
    assert response.status_code == 503
    body = json.loads(response.content)
    assert body["failing"] == ["redis"]
    assert body["checks"]["database"] == "ok"
    assert "ConnectionError" in body["checks"]["redis"]


def test_metrics_exposes_request_counts(client):
    client.get("/healthz")
    text = client.get("/metrics").content.decode()
    assert 'http_requests_total{method="GET",route="healthz",status="2xx"}' in text


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"})["X-Request-ID"] == "abc-123"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})["X-Request-ID"]
    assert len(made) == 32


def test_static_files_are_served(client):
    response = client.get("/static/admin/css/base.css")
    assert response.status_code == 200


def test_readyz_names_a_live_feed_that_stopped(client):
    from datetime import timedelta

    from django.utils import timezone

    from marketdata.models import FeedStatus

    now = timezone.now()
    FeedStatus.objects.create(dataset="XNAS.ITCH", schema="ohlcv-1m", source="live", last_batch_at=now)
    FeedStatus.objects.create(
        dataset="GLBX.MDP3", schema="trades", source="replay", last_batch_at=now - timedelta(days=3)
    )
    assert client.get("/readyz").status_code == 200  # a finished replay is not expected to write

    FeedStatus.objects.filter(dataset="XNAS.ITCH").update(last_batch_at=now - timedelta(minutes=10))
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["feed XNAS.ITCH ohlcv-1m"]
    assert body["checks"]["feed XNAS.ITCH ohlcv-1m"].startswith("no data for 600 s")
