"""Request ids and W3C trace ids in every log line: HTTP requests and WebSocket connections.

Log lines are captured through the JSON formatter the settings configure (structlog's
ProcessorFormatter on the root handler), so what is asserted is what reaches stdout.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from marketdata.models import Symbol
from streaming.hub import Hub
from tests.streaming.wsclient import Client, bar_data, publish

TRACE_A = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACE_B = "0af7651916cd43dd8448eb211c80319c"
SPAN = "00f067aa0ba902b7"


def traceparent(trace_id: str) -> tuple[bytes, bytes]:
    return (b"traceparent", f"00-{trace_id}-{SPAN}-01".encode())


@pytest.fixture
def json_logs() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Every log line (parsed) emitted while the test runs, rendered by the configured formatter."""
    root = logging.getLogger()
    formatter = next(h.formatter for h in root.handlers if isinstance(h.formatter, structlog.stdlib.ProcessorFormatter))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.django_db
def test_http_log_lines_carry_the_request_and_trace_ids(client, json_logs):
    response = client.get("/no-such-page", headers={"traceparent": f"00-{TRACE_A}-{SPAN}-01", "X-Request-ID": "req-1"})
    assert response.status_code == 404
    line = next(e for e in json_logs() if e.get("logger") == "django.request")
    assert (line["trace_id"], line["parent_span_id"], line["request_id"]) == (TRACE_A, SPAN, "req-1")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("redis_client")
async def test_websocket_log_lines_carry_the_connection_trace_id_in_every_task(settings, json_logs):
    """The 4008 close is logged by the connection's channel-layer task, started after the handshake."""
    await Symbol.objects.acreate(ticker="AAPL", dataset="XNAS.ITCH")
    settings.WS_SEND_QUEUE = 20
    slow = Client(headers=[traceparent(TRACE_A)], extensions={"marketdata.transport": {"buffered": lambda: 10**9}})
    other = Client(headers=[traceparent(TRACE_B), (b"x-request-id", b"conn-b")])
    assert (await slow.comm.connect(timeout=5))[0]
    await other.connect()
    await slow.send({"op": "subscribe", "id": 1, "streams": ["bars:1m:AAPL"]})
    await asyncio.sleep(0.5)  # subscribed; its reply is stuck behind the full socket
    for i in range(4):
        publish("bars:1m:AAPL", [bar_data(i * 10 + j) for j in range(10)])
    assert (await slow.comm.receive_output(5))["code"] == 4008
    await other.send({"op": "subscribe", "id": 2, "streams": ["bars:1m:NOPE"]})
    await other.recv_type("error")
    await other.close()

    closes = [e for e in json_logs() if e["event"] == "websocket closed by the server"]
    assert [(e["code"], e["trace_id"], e["parent_span_id"], e["path"]) for e in closes] == [
        (4008, TRACE_A, SPAN, "/ws/v1/stream")
    ]
    assert len(closes[0]["request_id"]) == 32  # made up: the handshake had none


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("redis_client")
async def test_a_close_by_the_shared_timer_carries_the_closed_connections_ids(settings, json_logs, monkeypatch):
    """The hub's one timer closes both connections at their auth deadline: each line names its own.

    The timer is shared by every connection of the process, so its own lines carry none
    (though the first connection started it).
    """
    refresh = Hub.refresh_states

    async def refresh_logged(self: Hub) -> None:
        logging.getLogger("probe").info("hub timer")
        await refresh(self)

    monkeypatch.setattr(Hub, "refresh_states", refresh_logged)
    settings.STREAMING_ALLOW_ANONYMOUS = False
    settings.WS_AUTH_DEADLINE_S = 1
    first = Client(headers=[traceparent(TRACE_A), (b"x-request-id", b"conn-a")])
    second = Client(headers=[traceparent(TRACE_B), (b"x-request-id", b"conn-b")])
    await first.connect()
    await second.connect()
    for client in (first, second):
        assert (await client.recv_type("__closed__", wait=5, skip=("heartbeat",)))["code"] == 4001

    closes = {e["request_id"]: e["trace_id"] for e in json_logs() if e["event"] == "websocket closed by the server"}
    assert closes == {"conn-a": TRACE_A, "conn-b": TRACE_B}
    timer = [e for e in json_logs() if e["event"] == "hub timer"]
    assert timer
    assert not any("trace_id" in e or "request_id" in e for e in timer)
