"""Resampling: SQL (REST) and Python (WebSocket) against a direct reference computation."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketdata.models import Bar
from marketdata.selectors.bars import bar_list
from marketdata.services.bars_trades import BarIn, bars_upsert
from marketdata.timeframes import OHLCV, bucket_start, resample

P = 1_000_000_000
# Windows that hold a US DST change (2024-03-10, 2024-11-03), an EU one (2024-03-31),
# a month end and a Monday 00:00 UTC week edge.
WINDOW_STARTS = [
    datetime(2024, 3, 10, 0, 0, tzinfo=UTC),
    datetime(2024, 11, 2, 20, 0, tzinfo=UTC),
    datetime(2024, 3, 30, 22, 0, tzinfo=UTC),
    datetime(2024, 1, 31, 21, 0, tzinfo=UTC),
    datetime(2024, 1, 7, 22, 0, tzinfo=UTC),
]
STRIDES_S = {"5m": 300, "15m": 900, "30m": 1800, "4h": 14400, "1d": 86400}
# 2000-01-03T00:00:00Z, written out rather than imported: the reference must not share code.
ORIGIN_EPOCH_S = 946857600

bar_strategy = st.tuples(
    st.integers(0, 3 * 24 * 60 - 1),  # minute offset in a three-day window
    st.integers(1, 3),  # publisher
    st.integers(1, 500 * P),  # open
    st.integers(0, 5 * P),  # up move
    st.integers(0, 5 * P),  # down move
    st.integers(1, 500 * P),  # close before clamping into [low, high]
    st.integers(0, 10**6),  # volume
    st.sampled_from([0, 0, 0, 1, 2]),  # anomalies
)


def _rows(symbol_id: int, start: datetime, raw: list[tuple]) -> list[BarIn]:
    rows: dict[tuple, BarIn] = {}
    for minute, pub, open_, up, down, close, volume, anomalies in raw:
        high, low = open_ + up, max(open_ - down, 1)
        close = min(max(close, low), high)
        ts = start + timedelta(minutes=minute)
        rows[(ts, pub)] = BarIn(symbol_id, "1m", ts, pub, open_, high, low, close, volume, anomalies)
    return list(rows.values())


def reference(rows: list[BarIn], stride_s: int, *, exclude: bool) -> list[tuple]:
    """Group by integer bucket number straight from epoch seconds; first/last by (ts, publisher)."""
    groups: dict[int, list[BarIn]] = defaultdict(list)
    for row in rows:
        if exclude and row.anomalies:
            continue
        groups[(int(row.ts.timestamp()) - ORIGIN_EPOCH_S) // stride_s].append(row)
    out = []
    for n in sorted(groups):
        members = sorted(groups[n], key=lambda r: (r.ts, r.publisher_id))
        flags = 0
        for m in members:
            flags |= m.anomalies
        out.append(
            (
                datetime.fromtimestamp(ORIGIN_EPOCH_S + n * stride_s, UTC),
                members[0].open,
                max(m.high for m in members),
                min(m.low for m in members),
                members[-1].close,
                sum(m.volume for m in members),
                flags,
            )
        )
    return out


def _served(ticker: str, tf: str, start: datetime, exclude: bool) -> list[tuple]:
    page = bar_list(
        ticker=ticker, tf=tf, start=start - timedelta(days=1), end=start + timedelta(days=5),
        limit=10_000, exclude_anomalies=exclude,
    )  # fmt: skip
    return [(b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies) for b in page.bars]


@pytest.mark.django_db(transaction=True)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.lists(bar_strategy, min_size=1, max_size=120),
    start=st.sampled_from(WINDOW_STARTS),
    exclude=st.booleans(),
)
def test_sql_and_python_resampling_match_the_reference(make_symbol, raw, start, exclude):
    symbol = make_symbol()
    rows = _rows(symbol.pk, start, raw)
    bars_upsert(bars=rows)
    python_in = [OHLCV(r.ts, r.open, r.high, r.low, r.close, r.volume, r.anomalies, r.publisher_id) for r in rows]

    for tf, stride_s in STRIDES_S.items():
        expected = reference(rows, stride_s, exclude=exclude)
        from_python = [
            (b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies)
            for b in resample(python_in, tf, exclude_anomalies=exclude)
        ]
        assert _served(symbol.ticker, tf, start, exclude) == expected, tf
        assert from_python == expected, tf
    # 1m is served as stored, publishers of one minute consolidated by the same rule.
    assert _served(symbol.ticker, "1m", start, exclude) == reference(rows, 60, exclude=exclude)
    Bar.objects.filter(symbol_id=symbol.pk).delete()


@pytest.mark.parametrize(
    ("ts", "tf", "expected"),
    [
        (datetime(2024, 3, 10, 7, 59, 59, tzinfo=UTC), "4h", datetime(2024, 3, 10, 4, 0, tzinfo=UTC)),
        (datetime(2024, 3, 10, 8, 0, tzinfo=UTC), "4h", datetime(2024, 3, 10, 8, 0, tzinfo=UTC)),
        (datetime(2024, 11, 3, 23, 59, tzinfo=UTC), "1d", datetime(2024, 11, 3, tzinfo=UTC)),
        (datetime(2024, 11, 4, 0, 0, tzinfo=UTC), "1d", datetime(2024, 11, 4, tzinfo=UTC)),
        (datetime(2024, 1, 2, 14, 44, 59, tzinfo=UTC), "15m", datetime(2024, 1, 2, 14, 30, tzinfo=UTC)),
        (datetime(1999, 12, 31, 23, 59, tzinfo=UTC), "4h", datetime(1999, 12, 31, 20, 0, tzinfo=UTC)),
    ],
)
def test_bucket_edges(ts, tf, expected):
    assert bucket_start(ts, tf) == expected


@pytest.mark.django_db(transaction=True)
def test_partial_edge_buckets_are_not_served(make_symbol):
    symbol = make_symbol()
    t0 = datetime(2024, 1, 2, 14, 0, tzinfo=UTC)
    bars_upsert(bars=[BarIn(symbol.pk, "1m", t0 + timedelta(minutes=i), 1, P, P, P, P, 1) for i in range(30)])

    page = bar_list(ticker=symbol.ticker, tf="15m", start=t0 + timedelta(minutes=2), end=t0 + timedelta(minutes=29))

    # Bars are selected by their open time; each selected bar is whole: 14:00 opens before
    # start and is left out, 14:15 opens inside the range and holds all of its 15 minutes.
    assert [(b.ts, b.volume) for b in page.bars] == [(t0 + timedelta(minutes=15), 15)]
    page = bar_list(ticker=symbol.ticker, tf="15m", start=t0, end=t0 + timedelta(minutes=30))
    assert [(b.ts, b.volume) for b in page.bars] == [(t0, 15), (t0 + timedelta(minutes=15), 15)]
