"""Quotes and status changes in the store, on both storage paths: exact values, absent sides as NULL,
publishers kept apart, idempotent writes through both COPY paths, retention (30 days by default, the
admin's policy rows), and on TimescaleDB the quotes hypertable, its compression and its chunk drops."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.urls import reverse

from marketdata.models import Quote, RetentionPolicy, StatusChange, Symbol
from marketdata.services import bars_trades
from marketdata.services.quotes import QuoteIn, quotes_insert
from marketdata.services.retention import retention_apply
from marketdata.services.status import StatusIn, status_changes_insert
from marketdata.storage import QUOTE_TABLE, table_policies
from marketdata.timeframes import QUOTE_SCHEMAS

pytestmark = pytest.mark.django_db(transaction=True)

P = 1_000_000_000
MBP1, BBO1S, CBBO1M = QUOTE_SCHEMAS["mbp-1"], QUOTE_SCHEMAS["bbo-1s"], QUOTE_SCHEMAS["cbbo-1m"]
KEY = ("ts_recv", "publisher_id", "schema", "sequence", "ordinal")
T0 = (datetime.now(UTC) - timedelta(days=3)).replace(microsecond=0)


def _rows(query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        return list(cursor.fetchall())


def _quote(symbol: Symbol, ts: datetime, *, publisher: int = 2, schema: int = MBP1, seq: int = 1,
           ordinal: int = 0, bid: int | None = 100 * P, ask: int | None = 101 * P) -> QuoteIn:  # fmt: skip
    return QuoteIn(
        symbol.pk, ts, ts - timedelta(microseconds=5), publisher, schema, seq, ordinal,
        bid, ask, None if bid is None else 300, None if ask is None else 100,
        None if bid is None else 3, None if ask is None else 1,
    )  # fmt: skip


def _stored(symbol: Symbol) -> list[tuple[Any, ...]]:
    fields = ("ts_recv", "ts_event", "publisher_id", "schema", "sequence", "ordinal", "bid_px", "ask_px",
              "bid_sz", "ask_sz", "bid_ct", "ask_ct", "bid_publisher_id", "ask_publisher_id")  # fmt: skip
    return list(Quote.objects.filter(symbol=symbol).order_by(*KEY).values_list(*fields))


def _copies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The table of every COPY a write makes: the quotes table (appending) or its staging table."""
    tables: list[str] = []
    real = bars_trades._copy_payload

    def spy(cursor: Any, table: str, *args: Any, **kwargs: Any) -> None:
        tables.append(table)
        real(cursor, table, *args, **kwargs)

    monkeypatch.setattr(bars_trades, "_copy_payload", spy)  # the COPY that quotes_insert makes, through insert_once
    return tables


def test_quotes_are_stored_exactly_with_absent_sides_as_null(make_symbol):
    symbol = make_symbol("AAPL")
    rows = [
        _quote(symbol, T0),
        _quote(symbol, T0 + timedelta(seconds=1), bid=None),
        _quote(symbol, T0 + timedelta(seconds=2), ask=None),
        _quote(symbol, T0 + timedelta(seconds=3), bid=None, ask=None)._replace(ts_event=None),
        _quote(symbol, T0 + timedelta(seconds=4), schema=CBBO1M)._replace(
            bid_ct=None, ask_ct=None, bid_publisher_id=29, ask_publisher_id=23
        ),
    ]

    result = quotes_insert(quotes=rows)

    assert (result.received, result.inserted) == (5, 5)
    assert _stored(symbol) == [tuple(row[1:]) for row in rows]
    # NULL, not zero: no absent side is stored as a price, size or count of 0.
    assert not Quote.objects.filter(symbol=symbol, bid_px=0).exists()
    absent_bids = Quote.objects.filter(symbol=symbol, bid_px__isnull=True, bid_sz__isnull=True, bid_ct__isnull=True)
    assert absent_bids.count() == 2


