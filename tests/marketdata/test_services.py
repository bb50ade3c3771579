"""bars_upsert and trades_insert on the real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import databento_dbn
import pytest

from marketdata.errors import ValidationError
from marketdata.models import Bar, Trade
from marketdata.services.bars_trades import UNDEF_PRICE, BarIn, TradeIn, bars_upsert, trades_insert
from tests.conftest import dbn_records

P = 1_000_000_000  # Databento fixed-point units per 1.0
T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def _bars(symbol_id: int, n: int = 5, *, close: int = 105_000_000_000) -> list[BarIn]:
    return [
        BarIn(symbol_id, "1m", T0 + timedelta(minutes=i), 2, 100 * P, 110 * P, 90 * P, close, 1000 + i)
        for i in range(n)
    ]


@pytest.mark.django_db(transaction=True)
def test_upsert_twice_changes_nothing(make_symbol):
    symbol = make_symbol("AAPL")
    first = bars_upsert(bars=_bars(symbol.pk))
    stamps = dict(Bar.objects.values_list("ts", "ingested_at"))
    second = bars_upsert(bars=_bars(symbol.pk))

    assert (first.inserted, first.updated) == (5, 0)
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 5)
    assert dict(Bar.objects.values_list("ts", "ingested_at")) == stamps


@pytest.mark.django_db(transaction=True)
def test_upsert_updates_a_changed_bar(make_symbol):
    symbol = make_symbol("AAPL")
    bars_upsert(bars=_bars(symbol.pk))
    result = bars_upsert(bars=_bars(symbol.pk, n=2, close=107_500_000_000))

    assert (result.inserted, result.updated) == (0, 2)
    closes = list(Bar.objects.order_by("ts").values_list("close", flat=True))
    assert closes == [107_500_000_000] * 2 + [105_000_000_000] * 3


@pytest.mark.django_db(transaction=True)
def test_duplicate_keys_in_one_batch_keep_the_last(make_symbol):
    symbol = make_symbol("AAPL")
    rows = _bars(symbol.pk, n=1) + _bars(symbol.pk, n=1, close=99_000_000_000)
    result = bars_upsert(bars=rows)

    assert result.inserted == 1
    assert Bar.objects.get().close == 99_000_000_000


@pytest.mark.django_db(transaction=True)
def test_opra_same_minute_bars_of_four_publishers_are_all_kept(make_symbol, samples):
    symbol = make_symbol("AAPL  250221C00250000", dataset="OPRA.PILLAR")
    records = [r for r in dbn_records(samples / "OPRA.PILLAR" / "test_data.ohlcv-1m.dbn.zst")
               if isinstance(r, databento_dbn.OHLCVMsg)]  # fmt: skip
    rows = [
        BarIn(symbol.pk, "1m", datetime.fromtimestamp(r.ts_event / 1e9, UTC), r.publisher_id,
              r.open, r.high, r.low, r.close, r.volume)
        for r in records
    ]  # fmt: skip

    result = bars_upsert(bars=rows)

    assert len({r.ts for r in rows}) == 1
    assert result.inserted == 4
    stored = {b.publisher_id: (b.open, b.close, b.volume) for b in Bar.objects.all()}
    assert stored == {r.publisher_id: (r.open, r.close, r.volume) for r in records}


@pytest.mark.django_db(transaction=True)
def test_naive_time_is_rejected_naming_the_field(make_symbol):
    symbol = make_symbol("AAPL")
    naive = _bars(symbol.pk, n=1)[0]._replace(ts=datetime(2024, 1, 2, 14, 30))

    with pytest.raises(ValidationError, match=r"^ts must be timezone-aware \(UTC\), got naive datetime") as info:
        bars_upsert(bars=[*_bars(symbol.pk, n=3), naive])

    assert info.value.field == "ts"
    assert "2024, 1, 2, 14, 30" in info.value.message
    assert not Bar.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("field", ["open", "high", "low", "close"])
def test_undefined_price_is_rejected_naming_the_field(make_symbol, field):
    symbol = make_symbol("AAPL")
    bad = _bars(symbol.pk, n=1)[0]._replace(**{field: UNDEF_PRICE})  # type: ignore[arg-type]
    if field == "low":
        bad = bad._replace(high=UNDEF_PRICE - 1)

    with pytest.raises(ValidationError, match=rf"^{field} is Databento's undefined price \(2\^63-1\)") as info:
        bars_upsert(bars=[bad])

    assert info.value.field == field
    assert str(UNDEF_PRICE) in info.value.message
    assert not Bar.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_high_below_low_is_rejected(make_symbol):
    symbol = make_symbol("AAPL")
    bad = _bars(symbol.pk, n=1)[0]._replace(high=1, low=2)
    with pytest.raises(ValidationError, match="high 1 is below low 2"):
        bars_upsert(bars=[bad])


@pytest.mark.django_db(transaction=True)
def test_trade_written_twice_is_kept_once(make_symbol, samples):
    symbol = make_symbol("QQQ", dataset="EQUS.MINI")
    records = [r for r in dbn_records(samples / "EQUS.MINI" / "test_data.trades.dbn.zst")
               if isinstance(r, databento_dbn.TradeMsg)]  # fmt: skip
    rows = [
        TradeIn(symbol.pk, datetime.fromtimestamp(r.ts_event // 1000 / 1e6, UTC),
                datetime.fromtimestamp(r.ts_recv // 1000 / 1e6, UTC), r.publisher_id, r.sequence, 0,
                r.price, r.size, str(r.side), int(r.flags))
        for r in records
    ]  # fmt: skip

    first = trades_insert(trades=rows)
    second = trades_insert(trades=rows)

    # Two of the sample's prints share ts_event and ts_recv: the sequence tells them apart.
    assert (first.inserted, second.inserted, second.unchanged) == (len(rows), 0, len(rows))
    assert Trade.objects.count() == len(rows) == 4


@pytest.mark.django_db(transaction=True)
def test_trade_with_naive_time_is_rejected(make_symbol):
    symbol = make_symbol("QQQ")
    naive = TradeIn(symbol.pk, datetime(2024, 1, 2), T0, 1, 1, 0, 100, 1, "B", 0)
    with pytest.raises(ValidationError, match=r"^ts_event must be timezone-aware") as info:
        trades_insert(trades=[naive])
    assert info.value.field == "ts_event"


@pytest.mark.django_db(transaction=True)
def test_a_stale_append_hint_falls_back_to_the_upsert_and_stays_correct(make_symbol):
    import psycopg
    from django.conf import settings

    from ops import metrics

    symbol = make_symbol("AAPL")
    bars_upsert(bars=_bars(symbol.pk, n=5))  # this process now believes 14:34 is the newest stored bar
    db = settings.DATABASES["default"]
    # Another writer (another process) stores 14:35 behind this one's back.
    with psycopg.connect(f"host={db['HOST']} port={db['PORT']} user={db['USER']} dbname={db['NAME']}") as other:
        other.execute(
            "INSERT INTO marketdata_bar (symbol_id, timeframe, ts, publisher_id, open, high, low, close, volume)"
            " VALUES (%s, '1m', %s, 2, 1, 1, 1, 1, 1)",
            [symbol.pk, T0 + timedelta(minutes=5)],
        )
    fallbacks = metrics.DB_APPEND_FALLBACKS._value.get()

    later = [row._replace(ts=row.ts + timedelta(minutes=5)) for row in _bars(symbol.pk, n=3)]
    result = bars_upsert(bars=later)

    assert (result.inserted, result.updated) == (2, 1)  # 14:35 corrected, 14:36 and 14:37 new
    assert metrics.DB_APPEND_FALLBACKS._value.get() == fallbacks + 1
    assert Bar.objects.count() == 8
    assert Bar.objects.get(ts=T0 + timedelta(minutes=5)).close == later[0].close


@pytest.mark.django_db(transaction=True)
def test_appending_batches_take_the_copy_path(make_symbol):
    from ops import metrics

    symbol = make_symbol("AAPL")
    fallbacks = metrics.DB_APPEND_FALLBACKS._value.get()
    first = bars_upsert(bars=_bars(symbol.pk, n=3))
    second = bars_upsert(bars=[row._replace(ts=row.ts + timedelta(minutes=3)) for row in _bars(symbol.pk, n=3)])
    again = bars_upsert(bars=_bars(symbol.pk, n=3))  # older than what is stored: the upsert path

    assert (first.inserted, second.inserted, again.unchanged) == (3, 3, 3)
    assert metrics.DB_APPEND_FALLBACKS._value.get() == fallbacks
    assert Bar.objects.count() == 6


@pytest.mark.django_db(transaction=True)
def test_a_refused_append_inside_a_callers_transaction_keeps_the_rest_of_it(make_symbol):
    from django.db import transaction

    from ops import metrics

    symbol = make_symbol("AAPL")
    other = make_symbol("MSFT")
    fallbacks = metrics.DB_APPEND_FALLBACKS._value.get()
    with transaction.atomic():
        bars_upsert(bars=_bars(other.pk, n=2))
        # Two rows with one key: the copy is refused, its savepoint (not the caller's
        # transaction) rolls back, and the staged upsert keeps the last row.
        result = bars_upsert(bars=_bars(symbol.pk, n=1) + _bars(symbol.pk, n=1, close=99 * P))

    assert result.inserted == 1
    assert metrics.DB_APPEND_FALLBACKS._value.get() == fallbacks + 1
    assert Bar.objects.filter(symbol=other).count() == 2
    assert Bar.objects.get(symbol=symbol).close == 99 * P


@pytest.mark.django_db(transaction=True)
def test_a_bad_row_in_an_appending_batch_writes_nothing(make_symbol):
    symbol = make_symbol("AAPL")
    rows = _bars(symbol.pk, n=5)
    rows[3] = rows[3]._replace(low=rows[3].high + 1)

    with pytest.raises(ValidationError, match="high"):
        bars_upsert(bars=rows)
    assert not Bar.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("table", ["marketdata_bar", "marketdata_trade"])
def test_ingested_at_defaults_to_the_clock_not_the_transaction_start(table):
    """A volatile default keeps COPY into the table off its multi-insert path (see models.Bar)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_default FROM information_schema.columns"
            " WHERE table_name = %s AND column_name = 'ingested_at'",
            [table],
        )
        (default,) = cursor.fetchone()
    assert "clock_timestamp()" in default


