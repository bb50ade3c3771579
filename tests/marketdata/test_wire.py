"""The JSON text of times: one RFC 3339 form whatever zone an aware datetime carries."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketdata.wire import anomaly_names, bar_json, data_ts, time_text, trade_json, ts_text

INSTANT = datetime(2024, 1, 2, 14, 30, 5, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (INSTANT, "2024-01-02T14:30:05.123456Z"),
        (INSTANT.replace(microsecond=0), "2024-01-02T14:30:05Z"),
        (INSTANT.astimezone(timezone(timedelta(hours=2))), "2024-01-02T14:30:05.123456Z"),
        (INSTANT.astimezone(ZoneInfo("America/New_York")), "2024-01-02T14:30:05.123456Z"),
        (INSTANT.astimezone(ZoneInfo("Europe/London")), "2024-01-02T14:30:05.123456Z"),  # +00:00, not UTC
    ],
)
def test_times_are_utc_with_a_z_cached_or_not(ts, text):
    assert time_text(ts) == ts_text(ts) == text


def test_a_trade_carries_its_time_to_the_microsecond():
    assert trade_json(INSTANT, 189_120_000_000, 5, "B") == (
        '{"ts":"2024-01-02T14:30:05.123456Z","price":189.12,"size":5,"side":"B"}'
    )


@given(st.lists(st.integers(-(10**15), 10**15), max_size=50))
def test_kept_price_texts_are_price_text_and_stay_bounded(prices):
    from marketdata import wire

    texts = wire._PriceTexts()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire, "PRICE_TEXTS_MAX", 8)
        for price in prices + prices:  # each asked for twice: made once, then kept
            assert texts[price] == wire.price_text(price)
            assert len(texts) <= 8


# Every text this module writes, parsed by a JSON library, is the object it stands for.

TIMES = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2262, 4, 10), timezones=st.just(UTC))
PRICES = st.integers(-(10**15), 10**15)


def price_of(value: int) -> Decimal:
    return Decimal(value) / 10**9


@given(TIMES, PRICES, PRICES, PRICES, PRICES, st.integers(0, 2**63 - 1), st.integers(0, 2**16 - 1), st.booleans())
def test_a_bar_text_is_the_bar(ts, open_, high, low, close, volume, anomalies, final):
    text = bar_json(ts, open_, high, low, close, volume, anomalies, final)
    parsed = json.loads(text)
    as_decimal = json.loads(text, parse_float=Decimal, parse_int=Decimal)
    assert datetime.fromisoformat(parsed["ts"]) == ts
    assert data_ts(text) == parsed["ts"] == time_text(ts)
    assert [as_decimal[k] for k in ("open", "high", "low", "close")] == [price_of(p) for p in (open_, high, low, close)]
    assert as_decimal["volume"] == volume
    assert parsed["final"] is final
    assert parsed.get("anomalies", []) == list(anomaly_names(anomalies))


@given(TIMES, PRICES, st.integers(0, 2**63 - 1), st.sampled_from(["A", "B", "N"]))
def test_a_trade_text_is_the_trade(ts, price, size, side):
    text = trade_json(ts, price, size, side)
    parsed = json.loads(text, parse_float=Decimal, parse_int=Decimal)
    assert datetime.fromisoformat(parsed["ts"]) == ts
    assert data_ts(text) == parsed["ts"]
    assert parsed["price"] == price_of(price)
    assert parsed["size"] == size
    assert parsed["side"] == side