def test_a_repeat_changes_nothing_through_either_copy_path(make_symbol, monkeypatch):
    symbol = make_symbol("AAPL")
    first = [_quote(symbol, T0 + timedelta(seconds=s), seq=s) for s in range(10)]
    copies = _copies(monkeypatch)
    assert quotes_insert(quotes=first).inserted == 10
    before = _rows(f"SELECT symbol_id, ts_recv, ingested_at FROM {QUOTE_TABLE} ORDER BY ts_recv")

    again = quotes_insert(quotes=first)  # nothing newer than stored: the staged insert, which keeps them once
    late = quotes_insert(quotes=[*first[:3], _quote(symbol, T0 - timedelta(seconds=1))])

    assert (again.inserted, again.unchanged) == (0, 10)
    assert (late.inserted, late.unchanged) == (1, 3)
    assert copies == [QUOTE_TABLE, "quote_stage", "quote_stage"]  # appended, then (not newer) staged
    assert _rows(f"SELECT symbol_id, ts_recv, ingested_at FROM {QUOTE_TABLE} WHERE ts_recv >= %s ORDER BY ts_recv",
                 [T0]) == before  # fmt: skip
    assert Quote.objects.filter(symbol=symbol).count() == 11


def test_publishers_and_schemas_of_one_instrument_are_kept_apart(make_symbol):
    symbol = make_symbol("AAPL  250221C00250000", dataset="OPRA.PILLAR")
    rows = [_quote(symbol, T0, publisher=p, bid=(100 + p) * P) for p in (24, 30, 34)]
    rows.append(_quote(symbol, T0, publisher=30, schema=BBO1S))
    rows.append(_quote(symbol, T0, publisher=30, ordinal=1, ask=None))  # a second update of one packet

    assert quotes_insert(quotes=rows).inserted == 5
    assert sorted((r[2], r[3], r[5], r[6]) for r in _stored(symbol)) == [
        (24, MBP1, 0, 124 * P), (30, MBP1, 0, 130 * P), (30, MBP1, 1, 100 * P), (30, BBO1S, 0, 100 * P),
        (34, MBP1, 0, 134 * P),
    ]  # fmt: skip


def test_status_changes_are_stored_once_with_unknown_flags_as_null(make_symbol):
    symbol = make_symbol("AAPL")
    halt = StatusIn(symbol.pk, T0, T0 - timedelta(microseconds=3), 2, 0, 8, 50, 0, False, None, None)
    resume = StatusIn(symbol.pk, T0 + timedelta(minutes=5), None, 2, 0, 7, 0, 0, True, True, False)

    assert status_changes_insert(changes=[halt, resume]).inserted == 2
    assert status_changes_insert(changes=[halt, resume]).inserted == 0

    stored = StatusChange.objects.filter(symbol=symbol).order_by("ts_recv")
    fields = ("ts_recv", "ts_event", "publisher_id", "ordinal", "action", "reason", "trading_event",
              "is_trading", "is_quoting", "is_short_sell_restricted")  # fmt: skip
    assert list(stored.values_list(*fields)) == [tuple(halt[1:]), tuple(resume[1:])]


def test_quotes_keep_thirty_days_by_default_and_what_a_policy_row_says(make_symbol):
    now = datetime.now(UTC).replace(microsecond=0)
    nasdaq, cme = make_symbol("AAPL", dataset="XNAS.ITCH"), make_symbol("ESH4", dataset="GLBX.MDP3")
    RetentionPolicy.objects.create(dataset="GLBX.MDP3", schema="mbp-1", keep_days=90)
    quotes_insert(quotes=[_quote(s, now - timedelta(days=age)) for s in (nasdaq, cme) for age in (120, 45, 5)])
    quotes_insert(quotes=[_quote(nasdaq, now - timedelta(days=45), schema=BBO1S)])

    removed = retention_apply(now=now)

    def ages(symbol: Symbol) -> list[int]:
        return [(now - ts).days for ts, *_ in _stored(symbol)]

    assert ages(nasdaq) == [5]  # no row for XNAS.ITCH mbp-1 or bbo-1s: 30 days
    assert ages(cme) == [45, 5]  # its row: 90 days
    assert (removed["mbp-1"], removed["bbo-1s"]) == (3, 1)
    # A hypertable keeps its longest window: the quotes' default, or a longer row.
    assert table_policies([])[QUOTE_TABLE] == (30, 7)
    assert table_policies([("GLBX.MDP3", "mbp-1", 90, 2)])[QUOTE_TABLE] == (90, 2)


