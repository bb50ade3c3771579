"""Retention and the hot cache: a page cached before retention never serves the bars retention removed.

On both storage paths: plain PostgreSQL (``retention_apply`` deletes rows) and TimescaleDB
(whole chunks dropped, then rows trimmed), each run as production runs it: on TimescaleDB
every job the bars' hypertable has (compression, and whatever else drops data), then the
retention CronJob's ``retention_apply``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from marketdata.services.retention import retention_apply
from marketdata.storage import BAR_TABLE
from ops import metrics

from .conftest import body, minute_bars

pytestmark = pytest.mark.django_db(transaction=True)


def _hits() -> float:
    return metrics.API_CACHE.labels("ohlcv", "hit")._value.get()


def _page(client, start: datetime, end: datetime) -> list[str]:
    url = f"/v1/ohlcv?symbol=AAPL&tf=1m&start={start:%Y-%m-%dT%H:%M:%SZ}&end={end:%Y-%m-%dT%H:%M:%SZ}"
    return [bar["ts"] for bar in body(client.get(url))["results"]]


def _cached_then_retained(client, make_symbol, write_bars, run_retention) -> tuple[list[str], list[str], list[str]]:
    """A page of old and recent bars, cached; retention run: the page before, the page after, the recent bars."""
    now = timezone.now().replace(second=0, microsecond=0)
    past = now - timedelta(days=settings.MARKETDATA_DEFAULT_RETENTION_DAYS + 35)  # chunks wholly past the default keep
    symbol = make_symbol("AAPL", dataset="XNAS.ITCH")
    write_bars(minute_bars(symbol, 5, start=past))
    recent = write_bars(minute_bars(symbol, 5, start=now - timedelta(days=2)))
    start, end = past - timedelta(days=1), now
    before = _page(client, start, end)
    hits = _hits()
    assert _page(client, start, end) == before
    assert _hits() == hits + 1  # the page is cached
    run_retention(now)
    return before, _page(client, start, end), [f"{b.ts:%Y-%m-%dT%H:%M:%SZ}" for b in recent]


def test_plain_retention_leaves_no_cached_page_showing_what_it_deleted(client, make_symbol, write_bars):
    def run(now: datetime) -> None:
        retention_apply(now=now)

    before, after, recent = _cached_then_retained(client, make_symbol, write_bars, run)
    assert len(before) == 10
    assert after == recent


@pytest.mark.timescaledb
def test_timescaledb_retention_leaves_no_cached_page_showing_the_chunks_it_dropped(
    timescaledb, client, make_symbol, write_bars
):
    def run(now: datetime) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT job_id FROM timescaledb_information.jobs WHERE hypertable_name = %s", [BAR_TABLE])
            for (job,) in cursor.fetchall():
                cursor.execute("CALL run_job(%s)", [job])
        retention_apply(now=now)

    before, after, recent = _cached_then_retained(client, make_symbol, write_bars, run)
    assert len(before) == 10
    assert after == recent
    with connection.cursor() as cursor:  # whole chunks went, not rows one by one
        cursor.execute(
            "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = %s AND range_end <= %s",
            [BAR_TABLE, timezone.now() - timedelta(days=settings.MARKETDATA_DEFAULT_RETENTION_DAYS)],
        )
        assert cursor.fetchone() == (0,)
