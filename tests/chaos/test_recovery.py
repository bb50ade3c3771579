"""Recovery paths under a running ingester and clients: each failure, then the stream whole again.

Everything runs as in production, on private servers the tests may break (tests/chaos/
servers.py; the machine's shared PostgreSQL and Redis are never stopped): two gateway
processes (``python -m streaming.server``), the real ``manage.py ingest`` in its own
process, and clients that hold a stream as a trading UI does (tests/chaos/client.py):
on a lost connection they reconnect to the other gateway and resume from their last seq.

What is checked is what a user would notice: every bar of the feed reaches the client's
chart with the values stored, seqs without a gap or a duplicate, no bar delivered twice,
and the ingester ending cleanly with everything stored. Timings are not asserted (the
waits are bounded); bench/chaos.py measures them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.ingest.databento_live import LiveGateway, Plan
from tests.ingest.dbnfile import bar, metadata, write

from .client import StreamClient
from .stack import Proc, Stack

pytestmark = pytest.mark.e2e

T0 = 1704205800  # 2024-01-02T14:30:00Z
P = 1_000_000_000
WAIT_S = 40.0
KEY = "db-" + "C" * 24 + "chaos"


async def until(predicate: Callable[[], bool], what: str, wait_s: float = WAIT_S, procs: tuple[Proc, ...] = ()):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    logs = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in procs)
    raise AssertionError(f"not within {wait_s} s: {what}\n{logs}")


def feed(tmp_path: Path, ticker: str, iid: int, n: int) -> tuple[Path, list[str]]:
    """A DBN file of ``n`` 1m bars of ``ticker``, and their times as the wire prints them."""
    path = write(tmp_path / f"{ticker}.dbn", metadata(symbols={ticker: iid}),
                 [bar(iid, T0 + 60 * i, 100 + i % 37, volume=100 + i) for i in range(n)])  # fmt: skip
    return path, [iso(T0 + 60 * i) for i in range(n)]


def iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_stored(data: dict[str, Any]) -> tuple:
    def fixed(price: Any) -> int:
        return int(Decimal(str(price)) * P)

    return (data["ts"], fixed(data["open"]), fixed(data["high"]), fixed(data["low"]), fixed(data["close"]),
            data["volume"])  # fmt: skip


def stored(stack: Stack, ticker: str) -> list[tuple]:
    return [(r[0].strftime("%Y-%m-%dT%H:%M:%SZ"), *r[1:]) for r in stack.bars_stored(ticker)]


def assert_whole(client: StreamClient, expected_ts: list[str], stack: Stack, ticker: str) -> None:
    """The client's chart holds every bar of the feed, as stored; its seqs had no gap and no duplicate."""
    assert client.gaps == 0
    assert client.duplicates == 0
    assert client.duplicate_data == 0, [ts for ts, n in client.ts_seen.items() if n > 1]
    assert sorted(client.bars) == expected_ts
    assert [as_stored(client.bars[ts]) for ts in expected_ts] == stored(stack, ticker)


async def hold(client: StreamClient) -> tuple[asyncio.Event, asyncio.Future]:
    stop = asyncio.Event()
    task = asyncio.ensure_future(client.run(stop, deadline_s=WAIT_S * 2))
    await until(lambda: client.seq is not None, "subscribed")
    return stop, task


async def test_gateway_killed_its_clients_resume_on_the_other_with_no_gap(stack, gateways, tmp_path):
    ticker, n = "KILL", 120
    stack.symbols_create([ticker])
    path, expected = feed(tmp_path, ticker, 11, n)
    one, two = gateways["one"], gateways["two"]
    client = StreamClient([one.ws_url, two.ws_url], f"bars:1m:{ticker}")
    stop, task = await hold(client)
    ingester = stack.ingest("replay", str(path), "--speed", "1800")  # 30 bars/s
    try:
        await until(lambda: client.messages >= 20, "the first bars", procs=(ingester, one))
        one.kill9()
        await until(lambda: len(client.bars) == n, "every bar after the kill", procs=(ingester, two))
    finally:
        stop.set()
        await task
    assert ingester.wait(30) == 0, ingester.log_tail()

    assert client.connects == 2  # the killed gateway, then the other one
    assert client.recovered == 1  # resumed from the buffer ...
    assert client.resnapshots == 0  # ... not from a fresh snapshot
    assert_whole(client, expected, stack, ticker)


