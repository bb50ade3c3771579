"""Which stored timeframe a served one is built from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from marketdata.selectors.bars import bar_list
from marketdata.services.bars_trades import BarIn, bars_upsert
from marketdata.timeframes import source_candidates

T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
P = 100 * 10**9


def test_candidates_are_the_timeframe_itself_then_coarsest_first():
    assert source_candidates("1m") == ["1m", "1s"]
    assert source_candidates("5m") == ["1m", "1s"]
    assert source_candidates("4h") == ["1h", "1m", "1s"]
    assert source_candidates("1d") == ["1d", "1h", "1m", "1s"]


@pytest.mark.django_db
def test_a_finer_feed_does_not_shrink_a_coarser_history(make_symbol):
    symbol = make_symbol("AAPL")
    history = [BarIn(symbol.pk, "1m", T0 + timedelta(minutes=i), 1, P, P, P, P, 10) for i in range(60)]
    recent = [BarIn(symbol.pk, "1s", T0 + timedelta(minutes=59, seconds=i), 1, P, P, P, P, 1) for i in range(30)]
    bars_upsert(bars=history + recent)
    page = bar_list(ticker="AAPL", tf="5m", start=T0, end=T0 + timedelta(hours=1))
    assert [b.ts for b in page.bars] == [T0 + timedelta(minutes=5 * i) for i in range(12)]  # the whole hour
    assert {b.volume for b in page.bars} == {50}  # from the 1m bars
