"""The TimescaleDB path: time-partitioned hypertables, compression, writes into compressed
chunks through both write paths, and the policies the admin sets.

These run where the test database has the extension (make test's second run, on the
TimescaleDB cluster) and skip with the reason elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.urls import reverse

from marketdata.models import RetentionPolicy, Symbol
from marketdata.selectors.bars import bar_list
from marketdata.selectors.trades import trade_list
from marketdata.services import bars_trades
from marketdata.services.bars_trades import BarIn, TradeIn, bars_upsert, trades_insert
from marketdata.services.retention import retention_apply
from marketdata.storage import BAR_TABLE, CAGG, TRADE_TABLE

pytestmark = [pytest.mark.timescaledb, pytest.mark.django_db(transaction=True)]

P = 1_000_000_000
# Inside the default 365-day retention, whatever day the suite runs; midnight UTC.
T0 = (datetime.now(UTC) - timedelta(days=60)).replace(hour=0, minute=0, second=0, microsecond=0)


def _rows(query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        return list(cursor.fetchall())


def _compress(table: str) -> None:
    """Compress every chunk of ``table`` (recompressing those written to since)."""
    _rows("SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks(%s) c", [table])


def _compressed_at(table: str, ts: datetime) -> bool:
    """Tell whether the chunk of ``table`` that holds ``ts`` is compressed."""
    [(compressed,)] = _rows(
        "SELECT is_compressed FROM timescaledb_information.chunks "
        "WHERE hypertable_name = %s AND range_start <= %s AND %s < range_end",
        [table, ts, ts],
    )
    return bool(compressed)


def _changed(result: bars_trades.WriteResult) -> tuple[int, int]:
    return result.inserted, result.updated


def _bar(symbol: Symbol, ts: datetime, close: int, volume: int = 10) -> BarIn:
    return BarIn(symbol.pk, "1m", ts, 1, 10 * P, 20 * P, 5 * P, close, volume)


def _bars_at(symbol: Symbol, start: datetime, end: datetime) -> list[tuple[datetime, int, int]]:
    page = bar_list(ticker=symbol.ticker, tf="1m", start=start, end=end, limit=10_000)
    return [(b.ts, b.close, b.volume) for b in page.bars]


def _copies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the table of every COPY a write makes: the table itself (the appending path)
    or its staging table (the staged upsert)."""
    tables: list[str] = []
    real = bars_trades._copy_payload

    def spy(cursor: Any, table: str, *args: Any, **kwargs: Any) -> None:
        tables.append(table)
        real(cursor, table, *args, **kwargs)

    monkeypatch.setattr(bars_trades, "_copy_payload", spy)
    return tables


@pytest.fixture
def compressed(timescaledb: None, make_symbol: Callable[..., Symbol]) -> Symbol:
    """A symbol with a 1m bar every 10 minutes over three days from T0, every bar chunk compressed."""
    symbol = make_symbol()
    bars_upsert(bars=[_bar(symbol, T0 + timedelta(minutes=m), (100 + m) * P) for m in range(0, 3 * 1440, 10)])
    _compress(BAR_TABLE)
    assert _compressed_at(BAR_TABLE, T0 + timedelta(days=1))
    return symbol


def test_bars_and_trades_are_partitioned_on_time_into_chunks(timescaledb, make_symbol):
    dimensions = _rows(
        "SELECT hypertable_name, column_name, time_interval FROM timescaledb_information.dimensions "
        "WHERE hypertable_name IN (%s, %s)",
        [BAR_TABLE, TRADE_TABLE],
    )
    assert sorted(dimensions) == [(BAR_TABLE, "ts", timedelta(days=7)), (TRADE_TABLE, "ts_event", timedelta(days=1))]

    symbol = make_symbol()
    bars_upsert(bars=[_bar(symbol, T0 + timedelta(days=d), 100 * P) for d in range(21)])
    trades_insert(
        trades=[
            TradeIn(symbol.pk, T0 + timedelta(hours=h), T0 + timedelta(hours=h), 1, h, 0, P, 1, "B") for h in range(72)
        ]
    )
    # Three weeks of bars span at least three 7-day chunks; three days of trades, three 1-day chunks.
    [(bar_chunks,)] = _rows(f"SELECT count(DISTINCT tableoid) FROM {BAR_TABLE} WHERE symbol_id = %s", [symbol.pk])
    [(trade_chunks,)] = _rows(f"SELECT count(DISTINCT tableoid) FROM {TRADE_TABLE} WHERE symbol_id = %s", [symbol.pk])
    assert bar_chunks >= 3
    assert trade_chunks == 3


