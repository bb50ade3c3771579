"""The pipeline under a slow database and under SIGTERM: bounded, and nothing lost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import databento_dbn as dbn
import psycopg
import pytest
from django.conf import settings

from ingest.pipeline import Pipeline
from marketdata.models import Bar
from ops import metrics

from .dbnfile import NS, P, bar, metadata, write

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent
T0 = 1704205800  # 2024-01-02T14:30:00Z


def _dsn() -> str:
    db = settings.DATABASES["default"]
    return f"host={db['HOST']} port={db['PORT']} user={db['USER']} dbname={db['NAME']}"


def _records(n: int) -> list[dbn.OHLCVMsg]:
    return [
        dbn.OHLCVMsg(rtype=int(dbn.RType.OHLCV_1S), publisher_id=2, instrument_id=7, ts_event=(T0 + i) * NS,
                     open=100 * P, high=101 * P, low=99 * P, close=100 * P, volume=10)
        for i in range(n)
    ]  # fmt: skip


def test_slow_database_fills_the_queue_then_nothing_is_lost():
    pipeline = Pipeline(dataset="XNAS.ITCH", source="test", symbols=None, publish=False, queue_max=100, batch_bars=10)
    pipeline.resolver.add_mapping(ticker="AAPL", instrument_id=7, start_ns=0, end_ns=None)
    waits_before = metrics.INGEST_BACKPRESSURE._value.get()
    records = _records(2000)
    fed = threading.Event()

    def source() -> None:
        for record in records:
            pipeline.feed(record)
        fed.set()

    with psycopg.connect(_dsn()) as blocker:
        blocker.execute("LOCK TABLE marketdata_bar IN EXCLUSIVE MODE")  # the database "is slow"
        feeder = threading.Thread(target=source)
        feeder.start()
        depths = []
        for _ in range(20):
            time.sleep(0.05)
            depths.append(pipeline.queue.qsize())
        assert not fed.is_set()  # the source is held back, not running ahead
        assert max(depths) <= 100
        assert depths[-1] >= 90  # the queue filled up to its bound
        blocker.rollback()  # the database recovers

    feeder.join(timeout=30)
    stats = pipeline.close()

    assert fed.is_set()
    assert Bar.objects.count() == 2000 == stats.written
    assert metrics.INGEST_BACKPRESSURE._value.get() > waits_before


def test_sigterm_writes_everything_queued_and_exits_zero(tmp_path):
    path = write(
        tmp_path / "paced.dbn",
        metadata(symbols={"AAPL": 7}, schema=dbn.Schema.OHLCV_1S),
        [bar(7, T0 + i, 100, rtype=dbn.RType.OHLCV_1S) for i in range(600)],
    )
    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
    }
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "ingest", "replay", str(path), "--speed", "100", "--no-publish"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not Bar.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)

    assert proc.returncode == 0, err
    written = int(re.search(r"written=(\d+)", out).group(1))  # type: ignore[union-attr]
    records = int(re.search(r"records=(\d+)", out).group(1))  # type: ignore[union-attr]
    assert 0 < written < 600  # stopped part way
    assert Bar.objects.count() == written == records  # every record it took in was stored