@pytest.mark.timescaledb
def test_quotes_are_a_hypertable_compressed_by_symbol(timescaledb):
    assert _rows(
        "SELECT attname, segmentby_column_index FROM timescaledb_information.compression_settings "
        "WHERE hypertable_name = %s AND segmentby_column_index IS NOT NULL",
        [QUOTE_TABLE],
    ) == [("symbol_id", 1)]
    assert _rows(
        "SELECT column_name, time_interval FROM timescaledb_information.dimensions WHERE hypertable_name = %s",
        [QUOTE_TABLE],
    ) == [("ts_recv", timedelta(days=1))]
    assert _rows("SELECT count(*) FROM timescaledb_information.jobs WHERE hypertable_name = %s "
                 "AND proc_name = 'policy_compression'", [QUOTE_TABLE]) == [(1,)]  # fmt: skip


@pytest.mark.timescaledb
def test_a_repeat_into_a_compressed_chunk_is_stored_once(timescaledb, make_symbol: Callable[..., Symbol]):
    symbol = make_symbol("AAPL")
    rows = [_quote(symbol, T0 + timedelta(minutes=m), seq=m, bid=None if m % 3 else 50 * P) for m in range(0, 2880, 7)]
    quotes_insert(quotes=rows)
    _rows("SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks(%s) c", [QUOTE_TABLE])
    assert _rows("SELECT bool_and(is_compressed) FROM timescaledb_information.chunks WHERE hypertable_name = %s",
                 [QUOTE_TABLE]) == [(True,)]  # fmt: skip

    assert quotes_insert(quotes=rows).inserted == 0
    assert quotes_insert(quotes=[_quote(symbol, T0 + timedelta(seconds=30))]).inserted == 1
    assert _stored(symbol)[0][0] == T0
    assert Quote.objects.filter(symbol=symbol).count() == len(rows) + 1


@pytest.mark.timescaledb
def test_retention_drops_whole_quote_chunks(timescaledb, make_symbol):
    now = datetime.now(UTC).replace(microsecond=0)
    symbol = make_symbol("AAPL")
    quotes_insert(quotes=[_quote(symbol, now - timedelta(days=age)) for age in (40, 35, 2)])

    assert retention_apply(now=now)["mbp-1"] == 2
    assert [(now - ts).days for ts, *_ in _stored(symbol)] == [2]
    assert _rows(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = %s AND range_end <= %s",
        [QUOTE_TABLE, now - timedelta(days=30)],
    ) == [(0,)]


def test_the_admin_sets_a_quote_schema_policy(admin_client):
    add = reverse("admin:marketdata_retentionpolicy_add")
    form = {"dataset": "XNAS.ITCH", "schema": "mbp-1", "keep_days": 10, "compress_after_days": 2}

    assert admin_client.post(add, form).status_code == 302

    assert RetentionPolicy.objects.filter(dataset="XNAS.ITCH", schema="mbp-1", keep_days=10).exists()
    assert admin_client.post(add, {**form, "schema": "status"}).status_code == 200  # status is always kept: no row


@pytest.mark.timescaledb
def test_the_admin_sets_the_quotes_compression_policy(timescaledb, admin_client):
    add = reverse("admin:marketdata_retentionpolicy_add")
    form = {"dataset": "XNAS.ITCH", "schema": "tbbo", "keep_days": 10, "compress_after_days": 2}

    assert admin_client.post(add, form).status_code == 302

    assert _rows(
        "SELECT config->>'compress_after' FROM timescaledb_information.jobs WHERE hypertable_name = %s",
        [QUOTE_TABLE],
    ) == [("2 days",)]