def test_compression_is_segmented_by_symbol_and_timeframe(timescaledb):
    settings = _rows(
        "SELECT hypertable_name, attname, segmentby_column_index, orderby_column_index, orderby_asc "
        "FROM timescaledb_information.compression_settings WHERE hypertable_name IN (%s, %s)",
        [BAR_TABLE, TRADE_TABLE],
    )
    segments = {
        table: [name for _, name in sorted((s, n) for t, n, s, _, _ in settings if t == table and s)]
        for table in (BAR_TABLE, TRADE_TABLE)
    }
    assert segments == {BAR_TABLE: ["symbol_id", "timeframe"], TRADE_TABLE: ["symbol_id"]}
    # Within a segment, bars are ordered by time, newest first (marketdata/storage.py).
    assert (BAR_TABLE, "ts", None, 1, False) in settings


def test_a_late_bar_a_correction_and_a_repeat_in_a_compressed_chunk_through_the_staged_upsert(compressed, monkeypatch):
    symbol = compressed
    day = T0 + timedelta(days=1)
    late = _bar(symbol, day + timedelta(minutes=5), 777 * P)  # between two stored bars
    correction = _bar(symbol, day, 555 * P, volume=99)  # a stored bar, new values
    copies = _copies(monkeypatch)

    assert _changed(bars_upsert(bars=[late])) == (1, 0)
    assert _changed(bars_upsert(bars=[correction])) == (0, 1)
    assert _changed(bars_upsert(bars=[correction])) == (0, 0)  # a repeat changes nothing
    assert _changed(bars_upsert(bars=[late])) == (0, 0)

    # Older than what is stored for the series: each took the staged upsert.
    assert copies == ["bar_stage"] * 4
    assert _bars_at(symbol, day - timedelta(minutes=10), day + timedelta(minutes=20)) == [
        (day - timedelta(minutes=10), (100 + 1430) * P, 10),
        (day, 555 * P, 99),
        (day + timedelta(minutes=5), 777 * P, 10),
        (day + timedelta(minutes=10), (100 + 1450) * P, 10),
    ]
    [(rows, keys)] = _rows(
        f"SELECT count(*), count(DISTINCT (timeframe, ts, publisher_id)) FROM {BAR_TABLE} WHERE symbol_id = %s",
        [symbol.pk],
    )
    assert rows == keys == 3 * 144 + 1
    # Still served the same once the chunk is compressed again.
    _compress(BAR_TABLE)
    assert _compressed_at(BAR_TABLE, day)
    assert _bars_at(symbol, day, day + timedelta(minutes=6)) == [
        (day, 555 * P, 99),
        (day + timedelta(minutes=5), 777 * P, 10),
    ]


def test_a_new_series_and_a_repeat_in_a_compressed_chunk_through_the_appending_copy(
    compressed, make_symbol, monkeypatch
):
    other = make_symbol()
    day = T0 + timedelta(days=1)
    # Nothing stored for this symbol yet: its bars extend its series, so they are copied
    # straight into the table, into the chunk the first symbol's bars compressed.
    first = [_bar(other, day + timedelta(minutes=m), (200 + m) * P) for m in range(0, 60, 1)]
    copies = _copies(monkeypatch)
    assert _changed(bars_upsert(bars=first)) == (60, 0)
    assert copies == [BAR_TABLE]

    # Another writer stores the next minute meanwhile, and it is compressed; this process
    # still believes that minute is new, so it copies it straight in: the unique key must
    # refuse the copy (the stored row is in compressed data) and the staged upsert correct it.
    ts = day + timedelta(minutes=60)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {BAR_TABLE} (symbol_id, timeframe, ts, publisher_id, open, high, low, close, volume, "
            "anomalies, ingested_at) VALUES (%s, '1m', %s, 1, 1, 1, 1, 1, 1, 0, now())",
            [other.pk, ts],
        )
    _compress(BAR_TABLE)
    assert _compressed_at(BAR_TABLE, ts)
    copies.clear()
    assert _changed(bars_upsert(bars=[_bar(other, ts, 333 * P)])) == (0, 1)
    assert copies == [BAR_TABLE, "bar_stage"]

    assert _bars_at(other, day, day + timedelta(hours=2)) == [
        (day + timedelta(minutes=m), (200 + m) * P, 10) for m in range(60)
    ] + [(ts, 333 * P, 10)]
    [(rows,)] = _rows(f"SELECT count(*) FROM {BAR_TABLE} WHERE symbol_id = %s", [other.pk])
    assert rows == 61


