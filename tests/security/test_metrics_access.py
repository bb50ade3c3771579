"""/metrics under production settings: a bearer token or a port of its own, never open by accident.

The gateway runs as the image runs it (``python -m streaming.server``) on loopback
ports; what a scraper and a stranger get is asked over real HTTP.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.checks import E_METRICS_OPEN, METRICS_OPEN
from ops.views import METRICS_BAD_CREDENTIALS, METRICS_NO_CREDENTIALS
from tests.chaos.servers import free_port
from tests.chaos.stack import GatewayFailed
from tests.test_security import METRICS_TOKEN, Server, _production, production_env, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PLAIN = {"DJANGO_ALLOWED_HOSTS": "localhost", "DJANGO_SECURE_SSL_REDIRECT": "false"}


@pytest.fixture(scope="module")
def with_token(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(production_env(**PLAIN), tmp_path_factory.mktemp("metrics") / "token.log")
    yield server
    server.stop()


def _is_exposition(body: bytes) -> bool:
    return b"# TYPE http_requests_total counter" in body


def test_metrics_need_the_bearer_token(with_token: Server) -> None:
    status, body = with_token.request("/metrics", {"Host": "localhost"})
    assert (status, body.decode()) == (401, METRICS_NO_CREDENTIALS)
    for wrong in (f"Bearer {METRICS_TOKEN}x", f"Bearer {METRICS_TOKEN[:-1]}", "Bearer x"):
        status, body = with_token.request("/metrics", {"Host": "localhost", "Authorization": wrong})
        assert (status, body.decode()) == (403, METRICS_BAD_CREDENTIALS), wrong
    status, body = with_token.request("/metrics", {"Host": "localhost", "Authorization": f"Token {METRICS_TOKEN}"})
    assert status == 401  # another scheme is no bearer
    status, body = with_token.request("/metrics", {"Host": "localhost", "Authorization": f"Bearer {METRICS_TOKEN}"})
    assert status == 200
    assert _is_exposition(body)


def test_prometheus_scrapes_a_pod_by_its_address(with_token: Server) -> None:
    """Prometheus sends the pod's address as Host, which ALLOWED_HOSTS does not list: /metrics still answers."""
    scrape = {"Host": "10.1.2.3:8000", "Authorization": f"Bearer {METRICS_TOKEN}"}
    status, body = with_token.request("/metrics", scrape)
    assert status == 200
    assert _is_exposition(body)
    assert with_token.request("/metrics", {"Host": "10.1.2.3:8000"})[0] == 401
    assert with_token.request("/healthz", {"Host": "10.1.2.3:8000"})[0] == 400  # anything else: the host check


def test_metrics_on_a_port_of_their_own(django_db_setup: None, tmp_path: Path) -> None:
    metrics_port = free_port()
    env = production_env(**PLAIN, METRICS_TOKEN="", METRICS_PORT=str(metrics_port))
    server = start_server(env, tmp_path / "port.log", args=("-e", f"tcp:port={metrics_port}:interface=127.0.0.1"))
    try:
        assert server.request("/metrics", {"Host": "localhost"})[0] == 404  # not on the public port
        status, body = server.request("/metrics", {"Host": "10.1.2.3:9100"}, port=metrics_port)
        assert status == 200
        assert _is_exposition(body)
        assert server.request("/healthz", {"Host": "localhost"}, port=metrics_port)[0] == 404  # nothing else there
        assert server.request("/v1/symbols", {"Host": "localhost"}, port=metrics_port)[0] == 404
        assert server.request("/healthz", {"Host": "localhost"})[0] == 200
    finally:
        server.stop()


def test_production_refuses_to_start_with_metrics_open(django_db_setup: None, tmp_path: Path) -> None:
    env = production_env(**PLAIN, METRICS_TOKEN="")
    with pytest.raises(GatewayFailed, match="did not start") as refused:
        start_server(env, tmp_path / "open.log")
    assert E_METRICS_OPEN in str(refused.value)
    assert METRICS_OPEN in str(refused.value)

    result = _production([sys.executable, "manage.py", "check", "--deploy"], METRICS_TOKEN="")
    assert result.returncode != 0
    assert f"({E_METRICS_OPEN}) {METRICS_OPEN}" in result.stderr


def test_an_operator_may_open_metrics_on_purpose(django_db_setup: None, tmp_path: Path) -> None:
    server = start_server(production_env(**PLAIN, METRICS_TOKEN="", METRICS_PUBLIC="true"), tmp_path / "public.log")
    try:
        status, body = server.request("/metrics", {"Host": "localhost"})
        assert status == 200
        assert _is_exposition(body)
    finally:
        server.stop()
