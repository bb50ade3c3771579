"""Protocol v1 (SPEC section 5): every op, reply and error code, through the full ASGI app."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from channels.db import database_sync_to_async
from django.test import override_settings

from marketdata.models import FeedStatus, Symbol
from marketdata.services.bars_trades import BarIn, bars_upsert
from streaming import protocol
from streaming.publish import BUFFER_KEY
from tests.streaming.wsclient import T0, Client, bar_data, publish

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("redis_client")]

STREAM = "bars:1m:AAPL"


@pytest.fixture
def symbols(transactional_db: None) -> dict[str, Symbol]:
    return {
        "AAPL": Symbol.objects.create(ticker="AAPL", dataset="XNAS.ITCH"),
        "MSFT": Symbol.objects.create(ticker="MSFT", dataset="XNAS.ITCH"),
        "ESH4": Symbol.objects.create(ticker="ESH4", dataset="GLBX.MDP3"),
    }


async def test_welcome_announces_protocol_heartbeat_and_limits(symbols):
    client = Client()
    welcome = await client.connect()
    assert welcome["type"] == "welcome"
    assert welcome["protocol"] == 1
    assert welcome["heartbeat_s"] == 20
    assert set(welcome["limits"]) >= {"max_streams", "max_messages_per_s", "max_frame_bytes", "auth_deadline_s"}
    await client.close()


async def test_ping_pong_echoes_the_id(symbols):
    client = Client()
    await client.connect()
    await client.send({"op": "ping", "id": 5})
    assert await client.recv() == {"type": "pong", "id": 5}
    await client.send({"op": "ping", "id": "abc"})
    assert await client.recv() == {"type": "pong", "id": "abc"}
    await client.close()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_json"),
        ({"op": "dance", "id": 1}, "unknown_op"),
        ({"id": 1}, "unknown_op"),
        ({"op": "subscribe", "id": 1, "streams": "nope"}, "invalid_stream"),
        ({"op": "subscribe", "id": 1, "streams": []}, "invalid_stream"),
        ({"op": "subscribe", "id": 1, "streams": [STREAM], "snapshot": -1}, "bad_json"),
        ({"op": "subscribe", "id": 1, "streams": [STREAM], "snapshot": 10**6}, "bad_json"),
        ({"op": "subscribe", "id": 1, "streams": [STREAM], "throttle_ms": "fast"}, "bad_json"),
        ({"op": "subscribe", "id": 1, "streams": [STREAM], "resume": {"trades:AAPL": 3}}, "bad_json"),
        ({"op": "subscribe", "id": 1, "streams": [STREAM], "resume": {STREAM: -3}}, "bad_json"),
        ({"op": "ping", "id": {"x": 1}}, "bad_json"),
        ("x" * 20000, "frame_too_large"),
    ],
)
async def test_a_bad_message_gets_an_error_and_the_socket_stays_open(symbols, body, code):
    client = Client()
    await client.connect()
    await client.send(body)
    error = await client.recv()
    assert error["type"] == "error"
    assert error["code"] == code
    assert error["message"]
    await client.send({"op": "ping", "id": 2})
    assert await client.recv() == {"type": "pong", "id": 2}
    await client.close()


async def test_stream_errors_name_the_stream(symbols):
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 3, "streams": ["bars:7m:AAPL", "bars:1m:ZZZZ", "quotes:AAPL"]})
    errors = [await client.recv() for _ in range(3)]
    assert [(e["code"], e["stream"], e["id"]) for e in errors] == [
        ("invalid_stream", "bars:7m:AAPL", 3),
        ("unknown_symbol", "bars:1m:ZZZZ", 3),
        ("invalid_stream", "quotes:AAPL", 3),
    ]
    await client.close()


async def test_subscribe_snapshot_then_consecutive_live_messages(symbols):
    await database_sync_to_async(bars_upsert)(
        bars=[
            BarIn(symbols["AAPL"].pk, "1m", T0 + timedelta(minutes=i), 1, p, p, p, p, 100)
            for i in range(5)
            for p in [(100 + i) * 10**9]
        ]
    )
    # Bars 3 and 4 were published too (they are in the buffer); bar 5 is published but not in the database.
    publish(STREAM, [bar_data(3), bar_data(4)])
    publish(STREAM, [bar_data(5, final=False)])
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM], "snapshot": 4})
    reply = await client.recv_type("subscribed")
    assert reply["id"] == 1
    assert reply["stream"] == STREAM
    assert reply["seq"] == 3
    assert [b["ts"] for b in reply["snapshot"]] == [
        "2024-01-02T14:32:00Z",
        "2024-01-02T14:33:00Z",
        "2024-01-02T14:34:00Z",
        "2024-01-02T14:35:00Z",
    ]
    assert reply["snapshot"][-1]["final"] is False
    assert reply["snapshot"][0]["open"] == 102
    status = await client.recv_type("status")
    assert status["stream"] == STREAM
    assert status["status"] == "stale"
    publish(STREAM, [bar_data(5), bar_data(6, final=False)])
    first, second = await client.recv_type("bar"), await client.recv_type("bar")
    assert (first["seq"], first["data"]["final"], second["seq"]) == (4, True, 5)
    await client.close()


async def test_trades_snapshot_from_buffer_and_database(symbols):
    from marketdata.services.bars_trades import TradeIn, trades_insert

    stream = "trades:AAPL"
    ts = [T0 + timedelta(seconds=i) for i in range(6)]
    await database_sync_to_async(trades_insert)(
        trades=[TradeIn(symbols["AAPL"].pk, t, t, 1, i, 0, (189 + i) * 10**9, 100, "B") for i, t in enumerate(ts[:4])]
    )
    from marketdata.wire import trade_json

    publish(stream, [trade_json(t, (189 + i) * 10**9, 100, "B") for i, t in enumerate(ts) if i >= 3], kind="trade")
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [stream], "snapshot": 5})
    reply = await client.recv_type("subscribed")
    assert reply["seq"] == 3
    assert [t["price"] for t in reply["snapshot"]] == [190, 191, 192, 193, 194]
    await client.close()


async def test_resume_recovers_every_missed_message_in_order(symbols):
    publish(STREAM, [bar_data(i) for i in range(3)])
    publish(STREAM, [bar_data(i) for i in range(3, 8)])
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 2, "streams": [STREAM], "resume": {STREAM: 2}})
    messages = await client.recv_until("resumed")
    assert [m["seq"] for m in messages[:-1]] == [3, 4, 5, 6, 7, 8]
    assert messages[-1] == {"type": "resumed", "id": 2, "stream": STREAM, "recovered": True, "seq": 8}
    publish(STREAM, [bar_data(8)])
    assert (await client.recv_type("bar"))["seq"] == 9
    await client.close()


async def test_resume_up_to_date_recovers_nothing(symbols):
    publish(STREAM, [bar_data(0)])
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 2, "streams": [STREAM], "resume": {STREAM: 1}})
    assert await client.recv_type("resumed") == {
        "type": "resumed", "id": 2, "stream": STREAM, "recovered": True, "seq": 1,
    }  # fmt: skip
    await client.close()


async def test_resume_beyond_the_buffer_gets_a_fresh_snapshot(symbols, redis_client):
    publish(STREAM, [bar_data(i) for i in range(5)])
    redis_client.delete(BUFFER_KEY.format(stream=STREAM))  # the buffer no longer reaches back
    publish(STREAM, [bar_data(5)])
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 2, "streams": [STREAM], "resume": {STREAM: 2}, "snapshot": 10})
    reply = await client.recv_type("resumed")
    assert reply["recovered"] is False
    assert reply["seq"] == 6
    assert [b["ts"] for b in reply["snapshot"]] == ["2024-01-02T14:35:00Z"]
    # A seq from before Redis lost its data (beyond the last) is not recoverable either.
    await client.send({"op": "subscribe", "id": 3, "streams": [STREAM], "resume": {STREAM: 99}})
    reply = await client.recv_type("resumed")
    assert (reply["id"], reply["recovered"], reply["seq"]) == (3, False, 6)
    await client.close()


async def test_throttle_conflates_to_the_latest_message(symbols):
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM], "throttle_ms": 300})
    await client.recv_type("subscribed")
    for i in range(10):
        publish(STREAM, [bar_data(i)])
    first = await client.recv_type("bar")
    last = await client.recv_type("bar")
    assert first["seq"] == 1  # the first goes at once
    assert last["seq"] == 10  # then one per interval: the latest
    assert await client.nothing(0.5)
    await client.close()


async def test_unsubscribe_stops_the_stream(symbols):
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM, "trades:AAPL"]})
    await client.recv_type("subscribed")
    await client.recv_type("subscribed")
    await client.send({"op": "unsubscribe", "id": 4, "streams": ["trades:AAPL"]})
    assert await client.recv_type("unsubscribed") == {"type": "unsubscribed", "id": 4, "stream": "trades:AAPL"}
    publish("trades:AAPL", ['{"ts":"2024-01-02T14:30:00Z","price":1,"size":1,"side":"B"}'], kind="trade")
    publish(STREAM, [bar_data(0)])
    assert (await client.recv_type("bar"))["stream"] == STREAM
    assert await client.nothing()
    await client.close()


@override_settings(WS_MAX_STREAMS=2)
async def test_too_many_streams(symbols):
    client = Client()
    welcome = await client.connect()
    assert welcome["limits"]["max_streams"] == 2
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM, "trades:AAPL", "trades:MSFT"]})
    error = await client.recv()
    assert (error["type"], error["code"]) == ("error", "too_many_streams")
    await client.send({"op": "subscribe", "id": 2, "streams": [STREAM, "trades:AAPL"]})
    await client.recv_type("subscribed")
    await client.recv_type("subscribed")
    await client.send({"op": "subscribe", "id": 3, "streams": ["trades:MSFT"]})
    error = await client.recv_type("error")
    assert (error["code"], error["stream"]) == ("too_many_streams", "trades:MSFT")
    await client.close()


@override_settings(WS_MAX_MESSAGES_PER_S=3, WS_RATE_CLOSE_FACTOR=4)
async def test_rate_limited_then_closed_4029(symbols):
    client = Client()
    await client.connect()
    for i in range(5):
        await client.send({"op": "ping", "id": i})
    replies = [await client.recv() for _ in range(5)]
    assert [r["type"] for r in replies] == ["pong"] * 3 + ["error"] * 2
    assert replies[-1]["code"] == "rate_limited"
    for i in range(20):
        await client.send({"op": "ping", "id": i})
    while (message := await client.recv())["type"] != "__closed__":
        pass
    assert message["code"] == protocol.CLOSE_RATE


async def test_gap_on_the_pubsub_path_is_filled_from_the_buffer(symbols, monkeypatch):
    from streaming import publish as publish_module

    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM]})
    assert (await client.recv_type("subscribed"))["seq"] == 0
    # Seqs 1-2 reach the buffer but not the group (as when a pub/sub message is lost).
    import dataclasses

    head = publish_module._stream_head
    nobody = publish_module._command(b"PUBLISH", b"nobody-listens", b"")[: -len(b"$0\r\n\r\n")]
    monkeypatch.setattr(publish_module, "_stream_head", lambda *key: dataclasses.replace(head(*key), publish=nobody))
    publish(STREAM, [bar_data(0), bar_data(1)])
    monkeypatch.undo()
    publish(STREAM, [bar_data(2)])
    assert [(await client.recv_type("bar"))["seq"] for _ in range(3)] == [1, 2, 3]
    await client.close()


async def test_gap_beyond_the_buffer_gets_a_fresh_snapshot(symbols, monkeypatch, redis_client):
    from streaming import publish as publish_module

    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM], "snapshot": 5})
    await client.recv_type("subscribed")
    import dataclasses

    head = publish_module._stream_head
    nobody = publish_module._command(b"PUBLISH", b"nobody-listens", b"")[: -len(b"$0\r\n\r\n")]
    monkeypatch.setattr(publish_module, "_stream_head", lambda *key: dataclasses.replace(head(*key), publish=nobody))
    publish(STREAM, [bar_data(0), bar_data(1)])
    monkeypatch.undo()
    redis_client.delete(BUFFER_KEY.format(stream=STREAM))
    publish(STREAM, [bar_data(2)])
    reply = await client.recv_type("resumed")
    assert ("id" not in reply, reply["recovered"], reply["seq"]) == (True, False, 3)
    assert [b["ts"] for b in reply["snapshot"]] == ["2024-01-02T14:32:00Z"]
    publish(STREAM, [bar_data(3)])
    assert (await client.recv_type("bar"))["seq"] == 4
    await client.close()


async def test_status_live_replay_and_stale(symbols):
    now = datetime.now(UTC)
    await database_sync_to_async(FeedStatus.objects.create)(
        dataset="XNAS.ITCH", schema="ohlcv-1m", source="live", last_batch_at=now
    )
    await database_sync_to_async(FeedStatus.objects.create)(
        dataset="GLBX.MDP3", schema="ohlcv-1m", source="replay", last_batch_at=now
    )
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM, "bars:1m:ESH4"]})
    statuses: dict[str, str] = {}
    while len(statuses) < 2:
        message = await client.recv()
        if message["type"] == "status":
            statuses[message["stream"]] = message["status"]
    assert statuses == {STREAM: "live", "bars:1m:ESH4": "replay"}
    await client.close()


@override_settings(WS_STATUS_POLL_S=0.1)
async def test_status_turns_stale_when_the_feed_stops(symbols):
    feed = await database_sync_to_async(FeedStatus.objects.create)(
        dataset="XNAS.ITCH", schema="ohlcv-1m", source="live", last_batch_at=datetime.now(UTC)
    )
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM]})
    assert (await client.recv_type("status"))["status"] == "live"
    feed.last_batch_at = datetime.now(UTC) - timedelta(hours=1)
    await database_sync_to_async(feed.save)()
    status = await client.recv_type("status", wait=5)
    assert status["status"] == "stale"
    assert "stopped" in status["message"]
    await client.close()


async def test_heartbeat(symbols, settings):
    settings.WS_HEARTBEAT_S = 1
    client = Client()
    welcome = await client.connect()
    assert welcome["heartbeat_s"] == 1
    beat = await client.recv(wait=4)
    assert beat["type"] == "heartbeat"
    assert beat["ts"].endswith("Z")
    await client.close()


async def test_slow_consumer_is_closed_4008(symbols, settings):
    settings.WS_SEND_QUEUE = 50
    # A socket that never drains: the transport extension says it holds a lot.
    client = Client(extensions={"marketdata.transport": {"buffered": lambda: 10**9}})
    connected, _ = await client.comm.connect(timeout=5)
    assert connected
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM]})
    await asyncio.sleep(0.5)  # subscribed (its reply is stuck behind the full socket)
    for i in range(6):
        publish(STREAM, [bar_data(i * 10 + j) for j in range(10)])
    message = await client.comm.receive_output(5)
    assert message == {"type": "websocket.close", "code": 4008, "reason": "slow consumer: send queue overflowed"}


async def test_subscribing_again_sends_a_new_snapshot_without_duplicates(symbols):
    publish(STREAM, [bar_data(0), bar_data(1)])
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM], "snapshot": 5})
    assert (await client.recv_type("subscribed"))["seq"] == 2
    publish(STREAM, [bar_data(2)])
    assert (await client.recv_type("bar"))["seq"] == 3
    await client.send({"op": "subscribe", "id": 2, "streams": [STREAM], "snapshot": 5})
    reply = await client.recv_type("subscribed")
    assert (reply["id"], reply["seq"], len(reply["snapshot"])) == (2, 3, 3)
    publish(STREAM, [bar_data(3)])
    assert (await client.recv_type("bar"))["seq"] == 4
    await asyncio.sleep(0)
    await client.close()


async def test_redis_losing_its_data_gives_a_fresh_snapshot_not_a_wrong_replay(symbols, settings, redis_client):
    settings.STREAM_SEQ_EPOCH = True
    last = publish(STREAM, [bar_data(0), bar_data(1)])
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM], "snapshot": 5})
    assert (await client.recv_type("subscribed"))["seq"] == last
    redis_client.flushdb()  # Redis restarted without persistence: seqs and buffers gone
    await asyncio.sleep(0.002)
    restarted = publish(STREAM, [bar_data(2)])
    assert restarted > last
    reply = await client.recv_type("resumed")
    assert (reply["recovered"], reply["seq"]) == (False, restarted)
    assert [b["ts"] for b in reply["snapshot"]] == ["2024-01-02T14:32:00Z"]
    # A client that was away resumes from its old seq: not recoverable, so a snapshot.
    other = Client()
    await other.connect()
    await other.send({"op": "subscribe", "id": 2, "streams": [STREAM], "resume": {STREAM: last - 1}})
    reply = await other.recv_type("resumed")
    assert (reply["recovered"], reply["seq"]) == (False, restarted)
    await client.close()
    await other.close()


async def test_subscribing_before_a_streams_first_message_holds_its_starting_seq(symbols, settings):
    settings.STREAM_SEQ_EPOCH = True
    client = Client()
    await client.connect()
    before = int(time.time() * 1000) * 1000
    await client.send({"op": "subscribe", "id": 1, "streams": [STREAM], "snapshot": 5})
    reply = await client.recv_type("subscribed")
    assert reply["seq"] >= before  # the stream starts now, at its epoch seq
    assert reply["snapshot"] == []
    last = publish(STREAM, [bar_data(0)])
    message = await client.recv_type("bar")  # the first message follows: no gap, no fresh snapshot
    assert message["seq"] == reply["seq"] + 1 == last
    await client.close()


def test_the_gateway_server_waits_longer_for_handshakes_unless_told():
    from streaming.server import CONNECT_TIMEOUT_S, with_defaults

    args = ["-b", "127.0.0.1", "-p", "8000", "config.asgi:application"]
    assert with_defaults(args) == ["--websocket_connect_timeout", str(CONNECT_TIMEOUT_S), *args]
    assert with_defaults(["--websocket_connect_timeout", "7", *args]) == ["--websocket_connect_timeout", "7", *args]


def test_the_gateway_server_writes_no_twisted_access_line(monkeypatch):
    import io

    from daphne.http_protocol import HTTPFactory

    from streaming.server import quiet_twisted_access_log

    monkeypatch.setattr(HTTPFactory, "log", HTTPFactory.log)  # restored after the test
    factory = HTTPFactory(server=None)
    factory._logFile = io.StringIO()
    with pytest.raises(AttributeError):  # Twisted's own formats a line from the request
        factory.log(object())
    quiet_twisted_access_log()
    factory.log(object())
    assert factory._logFile.getvalue() == ""