def test_a_late_and_a_repeated_trade_in_a_compressed_chunk_are_stored_once(timescaledb, make_symbol):
    symbol = make_symbol()
    trades = [
        TradeIn(symbol.pk, T0 + timedelta(minutes=m), T0 + timedelta(minutes=m), 1, m, 0, P, 1, "B")
        for m in range(0, 120, 2)
    ]
    trades_insert(trades=trades)
    _compress(TRADE_TABLE)
    assert _compressed_at(TRADE_TABLE, T0)

    late = TradeIn(symbol.pk, T0 + timedelta(minutes=1), T0 + timedelta(minutes=1), 1, 1, 0, 2 * P, 5, "A")
    assert trades_insert(trades=[late, trades[10]]).inserted == 1  # the repeat is kept once
    assert trades_insert(trades=[late]).inserted == 0

    page = trade_list(ticker=symbol.ticker, start=T0, end=T0 + timedelta(minutes=3))
    assert [(t.ts_event, t.price, t.size) for t in page.trades] == [
        (T0, P, 1),
        (T0 + timedelta(minutes=1), 2 * P, 5),
        (T0 + timedelta(minutes=2), P, 1),
    ]
    [(rows,)] = _rows(f"SELECT count(*) FROM {TRADE_TABLE} WHERE symbol_id = %s", [symbol.pk])
    assert rows == 61


def _policies(table: str) -> dict[str, list[str]]:
    """The jobs of ``table`` that drop or compress data: their intervals, per kind."""
    jobs = _rows(
        "SELECT proc_name, coalesce(config->>'drop_after', config->>'compress_after') "
        "FROM timescaledb_information.jobs WHERE hypertable_name = %s ORDER BY job_id",
        [table],
    )
    found: dict[str, list[str]] = {}
    for proc, interval in jobs:
        found.setdefault(proc, []).append(interval)
    return found


def test_the_admin_sets_the_compression_policies_and_changes_them(timescaledb, admin_client):
    add = reverse("admin:marketdata_retentionpolicy_add")
    form = {"dataset": "XNAS.ITCH", "schema": "ohlcv-1m", "keep_days": 400, "compress_after_days": 2}
    assert admin_client.post(add, form).status_code == 302
    # No retention job: retention_apply drops the chunks (see the next test), and bumps the cache.
    assert _policies(BAR_TABLE) == {"policy_compression": ["2 days"]}

    policy = RetentionPolicy.objects.get(dataset="XNAS.ITCH", schema="ohlcv-1m")
    change = reverse("admin:marketdata_retentionpolicy_change", args=[policy.pk])
    assert admin_client.post(change, {**form, "keep_days": 500, "compress_after_days": 5}).status_code == 302
    # Replaced, not added beside the old one; trades keep the default.
    assert _policies(BAR_TABLE) == {"policy_compression": ["5 days"]}
    assert _policies(TRADE_TABLE) == {"policy_compression": ["7 days"]}

    delete = reverse("admin:marketdata_retentionpolicy_delete", args=[policy.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert _policies(BAR_TABLE) == {"policy_compression": ["7 days"]}


def test_retention_drops_whole_chunks_past_the_longest_window_and_trims_the_shorter_ones(timescaledb, make_symbol):
    RetentionPolicy.objects.create(dataset="XNAS.ITCH", schema="ohlcv-1m", keep_days=400)
    RetentionPolicy.objects.create(dataset="GLBX.MDP3", schema="ohlcv-1m", keep_days=30)
    nasdaq, cme = make_symbol("AAPL", dataset="XNAS.ITCH"), make_symbol("ESH4", dataset="GLBX.MDP3")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    bars_upsert(bars=[_bar(s, now - timedelta(days=age), P) for s in (nasdaq, cme) for age in (450, 100, 5)])
    _compress(BAR_TABLE)

    assert retention_apply(now=now)["ohlcv-1m"] == 3

    def ages(symbol: Symbol) -> list[int]:
        rows = _rows(f"SELECT ts FROM {BAR_TABLE} WHERE symbol_id = %s ORDER BY ts", [symbol.pk])
        return [(now - ts).days for (ts,) in rows]

    assert ages(nasdaq) == [100, 5]  # 400 days kept: the bars hypertable's window
    assert ages(cme) == [5]  # 30 days: trimmed row by row
    # The chunks past 400 days went whole (compressed ones too), not row by row.
    assert _rows(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = %s AND range_end <= %s",
        [BAR_TABLE, now - timedelta(days=400)],
    ) == [(0,)]


def test_the_daily_summary_is_refreshed_every_five_minutes(timescaledb):
    [(schedule, start_offset, end_offset)] = _rows(
        "SELECT schedule_interval, config->>'start_offset', config->>'end_offset' FROM timescaledb_information.jobs "
        "WHERE hypertable_name = %s AND proc_name = 'policy_refresh_continuous_aggregate'",
        [CAGG],
    )
    assert (schedule, start_offset, end_offset) == (timedelta(minutes=5), "3 days", "00:01:00")
