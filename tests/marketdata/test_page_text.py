"""bar_page_text (the page's JSON written by PostgreSQL) gives the bytes bar_list + wire.bar_json give."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from marketdata.selectors.bar_text import bar_page_text
from marketdata.selectors.bars import bar_list
from marketdata.services.bars_trades import BarIn, bars_upsert
from marketdata.wire import bar_json

T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
INT64_MAX = 2**63 - 2  # 2**63 - 1 is Databento's undefined price


def _python(**kwargs):
    page = bar_list(**kwargs)
    text = ",".join(bar_json(b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.final) for b in page.bars)
    return text, len(page.bars), page.next_cursor


def _price(rng: random.Random) -> int:
    return rng.choice([
        0, 1, -1, 10**9, -(10**9), 5 * 10**8, -5 * 10**8, INT64_MAX, -INT64_MAX, 189_120_000_000, 123_456_789_123,
        rng.randint(-(10**12), 10**12), rng.randint(1, 10**18), rng.randint(0, 10**9) * 10**9,
    ])  # fmt: skip


@pytest.mark.django_db
def test_the_text_equals_bar_json_of_bar_list_byte_for_byte(make_symbol):
    rng = random.Random(3)
    symbol = make_symbol("AAPL")
    bars = []
    for i in range(300):
        ts = T0 + timedelta(minutes=i)
        if rng.random() < 0.1:
            ts += timedelta(microseconds=rng.choice([1, 999_999, 500_000, rng.randint(1, 999_999)]))
        for publisher in rng.sample([1, 2, 3, 40], rng.choice([1, 1, 1, 2, 3])):
            low, o, c, h = sorted(_price(rng) for _ in range(4))
            volume = rng.choice([0, 1, rng.randint(0, 10**6), INT64_MAX // 2**20])
            bars.append(BarIn(symbol.pk, "1m", ts, publisher, o, h, low, c, volume, rng.choice([0, 0, 1, 2, 3, 4, 7])))
    bars_upsert(bars=bars)
    cases: list[dict[str, Any]] = [
        {},
        {"limit": 1},
        {"limit": 10_000},
        {"limit": 50, "exclude_anomalies": True},
        {"start": T0 + timedelta(minutes=7, seconds=30), "limit": 40},
        {"start": T0, "end": T0 + timedelta(minutes=100), "limit": 1000},
        {"end": T0 + timedelta(minutes=77, microseconds=3), "limit": 25},
        {"start": T0 + timedelta(days=5)},
    ]
    for kwargs in cases:
        expected = _python(ticker="AAPL", tf="1m", **kwargs)
        page = bar_page_text(ticker="AAPL", tf="1m", **kwargs)
        assert (page.bars, page.count, page.next_cursor) == expected, (kwargs, _diff(page.bars, expected[0]))
        assert bar_page_text(ticker="AAPL", tf="1m", symbol_id=symbol.pk, **kwargs) == page  # the look-up skipped
        assert page.base == "1m"
        assert page.all_final
    # A cursor walk gives the same pages.
    cursor = None
    for _ in range(8):
        expected = _python(ticker="AAPL", tf="1m", start=T0, limit=37, cursor=cursor)
        page = bar_page_text(ticker="AAPL", tf="1m", start=T0, limit=37, cursor=cursor)
        assert (page.bars, page.count, page.next_cursor) == expected
        cursor = page.next_cursor
    # Resampled timeframes go through bar_list itself.
    for tf in ("5m", "1h", "1d"):
        expected = _python(ticker="AAPL", tf=tf, limit=7)
        page = bar_page_text(ticker="AAPL", tf=tf, limit=7)
        assert (page.bars, page.count, page.next_cursor) == expected
        assert page.base == "1m"


@pytest.mark.django_db
def test_a_symbol_without_bars_gives_an_empty_page(make_symbol):
    make_symbol("EMPTY")
    page = bar_page_text(ticker="EMPTY", tf="1m")
    assert (page.bars, page.count, page.next_cursor, page.base) == ("", 0, None, None)


def _diff(a: str, b: str) -> str:
    for n, (x, y) in enumerate(zip(a.split("},{"), b.split("},{"), strict=False)):
        if x != y:
            return f"bar {n}: {x!r} != {y!r}"
    return "lengths differ"
