"""ingest historical: the real databento.Historical client against a stand-in of Databento's HTTP API."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import databento_dbn as dbn
import pytest

from ingest.retry import Backoff
from ingest.sources import historical
from ingest.sources.historical import HistoricalStats, run_historical
from ingest.sources.keys import ApiKeyError
from marketdata.errors import ValidationError
from marketdata.models import Bar, Quote, Symbol, Trade

from .databento_http import Catalogue, DatabentoHistoricalServer, Recorded, daily_ids, minute_bars, tbbo, trades

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e, pytest.mark.usefixtures("publish_host")]

KEY = "db-Hist0ricalStandInKey000000001"
DATASET = "XNAS.ITCH"
TICKERS = ["AAPL", "MSFT"]
DAYS = [date(2024, 1, 2), date(2024, 1, 3), date(2024, 1, 4)]
START = datetime(2024, 1, 2, tzinfo=UTC)
END = datetime(2024, 1, 5, tzinfo=UTC)
DAY = timedelta(days=1)
FAST = Backoff(base_s=0.01, cap_s=0.05)
ATTEMPTS = 3
BARS_A_DAY = 390 * len(TICKERS)  # the regular session, 14:30-21:00 UTC
TRADES_A_DAY = 200 * len(TICKERS)


class Crash(Exception):
    """The ingester process dying mid-run."""


@pytest.fixture
def catalogue() -> Catalogue:
    recorded = Catalogue(DATASET)
    daily_ids(recorded, TICKERS, DAYS)
    minute_bars(recorded, TICKERS, DAYS)
    trades(recorded, TICKERS, DAYS)
    tbbo(recorded, TICKERS, DAYS)
    return recorded


@pytest.fixture
def server(catalogue, tmp_path, monkeypatch) -> Iterator[DatabentoHistoricalServer]:
    with DatabentoHistoricalServer(key=KEY, catalogues=[catalogue], cert_dir=tmp_path) as stand_in:
        # The client forces https on any gateway; trust the stand-in's own certificate.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", stand_in.ca_file)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield stand_in


def fetch(server: DatabentoHistoricalServer, schema: str = "ohlcv-1m", **kwargs: Any) -> HistoricalStats:
    defaults: dict[str, Any] = {
        "dataset": DATASET, "symbols": TICKERS, "start": START, "end": END, "key": KEY, "chunk": DAY,
    }  # fmt: skip
    return run_historical(
        **(defaults | kwargs), schema=schema, gateway=server.gateway, publish=True, backoff=FAST, attempts=ATTEMPTS
    )


def us(ns: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)


def row(r: Recorded) -> tuple:
    """A served record as the store should hold it (times truncated to microseconds)."""
    m = r.record
    if isinstance(m, dbn.OHLCVMsg):
        return (r.ticker, "1m", us(m.ts_event), m.publisher_id, m.open, m.high, m.low, m.close, m.volume)
    return (r.ticker, us(m.ts_event), us(m.ts_recv), m.publisher_id, m.sequence, m.price, m.size, str(m.side))


def stored(schema: str) -> list[tuple]:
    tickers = dict(Symbol.objects.values_list("pk", "ticker"))
    if schema == "trades":
        return [
            (tickers[t.symbol_id], t.ts_event, t.ts_recv, t.publisher_id, t.sequence, t.price, t.size, t.side)
            for t in Trade.objects.order_by("ts_event", "symbol_id")
        ]
    return [
        (tickers[b.symbol_id], b.timeframe, b.ts, b.publisher_id, b.open, b.high, b.low, b.close, b.volume)
        for b in Bar.objects.order_by("ts", "symbol_id")
    ]


def served(catalogue: Catalogue, schema: str, start: datetime = START, end: datetime = END) -> list[Recorded]:
    ns = 1_000_000_000
    return catalogue.served(schema, int(start.timestamp()) * ns, int(end.timestamp()) * ns, TICKERS)


def windows(server: DatabentoHistoricalServer) -> list[tuple[datetime, datetime]]:
    return [(datetime.fromisoformat(r.form["start"]), datetime.fromisoformat(r.form["end"])) for r in server.get_ranges]


def crash_after(monkeypatch, records: int) -> None:
    """Make the run die once ``records`` records have been fed (everything fed before is stored)."""
    real = historical.HistoricalSource.records

    def cut(self, stopping):
        fed = 0
        for item in real(self, stopping):
            if isinstance(item, list):  # a list of records (the source's chunks)
                if fed + len(item) > records:
                    yield item[: records - fed]
                    raise Crash(f"killed after {records} records")
                fed += len(item)
            yield item

    monkeypatch.setattr(historical.HistoricalSource, "records", cut)


def test_three_days_of_minute_bars_in_daily_chunks_store_exactly_what_was_served(server, catalogue):
    stats = fetch(server)

    expected = sorted(row(r) for r in served(catalogue, "ohlcv-1m"))
    assert sorted(stored("ohlcv-1m")) == expected
    assert len(expected) == 3 * BARS_A_DAY
    assert windows(server) == [(START, START + DAY), (START + DAY, START + 2 * DAY), (START + 2 * DAY, END)]
    assert all(r.authorised and r.status == 200 for r in server.requests)
    assert [r.form["symbols"] for r in server.get_ranges] == ["AAPL,MSFT"] * 3
    assert {r.form["stype_in"] for r in server.get_ranges} == {"raw_symbol"}
    assert stats.written == len(expected)
    assert stats.complete
    assert stats.resumed_from is None
    assert not stats.errors
    assert not stats.skipped  # every record resolved by its own day's instrument_id

    # Run again: only the tail from the last stored bar is asked for, and nothing changes.
    again = fetch(server)
    assert windows(server)[3:] == [(datetime(2024, 1, 4, 20, 59, tzinfo=UTC), END)]
    assert again.resumed_from == datetime(2024, 1, 4, 20, 59, tzinfo=UTC)
    assert (again.written, again.duplicates) == (0, len(TICKERS))
    assert sorted(stored("ohlcv-1m")) == expected


def test_tbbo_is_stored_as_quotes_and_a_rerun_resumes_from_the_last_stored_quote(server, catalogue):
    stats = fetch(server, schema="tbbo")

    tickers = dict(Symbol.objects.values_list("pk", "ticker"))
    stored_quotes = sorted(
        (tickers[q.symbol_id], q.ts_recv, q.sequence, q.schema, q.bid_px, q.bid_sz, q.ask_px, q.ask_sz)
        for q in Quote.objects.all()
    )
    undef = 2**63 - 1
    expected = sorted(
        (r.ticker, us(m.ts_recv), m.sequence, 2, None if m.levels[0].bid_px == undef else m.levels[0].bid_px,
         None if m.levels[0].bid_px == undef else 10, m.levels[0].ask_px, 20)
        for r in served(catalogue, "tbbo") for m in [r.record]
    )  # fmt: skip
    assert stored_quotes == expected
    assert len(expected) == 3 * 50 * len(TICKERS)
    assert (stats.written, stats.complete, dict(stats.skipped)) == (len(expected), True, {})

    again = fetch(server, schema="tbbo")
    last = max(q[1] for q in stored_quotes if q[0] == "AAPL")
    assert again.resumed_from == min(last, max(q[1] for q in stored_quotes if q[0] == "MSFT"))
    assert again.written == 0
    assert Quote.objects.count() == len(expected)


@pytest.mark.parametrize(("schema", "first_chunk"), [("ohlcv-1m", BARS_A_DAY), ("trades", TRADES_A_DAY - len(TICKERS))])
def test_crash_mid_run_resumes_from_the_stored_max_with_no_gap_and_no_duplicate(
    server, catalogue, monkeypatch, schema, first_chunk
):
    cut = first_chunk + 301  # the crash comes part way into the second day's chunk
    crash_after(monkeypatch, cut)
    with pytest.raises(Crash):
        fetch(server, schema)

    everything = served(catalogue, schema)
    assert len(stored(schema)) == cut
    # Where the store ends: the earliest of each symbol's latest record, as the store keeps it.
    before = everything[:cut]
    resume = min(us(max(r.record.ts_event for r in before if r.ticker == t)) for t in TICKERS)
    assert resume > START + DAY

    monkeypatch.undo()  # the process restarts; the stand-in keeps its request log
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", server.ca_file)
    first_run = len(server.get_ranges)
    stats = fetch(server, schema)

    assert windows(server)[first_run:] == [(resume, START + 2 * DAY), (START + 2 * DAY, END)]
    assert stats.resumed_from == resume
    assert stats.complete
    final = stored(schema)
    assert sorted(final) == sorted(row(r) for r in everything)
    assert len(final) == len(everything)
    if schema == "trades":
        assert Trade.objects.values("symbol_id", "ts_event", "sequence").distinct().count() == len(everything)
    else:
        assert Bar.objects.values("symbol_id", "ts").distinct().count() == len(everything)
    assert stats.duplicates >= 1  # the resume timestamp itself came again and was absorbed


def test_connection_dropped_on_the_second_chunk_until_retries_run_out_then_rerun_resumes(server, catalogue):
    server.fail(abort=True, on=2)
    server.fail(abort=True, on=3)
    server.fail(abort=True, on=4)

    stats = fetch(server)

    assert [r.aborted for r in server.get_ranges] == [False, True, True, True]
    assert stats.errors["api_unavailable"] == 1
    assert "failed 3 times" in stats.last_error
    assert "Response ended prematurely" in stats.last_error
    assert stats.warnings["api_retry"] == 2
    assert not stats.complete
    assert stats.fetched_until == START + DAY
    assert sorted(stored("ohlcv-1m")) == sorted(row(r) for r in served(catalogue, "ohlcv-1m", START, START + DAY))

    again = fetch(server)

    # The rest of the interrupted chunk from the last stored bar, then the chunks not yet asked for.
    assert windows(server)[4:] == [
        (datetime(2024, 1, 2, 20, 59, tzinfo=UTC), START + DAY),
        (START + DAY, START + 2 * DAY),
        (START + 2 * DAY, END),
    ]
    assert again.complete
    assert sorted(stored("ohlcv-1m")) == sorted(row(r) for r in served(catalogue, "ohlcv-1m"))


def test_a_500_once_is_retried_and_the_run_completes(server, catalogue):
    server.fail(status=500, detail="Internal server error", on=2)

    stats = fetch(server)

    assert [r.status for r in server.get_ranges] == [200, 500, 200, 200]
    assert server.get_ranges[1].form == server.get_ranges[2].form
    assert stats.warnings["api_retry"] == 1
    assert not stats.errors
    assert stats.complete
    assert sorted(stored("ohlcv-1m")) == sorted(row(r) for r in served(catalogue, "ohlcv-1m"))


def test_a_4xx_is_counted_with_databentos_message_not_retried_and_stops_the_run(server):
    detail = "data_end_after_available_end: the dataset's data ends before the requested end"
    server.fail(status=422, detail=detail, on=2)

    stats = fetch(server)

    assert [r.status for r in server.get_ranges] == [200, 422]
    assert stats.errors["api_client_error"] == 1
    assert "422" in stats.last_error
    assert detail in stats.last_error
    assert not stats.complete
    assert "INCOMPLETE" in stats.summary()
    assert Bar.objects.count() == BARS_A_DAY


def test_a_key_the_api_does_not_know_is_refused_by_the_server(server):
    stats = fetch(server, key="db-" + "Z" * 29)

    assert [(r.authorised, r.status) for r in server.get_ranges] == [(False, 401)]
    assert stats.errors["api_client_error"] == 1
    assert "401" in stats.last_error
    assert Bar.objects.count() == 0


@pytest.mark.parametrize("key", [None, "", "   ", "db-short", "xx-" + "a" * 29, "db-" + "a" * 28 + "!"])
def test_missing_or_malformed_key_fails_before_any_request(server, monkeypatch, key):
    monkeypatch.delenv("DATABENTO_API_KEY", raising=False)

    with pytest.raises(ApiKeyError, match=r"DATABENTO_API_KEY is (not set|malformed)"):
        fetch(server, key=key)

    assert server.requests == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schema": "mbo"}, "schema"),
        ({"dataset": "xnas"}, "dataset"),
        ({"symbols": [" ", ""]}, "symbols"),
        ({"start": datetime(2024, 1, 2)}, "start"),  # naive
        ({"end": datetime(2024, 1, 5)}, "end"),  # naive
        ({"start": END, "end": START}, "start"),
        ({"chunk": timedelta(0)}, "chunk"),
    ],
)
def test_bad_arguments_are_named_before_any_request(server, change, field):
    with pytest.raises(ValidationError) as caught:
        fetch(server, **change)

    assert caught.value.field == field
    assert server.requests == []


def test_trades_including_those_received_after_midnight(server, catalogue):
    stats = fetch(server, "trades")

    expected = sorted(row(r) for r in served(catalogue, "trades"))
    assert sorted(stored("trades")) == expected
    # Each day's last trade is stamped before midnight and received after it: the API
    # filters trades on ts_recv, so it comes with the next day's chunk, stored at its ts_event.
    late = [
        r
        for r in served(catalogue, "trades")
        if r.record.ts_event // 86_400_000_000_000 < r.index_ts // 86_400_000_000_000
    ]
    assert len(late) == 2 * len(TICKERS)
    assert {row(r) for r in late} <= set(stored("trades"))
    assert len(expected) == 3 * TRADES_A_DAY - len(TICKERS)  # the last day's late trades fall past the end
    assert stats.complete
    assert not stats.skipped


def test_a_stop_request_before_a_chunk_ends_the_run(server):
    stopping = threading.Event()
    stopping.set()

    stats = fetch(server, stopping=stopping)

    assert server.requests == []
    assert not stats.complete
