"""Logs: no token or Authorization header in any line the gateway writes, while every request is logged.

The gateway runs as the image runs it (``python -m streaming.server``, production
settings) on a loopback port; REST and WebSocket requests carry secrets in the query
(``?token=``), in ``Authorization`` and in a ``/metrics`` scrape. Every line the process
writes, stdout and stderr alike, is searched for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from ops.redaction import REDACTED, redact
from tests.test_security import METRICS_TOKEN, Server, production_env, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

QUERY_SECRET = "mdg_" + secrets.token_urlsafe(32)
BEARER_SECRET = "jwt." + secrets.token_urlsafe(24)
TOKEN_SECRET = "mdg_" + secrets.token_urlsafe(32)
SECRETS = (QUERY_SECRET, BEARER_SECRET, TOKEN_SECRET, METRICS_TOKEN)


@pytest.fixture(scope="module")
def gateway(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = production_env(
        DJANGO_ALLOWED_HOSTS="localhost,127.0.0.1", DJANGO_SECURE_SSL_REDIRECT="false", LOG_LEVEL="INFO"
    )
    server = start_server(env, tmp_path_factory.mktemp("logs") / "gateway.log")
    yield server
    server.stop()


def _lines(server: Server) -> list[str]:
    return server.output().splitlines()


def _events(server: Server) -> list[dict[str, Any]]:
    events = []
    for line in _lines(server):
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


async def _websocket(server: Server, query: str, headers: dict[str, str]) -> None:
    """Open the stream with credentials, say something, and close (whatever the gateway answers)."""
    url = f"ws://127.0.0.1:{server.port}/ws/v1/stream?{query}"
    with contextlib.suppress(WebSocketException, OSError, TimeoutError):
        async with asyncio.timeout(10), connect(url, additional_headers=headers, open_timeout=10) as ws:
            await ws.send(json.dumps({"op": "auth", "token": TOKEN_SECRET}))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    async for _ in ws:
                        pass


def _wait_for(server: Server, predicate: Any, what: str) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [e for e in _events(server) if predicate(e)]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no log line for {what}:\n" + "\n".join(_lines(server)[-30:]))


def test_no_secret_in_any_line_and_every_request_logged(gateway: Server) -> None:
    for path in (f"/v1/symbols?token={QUERY_SECRET}", f"/healthz?a=1&token={QUERY_SECRET}&b=2",
                 f"/nowhere?access_token={QUERY_SECRET}"):  # fmt: skip
        for headers in ({"Authorization": f"Bearer {BEARER_SECRET}"}, {"Authorization": f"Token {TOKEN_SECRET}"}):
            gateway.request(path, headers)
    gateway.request("/metrics", {"Authorization": f"Bearer {METRICS_TOKEN}"})
    asyncio.run(_websocket(gateway, f"token={QUERY_SECRET}", {"Authorization": f"Bearer {BEARER_SECRET}"}))
    asyncio.run(_websocket(gateway, f"x=1&token={QUERY_SECRET}", {"Authorization": f"Token {TOKEN_SECRET}"}))

    # Each request is logged, its query kept but for the token.
    symbols = _wait_for(gateway, lambda e: str(e.get("path", "")).startswith("/v1/symbols"), "GET /v1/symbols")
    assert symbols["path"] == f"/v1/symbols?token={REDACTED}"
    assert symbols["method"] == "GET"
    assert symbols["status"] == 401
    health = _wait_for(gateway, lambda e: str(e.get("path", "")).startswith("/healthz"), "GET /healthz")
    assert health["path"] == f"/healthz?a=1&token={REDACTED}&b=2"
    _wait_for(gateway, lambda e: e.get("path") == f"/nowhere?access_token={REDACTED}", "GET /nowhere")
    _wait_for(gateway, lambda e: e.get("path") == "/metrics" and e.get("status") == 200, "GET /metrics")
    _wait_for(gateway, lambda e: e.get("event") == "ws_disconnected", "the WebSocket's close")
    _wait_for(gateway, lambda e: str(e.get("path", "")).startswith("/ws/v1/stream"), "the WebSocket")

    gateway.stop()  # everything flushed, shutdown lines included
    leaks = [line for line in _lines(gateway) if any(s in line for s in SECRETS)]
    assert leaks == []
    assert not any("authorization" in line.lower() for line in _lines(gateway))


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("/v1/ohlcv?symbol=AAPL&token=abc.def-1", f"/v1/ohlcv?symbol=AAPL&token={REDACTED}"),
        ("GET /ws/v1/stream?token=abc HTTP/1.1", f"GET /ws/v1/stream?token={REDACTED} HTTP/1.1"),
        ("/x?access_token=a%20b&api_token=c;d", f"/x?access_token={REDACTED}&api_token={REDACTED};d"),
        ("/x?TOKEN=abc", f"/x?TOKEN={REDACTED}"),
        ("Authorization: Bearer eyJhbGciOi.eyJzdWIiOiIx.c2lnbmF0dXJl", f"Authorization: Bearer {REDACTED}"),
        ("Basic dXNlcjpwYXNzd29yZDEyMw==", f"Basic {REDACTED}"),
        ("token validation failed", "token validation failed"),
        ("sent 'Token mdg_" + "a" * 43 + "'", f"sent 'Token {REDACTED}'"),
        ("a bare mdg_" + "B" * 43 + " token", f"a bare {REDACTED} token"),
        ("token expired", "token expired"),  # words are not secrets
        ("/v1/symbols?cursor=abc", "/v1/symbols?cursor=abc"),
    ],
)
def test_redact(text: str, redacted: str) -> None:
    assert redact(text) == redacted


def test_redaction_reaches_every_line_of_the_json_log(tmp_path: Path) -> None:
    """A line from any logger (stdlib or structlog), message, fields and traceback alike, goes out redacted."""
    import subprocess
    import sys

    from tests.test_security import ROOT

    probe = """
import logging, structlog, django
django.setup()
logging.getLogger("django.request").warning("Not Found: %s", "/x?token=SECRET1")
structlog.get_logger("x").info("call", url="/y?token=SECRET2", headers={"Authorization": "Bearer SECRET3"})
try:
    raise ValueError("bad /z?token=SECRET4")
except ValueError:
    logging.getLogger("y").exception("failed")
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=production_env(), capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert "Not Found: /x?token=" in out
    assert "failed" in out
    assert not [s for s in ("SECRET1", "SECRET2", "SECRET3", "SECRET4") if s in out], out
