"""WebSocket protocol v1 (SPEC section 5): reading client frames, writing server frames.

Pure functions, no I/O: the consumer calls them, and the fuzz tests feed them anything.
Reading never raises anything but ProtocolError, whose ``code`` is one of SPEC's error
codes; the socket stays open after any of them.

Choices where SPEC is silent (also in docs/WEBSOCKET.md):
- ``id`` is echoed when it is a string (at most 64 characters) or an integer.
- ``snapshot`` (bars or trades, newest last) defaults to 0; ``throttle_ms`` to 0 (every
  message); ``resume`` maps streams of the same message to the last seq the client holds.
- A JSON value that is not an object, or a field of the wrong type, is ``bad_json`` with
  a message naming the field; ``streams`` of the wrong type is ``invalid_stream``.
- ``{"op":"auth","token":"..."}`` authenticates a connection opened without credentials
  (a browser cannot set an Authorization header, and a token in a URL ends up in logs);
  the reply is ``{"type":"authenticated","id"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

PROTOCOL_VERSION = 1
OPS = ("subscribe", "unsubscribe", "ping", "auth")
ID_MAX_LENGTH = 64
TOKEN_MAX_LENGTH = 200

# Error codes (SPEC section 5).
BAD_JSON = "bad_json"
UNKNOWN_OP = "unknown_op"
INVALID_STREAM = "invalid_stream"
UNKNOWN_SYMBOL = "unknown_symbol"
NOT_ENTITLED = "not_entitled"
TOO_MANY_STREAMS = "too_many_streams"
RATE_LIMITED = "rate_limited"
FRAME_TOO_LARGE = "frame_too_large"
UNAUTHENTICATED = "unauthenticated"

# Close codes (SPEC section 5).
CLOSE_UNAUTHENTICATED = 4001
CLOSE_REFUSED = 4003
CLOSE_SLOW_CONSUMER = 4008
CLOSE_RATE = 4029

STATUSES = ("live", "stale", "replay")

# The largest seq a client may name: what JavaScript holds exactly (2^53 - 1). Seqs start
# near epoch ms x 1,000 (about 2^51), so a real one is always below it, and the buffer
# (Redis stream ids, 64 bits) is never asked past its range.
MAX_SEQ = 2**53 - 1
ERR_RESUME = "resume must map stream names to the last seq held (integers from 0 to 2^53 - 1)"


class ProtocolError(Exception):
    """A client message the server cannot act on; answered with an error frame."""

    def __init__(self, code: str, message: str, *, id: Any = None, stream: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.stream = stream


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed client message."""

    op: str
    id: str | int | None = None
    streams: tuple[str, ...] = ()
    snapshot: int = 0
    resume: dict[str, int] | None = None
    throttle_ms: int = 0
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """What the server allows one connection; announced in ``welcome``."""

    max_streams: int
    max_messages_per_s: int
    max_frame_bytes: int
    auth_deadline_s: float
    max_snapshot: int
    max_throttle_ms: int
    send_queue: int
    max_connections_per_user: int
    max_anon_connections_per_ip: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_streams": self.max_streams,
            "max_messages_per_s": self.max_messages_per_s,
            "max_frame_bytes": self.max_frame_bytes,
            "auth_deadline_s": self.auth_deadline_s,
            "max_snapshot": self.max_snapshot,
            "max_throttle_ms": self.max_throttle_ms,
            "send_queue": self.send_queue,
            "max_connections_per_user": self.max_connections_per_user,
            "max_anon_connections_per_ip": self.max_anon_connections_per_ip,
        }


def _int_field(body: dict[str, Any], name: str, lo: int, hi: int, id: Any) -> int:
    value = body.get(name, 0)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(BAD_JSON, f"{name} must be an integer from {lo} to {hi}, got {value!r}", id=id)
    return value


