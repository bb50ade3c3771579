"""The baseline of bench/fanout.py: a stock Channels consumer forwarding the same groups.

What a Channels tutorial would write: a plain ``AsyncWebsocketConsumer`` with Channels'
own dispatch (including the ``aclose_old_connections`` hop to a thread before every
handler) that, on a subscribe op, joins each stream's group and answers ``subscribed``
with the stream's current seq, and whose ``stream_frames`` handler sends each frame of
a published batch as it is. It speaks just enough of SPEC section 5 for the benchmark's
clients (welcome, subscribed, the frames, error) and reads nothing from the database.
It receives exactly what the gateway receives: ``streaming.publish`` publishes each
batch to the stream's Channels group, and both join the same groups on the same Redis.

Served as its own ASGI application (the same middleware and path as ``config.asgi``)::

    python -m daphne -b 127.0.0.1 -p 8001 bench._stock:application
    python -m uvicorn --ws websockets --lifespan off --port 8001 bench._stock:application
"""

from __future__ import annotations

import json
import os
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
django.setup()

import redis.asyncio as aioredis  # noqa: E402
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import path  # noqa: E402

from marketdata.errors import ValidationError  # noqa: E402
from streaming.publish import SEQ_KEY, message_frames  # noqa: E402
from streaming.streams import group_name, stream_parse  # noqa: E402

WELCOME = json.dumps({"type": "welcome", "protocol": 1, "heartbeat_s": 20, "limits": {}})
_redis: aioredis.Redis | None = None


def seq_client() -> aioredis.Redis:
    """One Redis client per server process (one event loop) for reading current seqs."""
    global _redis
    if _redis is None:
        # Blocking: redis-py's default pool refuses the 101st concurrent command ("Too many
        # connections"), which a burst of subscribes reaches; this one waits for a connection.
        pool = aioredis.BlockingConnectionPool.from_url(settings.REDIS_URL, max_connections=50, timeout=30)
        _redis = aioredis.Redis(connection_pool=pool)
    return _redis


class StockStreamConsumer(AsyncWebsocketConsumer):
    """Join the groups a client subscribes to; send each published frame as it comes."""

    groups_joined: list[str]

    async def connect(self) -> None:
        self.groups_joined = []
        await self.accept()
        await self.send(text_data=WELCOME)

    async def disconnect(self, code: int) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            msg = json.loads(text_data or "")
        except ValueError:
            await self.error(None, "bad_json", "not JSON")
            return
        op_id = msg.get("id") if isinstance(msg, dict) else None
        if not isinstance(msg, dict) or msg.get("op") != "subscribe" or not isinstance(msg.get("streams"), list):
            await self.error(op_id, "unknown_op", "only subscribe is served here")
            return
        for name in msg["streams"]:
            try:
                stream = stream_parse(name).name
            except ValidationError as exc:
                await self.error(op_id, "invalid_stream", str(exc))
                continue
            group = group_name(stream)
            # Join first, then read the seq: a frame published in between is at or below
            # the seq and the client drops it, so nothing falls between the two.
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.append(group)
            seq = int(await seq_client().get(SEQ_KEY.format(stream=stream)) or 0)
            reply: dict[str, Any] = {"type": "subscribed", "id": op_id, "stream": stream, "seq": seq, "snapshot": []}
            await self.send(text_data=json.dumps(reply))

    async def stream_frames(self, message: dict[str, Any]) -> None:
        for frame in message_frames(message):
            await self.send(text_data=frame)

    async def error(self, op_id: Any, code: str, text: str) -> None:
        await self.send(text_data=json.dumps({"type": "error", "id": op_id, "code": code, "message": text}))


application = ProtocolTypeRouter(
    {"websocket": AuthMiddlewareStack(URLRouter([path("ws/v1/stream", StockStreamConsumer.as_asgi())]))}
)
