"""Helpers for the gateway tests: a WebsocketCommunicator on the real ASGI app, and publishing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from channels.testing import WebsocketCommunicator

from config.asgi import application
from marketdata.wire import bar_json
from streaming.publish import Message, Publisher

T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def bar_data(i: int, *, final: bool = True, volume: int = 100, tf: timedelta = timedelta(minutes=1)) -> str:
    """A BAR's JSON text for the i-th bar after T0 (prices 100 + i)."""
    price = (100 + i) * 1_000_000_000
    return bar_json(T0 + i * tf, price, price + 500_000_000, price - 250_000_000, price, volume, 0, final)


def publish(stream: str, datas: list[str], kind: str = "bar") -> int:
    """Publish data texts on a stream as one batch; the stream's last seq."""
    publisher = Publisher()
    try:
        return publisher.publish([Message(stream, kind, d) for d in datas])[stream]
    finally:
        publisher.close()


class Client:
    """A protocol client over Channels' WebsocketCommunicator (the full ASGI stack)."""

    def __init__(self, path: str = "/ws/v1/stream", headers: list[tuple[bytes, bytes]] | None = None, **scope: Any):
        self.comm = WebsocketCommunicator(application, path, headers=headers or [])
        self.comm.scope.update(scope)
        self.closed_code: int | None = None

    async def connect(self) -> dict[str, Any]:
        connected, _ = await self.comm.connect(timeout=5)
        assert connected
        return await self.recv()

    async def send(self, body: dict[str, Any] | str) -> None:
        await self.comm.send_to(text_data=body if isinstance(body, str) else json.dumps(body))

    async def recv(self, wait: float = 5) -> dict[str, Any]:
        message = await self.comm.receive_output(wait)
        if message["type"] == "websocket.close":
            self.closed_code = message.get("code")
            return {"type": "__closed__", "code": self.closed_code}
        return json.loads(message["text"])

    async def recv_type(
        self, kind: str, wait: float = 5, skip: tuple[str, ...] = ("heartbeat", "status", "subscribed")
    ) -> dict[str, Any]:
        """The next message of a type, skipping heartbeats, status and subscribe replies."""
        while True:
            message = await self.recv(wait)
            if message["type"] == kind:
                return message
            assert message["type"] in skip, message

    async def recv_until(self, kind: str, wait: float = 5) -> list[dict[str, Any]]:
        """Messages up to and including the first of a type (heartbeats dropped)."""
        out = []
        while True:
            message = await self.recv(wait)
            if message["type"] == "heartbeat":
                continue
            out.append(message)
            if message["type"] == kind:
                return out

    async def nothing(self, wait: float = 0.3) -> bool:
        return await self.comm.receive_nothing(wait)

    async def close(self) -> None:
        await self.comm.disconnect()