async def test_redis_restarted_the_ingester_publishes_again_and_clients_resnapshot(stack, gateways, tmp_path):
    ticker, n = "RDS", 200
    stack.symbols_create([ticker])
    path, expected = feed(tmp_path, ticker, 12, n)
    client = StreamClient([gateways["two"].ws_url, gateways["one"].ws_url], f"bars:1m:{ticker}")
    stop, task = await hold(client)
    ingester = stack.ingest("replay", str(path), "--speed", "2400")  # 40 bars/s
    try:
        await until(lambda: client.messages >= 30, "the first bars", procs=(ingester,))
        before = client.seq
        assert before is not None
        stack.services.redis.restart(down_s=1.0)  # its data is gone: seqs, buffers, subscriptions
        await until(lambda: len(client.bars) == n, "every bar after the restart", procs=(ingester, gateways["two"]))
    finally:
        stop.set()
        await task
    assert ingester.wait(30) == 0, ingester.log_tail()
    assert ingester.alive() is False
    assert "retried_publish" in ingester.log_tail(20_000)  # the publish failed while Redis was down, then went

    # Seqs never go back: after the loss the stream continues above where it was, and the
    # client, whose seq the new buffer cannot reach, is sent a fresh snapshot (recovered: false).
    assert client.seq is not None
    assert client.seq > before
    assert client.resnapshots == 1
    assert_whole(client, expected, stack, ticker)


async def test_postgresql_restarted_the_ingester_holds_back_then_writes_everything(stack, gateways, tmp_path):
    ticker, n = "PGR", 200
    stack.symbols_create([ticker])
    path, expected = feed(tmp_path, ticker, 13, n)
    client = StreamClient([gateways["one"].ws_url, gateways["two"].ws_url], f"bars:1m:{ticker}")
    stop, task = await hold(client)
    ingester = stack.ingest("replay", str(path), "--speed", "2400")
    try:
        await until(lambda: client.messages >= 30, "the first bars", procs=(ingester,))
        stack.services.pg.stop()
        held_at = client.messages
        await asyncio.sleep(2.0)
        # Nothing is published that is not committed: while the database is down, at most
        # the batch committed just before it went reaches clients.
        assert client.messages - held_at <= 10
        assert ingester.alive()
        stack.services.pg.start()
        await until(lambda: len(client.bars) == n, "every bar after the restart", procs=(ingester,))
    finally:
        stop.set()
        await task
    assert ingester.wait(30) == 0, ingester.log_tail()
    assert "retried_bars" in ingester.log_tail(20_000)

    assert client.resnapshots == 0
    assert_whole(client, expected, stack, ticker)


def live_bars(count: int, ids: dict[str, int]) -> list[Any]:
    import databento_dbn as dbn

    t0 = time.time_ns() - 3 * 3600 * P
    t0 -= t0 % (60 * P)
    out = []
    for i in range(count):
        for iid in ids.values():
            price = (100 + i % 9) * P
            out.append(dbn.OHLCVMsg(rtype=int(dbn.RType.OHLCV_1M), publisher_id=2, instrument_id=iid,
                                    ts_event=t0 + i * 60 * P, open=price, high=price + P, low=price - P, close=price,
                                    volume=100 + i))  # fmt: skip
    return out


async def test_live_feed_dropped_the_gap_is_filled_and_clients_see_every_bar_once(stack, gateways):
    ids = {"LIVA": 21, "LIVB": 22}
    n = 60
    records = live_bars(n, ids)
    stack.symbols_create(list(ids))
    client = StreamClient([gateways["two"].ws_url, gateways["one"].ws_url], "bars:1m:LIVA")
    stop, task = await hold(client)
    start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=records[0].ts_event // 1000)
    plans = [Plan(drop_after=71, linger_s=0.3)]  # mid-stream, between LIVA's and LIVB's bar of a minute
    with LiveGateway(keys=[KEY], symbols=ids, records=records, plans=plans, heartbeat_s=0.2, pace_s=0.01) as lsg:
        ingester = stack.ingest(
            "live", "--dataset", "XNAS.ITCH", "--schema", "ohlcv-1m", "--symbols", ",".join(ids),
            "--start", start.isoformat(), "--gateway", lsg.address, extra={"DATABENTO_API_KEY": KEY},
        )  # fmt: skip
        try:
            await until(lambda: len(client.bars) == n, "every bar of the feed", procs=(ingester,))
        finally:
            stop.set()
            await task
            code = ingester.stop()
    assert code == 0, ingester.log_tail()
    assert lsg.connections[0].ended == "dropped"
    assert len(lsg.connections) == 2  # one reconnect, which replayed from the last stored bar

    assert client.resnapshots == 0
    expected = sorted({iso(r.ts_event // P) for r in records})
    assert_whole(client, expected, stack, "LIVA")
    assert len(stack.bars_stored("LIVB")) == n
