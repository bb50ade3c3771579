"""Fuzz the client-frame parser: whatever arrives, the answer is a ProtocolError (an error frame), never a crash."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streaming import protocol
from streaming.protocol import OPS, Limits, ProtocolError, Request, request_parse

LIMITS = Limits(max_streams=100, max_messages_per_s=20, max_frame_bytes=16384, auth_deadline_s=10,
                max_snapshot=1000, max_throttle_ms=60000, send_queue=2000, max_connections_per_user=50,
                max_anon_connections_per_ip=100)  # fmt: skip
CODES = {protocol.BAD_JSON, protocol.UNKNOWN_OP, protocol.INVALID_STREAM, protocol.TOO_MANY_STREAMS,
         protocol.FRAME_TOO_LARGE}  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
streams = st.lists(st.sampled_from(["bars:1m:AAPL", "trades:MSFT", "bars:5m:BRK/B"]) | st.text(max_size=30),
                   max_size=5)  # fmt: skip
# Frames shaped like the protocol's, each field either well-typed or anything at all.
frames = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(OPS) | json_values,
        "id": st.integers() | st.text(max_size=80) | json_values,
        "streams": streams | json_values,
        "snapshot": st.integers(-5, 2000) | json_values,
        "throttle_ms": st.integers(-5, 70_000) | json_values,
        "resume": st.dictionaries(st.text(max_size=20), st.integers(-3, 10**16), max_size=3) | json_values,
        "token": st.text(max_size=250) | json_values,
    },
)


def parse(raw: str | bytes) -> Request | None:
    """request_parse's answer; None when it raised a ProtocolError with one of SPEC's codes."""
    error: ProtocolError | None = None
    try:
        request = request_parse(raw, LIMITS)
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.code in CODES, error.code
        assert error.message
        return None
    assert request.op in OPS
    assert request.id is None or isinstance(request.id, str | int)
    return request


@hsettings(max_examples=150, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_random_text_and_bytes_only_ever_raise_protocol_errors(raw):
    parse(raw)


@hsettings(max_examples=150, deadline=None)
@given(frames, st.data())
def test_truncated_frames_only_ever_raise_protocol_errors(body, data):
    text = json.dumps(body)
    cut = data.draw(st.integers(0, len(text)), label="cut")
    parse(text[:cut])
    raw = text.encode()
    parse(raw[: data.draw(st.integers(0, len(raw)), label="cut_bytes")])  # may end inside a UTF-8 sequence


@hsettings(max_examples=150, deadline=None)
@given(frames)
def test_whole_frames_parse_or_are_refused_with_a_code(body):
    request = parse(json.dumps(body))
    if request is not None and request.op == "subscribe":
        assert request.streams
        assert len(request.streams) <= LIMITS.max_streams
        assert 0 <= request.snapshot <= LIMITS.max_snapshot
        assert 0 <= request.throttle_ms <= LIMITS.max_throttle_ms
        assert all(name in request.streams for name in request.resume or {})


def test_oversized_frame_is_refused_before_parsing():
    assert parse("[" * (LIMITS.max_frame_bytes + 1)) is None