def _trades(symbol_id: int, n: int = 5, *, start: datetime = T0, seq0: int = 0) -> list[TradeIn]:
    return [
        TradeIn(symbol_id, start + timedelta(seconds=i), start + timedelta(seconds=i), 2, seq0 + i, 0, 100 * P, 10, "B")
        for i in range(n)
    ]


@pytest.mark.django_db(transaction=True)
def test_appending_trade_batches_take_the_copy_path(make_symbol):
    from ops import metrics

    symbol = make_symbol("AAPL")
    fallbacks = metrics.DB_APPEND_FALLBACKS._value.get()
    first = trades_insert(trades=_trades(symbol.pk, n=3))
    second = trades_insert(trades=_trades(symbol.pk, n=3, start=T0 + timedelta(minutes=1), seq0=10))
    again = trades_insert(trades=_trades(symbol.pk, n=3))  # not newer than what is stored: the staged path

    assert (first.inserted, second.inserted, again.inserted, again.unchanged) == (3, 3, 0, 3)
    assert metrics.DB_APPEND_FALLBACKS._value.get() == fallbacks
    assert Trade.objects.count() == 6


@pytest.mark.django_db(transaction=True)
def test_a_trade_at_the_newest_stored_time_with_another_sequence_is_kept(make_symbol):
    symbol = make_symbol("AAPL")
    trades_insert(trades=_trades(symbol.pk, n=3))
    last = _trades(symbol.pk, n=3)[-1]
    result = trades_insert(trades=[last._replace(sequence=99), last._replace(ts_event=last.ts_event + timedelta(1))])

    assert result.inserted == 2
    assert Trade.objects.count() == 5


