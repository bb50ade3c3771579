"""A publisher behind takes the batches queued behind the one it got and publishes them as one."""

from __future__ import annotations

import queue
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from ingest.publisher import MERGE_RECORDS, STOP, Job, trades_out, with_backlog
from ingest.publisher_hosts import ProcessHost
from marketdata.columns import BarColumns, TradeColumns, columns_of, utc
from marketdata.services.bars_trades import BarIn, TradeIn

from .test_replay import buffer_frames

START = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def job(first: int, n: int, trades: int = 0) -> Job:
    bars = [BarIn(7, "1m", START + timedelta(minutes=i), 1, 1, 1, 1, 1, 1) for i in range(first, first + n)]
    trade_rows = [TradeIn(7, START + timedelta(seconds=i), START, 1, i, 0, 1, first + i, "B") for i in range(trades)]
    trade_parts = [trades_out(columns_of(TradeColumns, trade_rows))] if trades else []
    return [columns_of(BarColumns, bars)], trade_parts, {7: "AAPL"} if first == 0 else {}


def queued(*items: object) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    for item in items:
        q.put(item)
    return q


def test_queued_jobs_become_one_in_commit_order() -> None:
    first, second, third = job(0, 10, trades=2), job(10, 5, trades=3), job(15, 1)
    q = queued(second, third)

    (bars, trades, tickers), stop = with_backlog(first, q)

    assert not stop
    assert q.empty()
    assert [utc(t) for part in bars for t in part.ts.tolist()] == [START + timedelta(minutes=i) for i in range(16)]
    assert [size for _, _, _, sizes, _ in trades for size in sizes.tolist()] == [0, 1, 10, 11, 12]
    assert tickers == {7: "AAPL"}
    assert len(first[0]) == 1
    assert len(first[1]) == 1  # the first job's own list of parts is left as it was


def test_a_stop_behind_the_backlog_is_reported_and_nothing_after_it_is_taken() -> None:
    after = job(20, 1)
    q = queued(job(10, 5), STOP, after)

    (bars, _, _), stop = with_backlog(job(0, 10), q)

    assert stop
    assert sum(map(len, bars)) == 15
    assert q.get_nowait() is after


def test_merging_stops_once_the_records_reach_the_cap() -> None:
    size = MERGE_RECORDS // 4
    q = queued(*(job(size * i, size) for i in range(1, 8)))

    (bars, _, _), stop = with_backlog(job(0, size), q)

    assert not stop
    assert sum(map(len, bars)) == MERGE_RECORDS
    assert q.qsize() == 4


def test_an_empty_queue_leaves_the_job_as_it_came() -> None:
    first = job(0, 3, trades=1)
    merged, stop = with_backlog(first, queued())
    assert merged == first
    assert not stop


@pytest.mark.django_db(transaction=True)
def test_batches_queued_behind_a_busy_publisher_process_go_out_together_complete_and_in_order(
    redis_client: redis.Redis,
) -> None:
    failures: list[BaseException] = []
    host = ProcessHost("backlog-test", closing=lambda: False, warn=lambda what: None, failed=failures.append)
    try:
        for i in range(5):  # the child is still on the first when the other four are queued
            assert host.put(job(i * 1000, 1000), timeout=10)
    finally:
        assert host.put(STOP, timeout=10)
        host.join()
    assert not failures

    entries: Any = redis_client.xrange("md:buf:bars:1m:AAPL")
    assert len(entries) < 5  # fewer publishes than batches
    frames = buffer_frames(redis_client, "bars:1m:AAPL")
    assert [f["seq"] for f in frames] == list(range(1, 5001))
    assert [f["data"]["ts"] for f in frames] == [
        (START + timedelta(minutes=i)).isoformat().replace("+00:00", "Z") for i in range(5000)
    ]
    hours = [f["data"] for f in buffer_frames(redis_client, "bars:1h:AAPL")]
    finals = [h["ts"] for h in hours if h["final"]]
    buckets = sorted({(START + timedelta(minutes=i)).replace(minute=0) for i in range(5000)})
    assert finals == [b.isoformat().replace("+00:00", "Z") for b in buckets[:-1]]
    assert hours[-1]["final"] is False  # the last hour is still forming
    assert hours[-1]["ts"] == buckets[-1].isoformat().replace("+00:00", "Z")


def test_a_publisher_behind_lingers_for_the_batches_still_coming() -> None:
    q: queue.Queue = queue.Queue()
    later = job(10, 5)
    threading.Timer(0.05, q.put, [later]).start()

    (bars, _, _), stop = with_backlog(job(0, 10), q, linger_s=2.0)  # behind: waits for what comes

    assert not stop
    assert sum(map(len, bars)) == 15


def test_a_publisher_keeping_up_does_not_wait() -> None:
    q: queue.Queue = queue.Queue()
    threading.Timer(0.2, q.put, [job(10, 5)]).start()

    (bars, _, _), _ = with_backlog(job(0, 10), q)

    assert sum(map(len, bars)) == 10  # it did not wait for the job the timer puts
    assert len(q.get(timeout=5)[0]) == 1
