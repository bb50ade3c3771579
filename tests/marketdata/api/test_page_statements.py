"""An uncached /v1/ohlcv page costs one statement when its timeframe is stored, and the same bytes as bar_list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from marketdata.selectors.bar_text import bar_page_text
from marketdata.selectors.bars import bar_list
from marketdata.services.bars_trades import BarIn, bars_upsert
from marketdata.wire import bar_json

T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
P = 1_000_000_000


def _bars(symbol_id: int, tf: str, step: timedelta, n: int) -> list[BarIn]:
    return [
        BarIn(symbol_id, tf, T0 + i * step, 1, (100 + i) * P, (101 + i) * P, (99 + i) * P, (100 + i) * P + 5, 10 + i, 0)
        for i in range(n)
    ]


def _python(**kwargs):
    page = bar_list(**kwargs)
    text = ",".join(bar_json(b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.final) for b in page.bars)
    return text, len(page.bars), page.next_cursor


@pytest.mark.django_db
def test_a_stored_timeframe_page_with_bars_is_one_statement(make_symbol):
    symbol = make_symbol("ONE")
    bars_upsert(bars=_bars(symbol.pk, "1m", timedelta(minutes=1), 30))
    for kwargs in ({}, {"start": T0, "limit": 10}, {"end": T0 + timedelta(minutes=5)}):
        with CaptureQueriesContext(connection) as queries:
            page = bar_page_text(ticker="ONE", tf="1m", symbol_id=symbol.pk, **kwargs)
        assert len(queries) == 1, [q["sql"][:80] for q in queries]
        assert (page.bars, page.count, page.next_cursor) == _python(ticker="ONE", tf="1m", **kwargs)
        assert page.base == "1m"


@pytest.mark.django_db
def test_an_empty_page_still_finds_the_source_timeframe(make_symbol):
    # Only 1s bars: a 1m page is resampled from them (not an empty page of the absent 1m bars).
    secs = make_symbol("SECS")
    bars_upsert(bars=_bars(secs.pk, "1s", timedelta(seconds=1), 200))
    page = bar_page_text(ticker="SECS", tf="1m", symbol_id=secs.pk)
    assert (page.bars, page.count, page.next_cursor) == _python(ticker="SECS", tf="1m")
    assert (page.count, page.base) == (4, "1s")
    forward = bar_page_text(ticker="SECS", tf="1m", symbol_id=secs.pk, start=T0, limit=2)
    assert (forward.bars, forward.count, forward.next_cursor) == _python(ticker="SECS", tf="1m", start=T0, limit=2)
    assert forward.next_cursor is not None
    # 1m bars, but none in the range: an empty page of the 1m base.
    mins = make_symbol("MINS")
    bars_upsert(bars=_bars(mins.pk, "1m", timedelta(minutes=1), 5))
    page = bar_page_text(ticker="MINS", tf="1m", symbol_id=mins.pk, start=T0 + timedelta(days=1))
    assert (page.bars, page.count, page.next_cursor, page.base) == ("", 0, None, "1m")
    page = bar_page_text(ticker="MINS", tf="1m", symbol_id=mins.pk, end=T0)
    assert (page.bars, page.count, page.next_cursor, page.base) == ("", 0, None, "1m")
    # 1h is stored too, but this symbol has none: built from its 1m bars.
    page = bar_page_text(ticker="MINS", tf="1h", symbol_id=mins.pk)
    assert (page.bars, page.count) == _python(ticker="MINS", tf="1h")[:2]
    assert (page.count, page.base) == (1, "1m")
    # No bars at all.
    make_symbol("NONE")
    page = bar_page_text(ticker="NONE", tf="1m")
    assert (page.bars, page.count, page.next_cursor, page.base) == ("", 0, None, None)