def request_parse(raw: str | bytes | None, limits: Limits) -> Request:
    """Read one client frame, or raise ProtocolError."""
    if raw is None:
        raise ProtocolError(BAD_JSON, "empty message: expected a JSON object")
    if len(raw) > limits.max_frame_bytes:
        raise ProtocolError(FRAME_TOO_LARGE, f"message of {len(raw)} bytes; the limit is {limits.max_frame_bytes}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(BAD_JSON, f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(BAD_JSON, f"expected a JSON object, got {type(body).__name__}")
    id = body.get("id")
    if id is not None and not (
        (isinstance(id, str) and len(id) <= ID_MAX_LENGTH) or (isinstance(id, int) and not isinstance(id, bool))
    ):
        raise ProtocolError(BAD_JSON, f"id must be a string of at most {ID_MAX_LENGTH} characters or an integer")
    op = body.get("op")
    if op not in OPS:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {op!r}: expected one of {', '.join(OPS)}", id=id)
    if op == "ping":
        return Request("ping", id)
    if op == "auth":
        token = body.get("token")
        if not isinstance(token, str) or not token or len(token) > TOKEN_MAX_LENGTH:
            raise ProtocolError(BAD_JSON, "token must be a non-empty string", id=id)
        return Request("auth", id, token=token)
    streams = body.get("streams")
    if isinstance(streams, str):
        streams = [streams]
    if not isinstance(streams, list) or not streams or not all(isinstance(s, str) for s in streams):
        raise ProtocolError(INVALID_STREAM, "streams must be a non-empty list of stream names", id=id)
    if len(streams) > limits.max_streams:
        raise ProtocolError(
            TOO_MANY_STREAMS, f"{len(streams)} streams in one message; the limit is {limits.max_streams}", id=id
        )
    unique = tuple(dict.fromkeys(streams))
    if op == "unsubscribe":
        return Request("unsubscribe", id, unique)
    snapshot = _int_field(body, "snapshot", 0, limits.max_snapshot, id)
    throttle_ms = _int_field(body, "throttle_ms", 0, limits.max_throttle_ms, id)
    resume = body.get("resume")
    if resume is not None:
        if not isinstance(resume, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEQ for v in resume.values()
        ):
            raise ProtocolError(BAD_JSON, ERR_RESUME, id=id)
        stray = [s for s in resume if s not in unique]
        if stray:
            raise ProtocolError(BAD_JSON, f"resume names {stray[0]!r}, which is not in streams", id=id)
    return Request("subscribe", id, unique, snapshot, resume or None, throttle_ms)


# -- server frames ------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _reply(kind: str, id: str | int | None, **fields: Any) -> str:
    """A server frame: its type, the id of the client message it answers (where there is one), then ``fields``."""
    head: dict[str, Any] = {"type": kind} if id is None else {"type": kind, "id": id}
    return _dumps({**head, **fields})


def _items(texts: list[str]) -> orjson.Fragment:
    """A snapshot's items, already JSON texts (marketdata.wire), spliced as an array."""
    return orjson.Fragment("[" + ",".join(texts) + "]")


def welcome(limits: Limits, heartbeat_s: int, *, authenticated: bool) -> str:
    return _dumps(
        {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "heartbeat_s": heartbeat_s,
            "limits": limits.as_dict(),
            "authenticated": authenticated,
        }
    )


def subscribed(id: str | int | None, stream: str, seq: int, snapshot: list[str]) -> str:
    """``snapshot`` holds the items' JSON texts, oldest first."""
    return _reply("subscribed", id, stream=stream, seq=seq, snapshot=_items(snapshot))


def resumed(id: str | int | None, stream: str, seq: int, snapshot: list[str] | None) -> str:
    """recovered is true when there is no snapshot: the missed messages went before this."""
    if snapshot is None:
        return _reply("resumed", id, stream=stream, recovered=True, seq=seq)
    return _reply("resumed", id, stream=stream, recovered=False, seq=seq, snapshot=_items(snapshot))


def unsubscribed(id: str | int | None, stream: str) -> str:
    return _reply("unsubscribed", id, stream=stream)


def pong(id: str | int | None) -> str:
    return _reply("pong", id)


def authenticated(id: str | int | None) -> str:
    return _reply("authenticated", id)


def heartbeat(ts: str) -> str:
    return _reply("heartbeat", None, ts=ts)


def status(stream: str, state: str, message: str) -> str:
    return _dumps({"type": "status", "stream": stream, "status": state, "message": message})


def error(code: str, message: str, *, id: str | int | None = None, stream: str | None = None) -> str:
    body: dict[str, Any] = {"type": "error"}
    if id is not None:
        body["id"] = id
    body["code"] = code
    body["message"] = message
    if stream is not None:
        body["stream"] = stream
    return _dumps(body)