@pytest.mark.django_db(transaction=True)
def test_a_refused_trade_append_falls_back_and_keeps_one_of_each(make_symbol):
    import psycopg
    from django.conf import settings

    from ops import metrics

    symbol = make_symbol("AAPL")
    trades_insert(trades=_trades(symbol.pk, n=2))  # this process now believes T0+1s is the newest
    db = settings.DATABASES["default"]
    with psycopg.connect(f"host={db['HOST']} port={db['PORT']} user={db['USER']} dbname={db['NAME']}") as other:
        later = _trades(symbol.pk, n=2, start=T0 + timedelta(minutes=1), seq0=10)
        other.execute(  # another writer stores the first of the next batch behind this one's back
            "INSERT INTO marketdata_trade (symbol_id, ts_event, ts_recv, publisher_id, sequence, ordinal, price,"
            " size, side, flags) VALUES (%s, %s, %s, 2, 10, 0, %s, 10, 'B', 0)",
            [symbol.pk, later[0].ts_event, later[0].ts_recv, 100 * P],
        )
    fallbacks = metrics.DB_APPEND_FALLBACKS._value.get()
    result = trades_insert(trades=later + later[1:])  # and this batch repeats a trade

    assert (result.inserted, result.unchanged) == (1, 2)
    assert metrics.DB_APPEND_FALLBACKS._value.get() == fallbacks + 1
    assert Trade.objects.count() == 4


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["bars", "trades"])
def test_before_commit_runs_with_the_rows_sent_and_uncommitted_and_its_error_stores_nothing(make_symbol, kind):
    """The appending copy is its own statement in autocommit: before_commit runs before the
    copy's end commits it (the ingester orders its writers' commits there)."""
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    dsn = f"host={db['HOST']} port={db['PORT']} user={db['USER']} dbname={db['NAME']}"
    symbol = make_symbol("AAPL")
    table = "marketdata_bar" if kind == "bars" else "marketdata_trade"
    rows = _bars(symbol.pk, n=4)
    trades = [TradeIn(symbol.pk, r.ts, r.ts, 2, i, 0, 100 * P, 10, "B", 0) for i, r in enumerate(rows)]
    seen: list[int] = []

    def count_elsewhere() -> None:  # what another session sees at that moment
        with psycopg.connect(dsn, autocommit=True) as other:
            row = other.execute(f"SELECT count(*) FROM {table}").fetchone()
            seen.append(row[0] if row else -1)

    def write(before_commit):
        if kind == "bars":
            return bars_upsert(bars=rows, before_commit=before_commit)
        return trades_insert(trades=trades, before_commit=before_commit)

    def refuse() -> None:
        count_elsewhere()
        raise RuntimeError("not this one's turn")

    with pytest.raises(RuntimeError, match="turn"):
        write(refuse)
    assert seen == [0]
    assert not (Bar if kind == "bars" else Trade).objects.exists()  # the copy was aborted: nothing stored

    result = write(count_elsewhere)
    assert seen == [0, 0]  # not committed while before_commit ran...
    assert result.inserted == 4
    assert (Bar if kind == "bars" else Trade).objects.count() == 4  # ...and committed after it
