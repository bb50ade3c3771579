"""Quotes (mbp-1, tbbo, bbo-1s/1m, cbbo-1s/1m) and status through the real pipeline: every sample file
stored exactly as databento_dbn decodes it, a replay changing nothing, publishers and schemas kept apart,
absent sides NULL, symbology by date, status records (written with databento_dbn's StatusMsg) as changes."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import databento
import databento_dbn as dbn
import pytest

from ingest.records import Normaliser
from ingest.sources.replay import run_replay
from ingest.stats import Stats
from ingest.symbology import Resolver
from marketdata.columns import concat
from marketdata.models import FeedStatus, Quote, StatusChange, Symbol
from marketdata.timeframes import QUOTE_SCHEMAS
from tests.conftest import SAMPLES, dbn_records

from .dbnfile import NS, P, write

pytestmark = pytest.mark.django_db(transaction=True)

TOP_OF_BOOK = ("mbp-1", "tbbo", "bbo-1s", "bbo-1m", "cbbo-1s", "cbbo-1m")
SAMPLE_FILES = sorted(p for p in SAMPLES.glob("*/test_data.*.dbn.zst") if p.name.split(".")[1] in TOP_OF_BOOK)
UNDEF_PRICE = 2**63 - 1
UNDEF_TS = 2**64 - 1
FIELDS = ("ts_recv", "ts_event", "publisher_id", "schema", "sequence", "ordinal", "bid_px", "ask_px", "bid_sz",
          "ask_sz", "bid_ct", "ask_ct", "bid_publisher_id", "ask_publisher_id")  # fmt: skip


def _us(ts: datetime | None) -> int | None:
    return None if ts is None else int(ts.timestamp()) * 1_000_000 + ts.microsecond


def _s(ts: datetime) -> int:
    return int(ts.timestamp())


def _expected(path: Path) -> list[tuple[Any, ...]]:
    """Each quote of ``path`` as Databento's own reader decodes it: (ticker, *FIELDS), in file order.

    An undefined price makes its side absent (None in price, size and count); ordinals number
    the records of one (symbol, publisher, schema) that repeat the one before's ts_recv and sequence.
    """
    store = databento.DBNStore.from_file(path)
    schema = str(store.metadata.schema)
    tickers = {int(i["symbol"]): ticker for ticker, intervals in store.metadata.mappings.items() for i in intervals}
    last: dict[tuple[str, int], tuple[int, int, int]] = {}
    rows = []
    r: Any
    for r in dbn_records(path):
        level = r.levels[0]
        cbbo = isinstance(r, dbn.CBBOMsg)
        sequence = 0 if cbbo else r.sequence
        ticker = tickers[r.instrument_id]
        before = last.get((ticker, r.publisher_id))
        ordinal = before[2] + 1 if before is not None and before[:2] == (r.ts_recv, sequence) else 0
        last[(ticker, r.publisher_id)] = (r.ts_recv, sequence, ordinal)
        sides: dict[str, Any] = {}
        for side in ("bid", "ask"):
            present = getattr(level, f"{side}_px") != UNDEF_PRICE
            sides[side] = (
                getattr(level, f"{side}_px") if present else None,
                getattr(level, f"{side}_sz") if present else None,
                None if cbbo or not present else getattr(level, f"{side}_ct"),
                int(getattr(level, f"{side}_pb")) if cbbo and present else None,
            )
        rows.append((
            ticker, r.ts_recv // 1000, None if r.ts_event == UNDEF_TS else r.ts_event // 1000, r.publisher_id,
            QUOTE_SCHEMAS[schema], sequence, ordinal, sides["bid"][0], sides["ask"][0], sides["bid"][1],
            sides["ask"][1], sides["bid"][2], sides["ask"][2], sides["bid"][3], sides["ask"][3],
        ))  # fmt: skip
    return rows


def _stored(**filters: Any) -> list[tuple[Any, ...]]:
    tickers = dict(Symbol.objects.values_list("pk", "ticker"))
    rows = Quote.objects.filter(**filters).values_list("symbol_id", *FIELDS)
    return [(tickers[s], _us(recv), _us(event), *rest) for s, recv, event, *rest in rows]


def _replay(*paths: Path) -> dict[str, Stats]:
    results = run_replay(paths=list(paths), speed=None, loop=False, symbols=None, publish=False, install_signals=False)
    assert not any(stats.errors for stats in results.values())
    return results


def test_every_top_of_book_schema_has_samples():
    assert {p.name.split(".")[1] for p in SAMPLE_FILES} == set(TOP_OF_BOOK)
    assert len(SAMPLE_FILES) == 22  # mbp-1 and tbbo of six datasets, bbo of four, cbbo of OPRA


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_sample_stores_what_databento_decodes(path):
    results = _replay(path)

    expected = _expected(path)
    assert sorted(_stored(), key=repr) == sorted(expected, key=repr)
    assert len(expected) == len(dbn_records(path)) > 0  # every record a row: none merged, none skipped
    [stats] = results.values()
    assert (stats.written, stats.duplicates, sum(stats.skipped.values())) == (len(expected), 0, 0)
    assert FeedStatus.objects.get(schema=path.name.split(".")[1]).records_written == len(expected)


def test_a_replay_of_every_sample_changes_nothing():
    _replay(*SAMPLE_FILES)
    before = sorted(Quote.objects.values_list(*FIELDS, "ingested_at"), key=repr)

    results = _replay(*SAMPLE_FILES)

    assert sorted(Quote.objects.values_list(*FIELDS, "ingested_at"), key=repr) == before
    assert sum(s.written for s in results.values()) == 0
    assert sum(s.duplicates for s in results.values()) == len(before) == sum(len(_expected(p)) for p in SAMPLE_FILES)


def test_publishers_and_schemas_of_one_instrument_are_kept_apart():
    opra = SAMPLES / "OPRA.PILLAR"
    _replay(opra / "test_data.mbp-1.dbn.zst", opra / "test_data.tbbo.dbn.zst")

    mbp = _stored(schema=QUOTE_SCHEMAS["mbp-1"])
    # Four venues' updates of one option: two share their ts_recv and sequence, told apart by publisher.
    assert len({row[3] for row in mbp}) == len(mbp) == 4
    assert len({(row[1], row[5]) for row in mbp}) < len(mbp)
    assert len(_stored(schema=QUOTE_SCHEMAS["tbbo"])) == 4
    ice = SAMPLES / "IFEU.IMPACT"
    _replay(ice / "test_data.mbp-1.dbn.zst", ice / "test_data.tbbo.dbn.zst")
    # ICE's tbbo file repeats records of its mbp-1 file (same times and sequences): both kept, by schema.
    ice_rows = _stored(symbol__dataset="IFEU.IMPACT")
    assert [r[4] for r in ice_rows].count(QUOTE_SCHEMAS["tbbo"]) == 4
    assert {r[1:4] + r[5:] for r in ice_rows if r[4] == QUOTE_SCHEMAS["tbbo"]} & {
        r[1:4] + r[5:] for r in ice_rows if r[4] == QUOTE_SCHEMAS["mbp-1"]
    }


def test_absent_sides_are_null_never_zero():
    _replay(SAMPLES / "EQUS.MINI" / "test_data.bbo-1m.dbn.zst", SAMPLES / "XNAS.ITCH" / "test_data.mbp-1.dbn.zst")

    empty_book = Quote.objects.get(symbol__ticker="QQQ", ts_recv=datetime(2023, 3, 28, 9, 34, tzinfo=UTC))
    assert (empty_book.bid_px, empty_book.bid_sz, empty_book.bid_ct) == (None, None, None)
    assert (empty_book.ask_px, empty_book.ask_sz, empty_book.ask_ct) == (None, None, None)
    assert empty_book.ts_event is None  # no update yet: Databento's undefined time
    bid_only = Quote.objects.filter(symbol__ticker="NVDA").order_by("ts_recv").first()
    assert bid_only is not None
    assert (bid_only.bid_px, bid_only.bid_sz, bid_only.bid_ct) == (502 * P, 2, 1)
    assert (bid_only.ask_px, bid_only.ask_sz, bid_only.ask_ct) == (None, None, None)
    assert not Quote.objects.filter(bid_sz=0, bid_px__isnull=True).exists()


@pytest.mark.parametrize("path", SAMPLE_FILES[::5], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_one_record_at_a_time_normalises_as_a_run_does(path):
    store = databento.DBNStore.from_file(path)
    schema = str(store.metadata.schema)

    def normaliser() -> Normaliser:
        resolver = Resolver(dataset=store.metadata.dataset, allowed=None)
        resolver.add_metadata_mappings(store.metadata.mappings)
        normalise = Normaliser(resolver, Stats())
        normalise.feed_schema = schema
        return normalise

    records: list[Any] = dbn_records(path)
    single = normaliser()
    parts = [single.quote_columns([r]) for r in records]
    one_by_one = concat([part for part in parts if part is not None])
    assert len(one_by_one) == len(records)
    assert [single(r) for r in records[:1]] != [None]  # (the record path: one quote as columns)
    run = normaliser().quote_columns(records)
    assert run is not None
    assert [one_by_one.row(i) for i in range(len(one_by_one))] == [run.row(i) for i in range(len(run))]


def _metadata(schema: dbn.Schema, intervals: dict[str, list[tuple[date, date]]]) -> bytes:
    """DBN metadata mapping each raw symbol to instrument 7 over the given days."""
    mappings = [
        SimpleNamespace(
            raw_symbol=s, intervals=[SimpleNamespace(start_date=a, end_date=b, symbol="7") for a, b in days]
        )
        for s, days in intervals.items()
    ]
    return dbn.Metadata(
        dataset="XNAS.ITCH", schema=schema, start=0, stype_in=dbn.SType.RAW_SYMBOL, stype_out=dbn.SType.INSTRUMENT_ID,
        symbols=list(intervals), partial=[], not_found=[], mappings=mappings, end=None, limit=None, ts_out=False,
        version=3,
    ).encode()  # fmt: skip


DAY1 = 1_704_186_000  # 2024-01-02T09:00:00Z
DAY2 = DAY1 + 86_400


def test_a_quote_takes_the_symbol_of_its_day(tmp_path):
    header = _metadata(
        dbn.Schema.MBP_1,
        {"AAPL": [(date(2024, 1, 2), date(2024, 1, 3))], "MSFT": [(date(2024, 1, 3), date(2024, 1, 4))]},
    )
    quotes = [
        bytes(dbn.MBP1Msg(
            publisher_id=2, instrument_id=7, ts_event=(day + i) * NS, price=100 * P, size=1, action=dbn.Action.ADD,
            side=dbn.Side.BID, depth=0, ts_recv=(day + i) * NS + 5, sequence=i,
            levels=dbn.BidAskPair(bid_px=100 * P, ask_px=101 * P, bid_sz=1, ask_sz=2, bid_ct=1, ask_ct=1),  # type: ignore[arg-type]
        ))
        for day in (DAY1, DAY2) for i in range(2)
    ]  # fmt: skip
    _replay(write(tmp_path / "quotes.dbn", header, quotes))

    by_symbol = {
        t: sorted(map(_s, Quote.objects.filter(symbol__ticker=t).values_list("ts_recv", flat=True)))
        for t in ("AAPL", "MSFT")
    }  # fmt: skip
    assert by_symbol == {"AAPL": [DAY1, DAY1 + 1], "MSFT": [DAY2, DAY2 + 1]}


def _status(ts_s: int, action: dbn.StatusAction, reason: dbn.StatusReason, trading: dbn.TriState,
            quoting: dbn.TriState = dbn.TriState.NOT_AVAILABLE,
            ssr: dbn.TriState = dbn.TriState.NOT_AVAILABLE) -> bytes:  # fmt: skip
    return bytes(
        dbn.StatusMsg(
            publisher_id=2, instrument_id=7, ts_event=ts_s * NS, ts_recv=ts_s * NS + 700, action=action, reason=reason,
            trading_event=dbn.TradingEvent.NONE, is_trading=trading, is_quoting=quoting, is_short_sell_restricted=ssr,
        )
    )  # fmt: skip


def test_status_records_are_stored_as_changes_and_a_replay_changes_nothing(tmp_path):
    header = _metadata(dbn.Schema.STATUS, {"AAPL": [(date(2024, 1, 2), date(2024, 1, 3))]})
    records = [
        _status(DAY1, dbn.StatusAction.TRADING, dbn.StatusReason.SCHEDULED, dbn.TriState.YES, dbn.TriState.YES,
                dbn.TriState.NO),
        _status(DAY1 + 600, dbn.StatusAction.HALT, dbn.StatusReason.LULD_PAUSE, dbn.TriState.NO),
        _status(DAY1 + 600, dbn.StatusAction.QUOTING, dbn.StatusReason.LULD_PAUSE, dbn.TriState.NO, dbn.TriState.YES),
        _status(DAY1 + 900, dbn.StatusAction.TRADING, dbn.StatusReason.NONE, dbn.TriState.YES, dbn.TriState.YES),
    ]  # fmt: skip
    path = write(tmp_path / "status.dbn.zst", header, records, zstd=True)

    first = _replay(path)
    again = _replay(path)

    changes = StatusChange.objects.filter(symbol__ticker="AAPL").order_by("ts_recv", "ordinal")
    fields = ("ts_recv", "ts_event", "publisher_id", "ordinal", "action", "reason", "trading_event", "is_trading",
              "is_quoting", "is_short_sell_restricted")  # fmt: skip
    stored = [(_s(recv), _s(event), *rest) for recv, event, *rest in changes.values_list(*fields)]
    assert stored == [
        (DAY1, DAY1, 2, 0, 7, 1, 0, True, True, False),
        (DAY1 + 600, DAY1 + 600, 2, 0, 8, 50, 0, False, None, None),  # unknown: NULL
        (DAY1 + 600, DAY1 + 600, 2, 1, 3, 50, 0, False, True, None),  # the same time: the next ordinal
        (DAY1 + 900, DAY1 + 900, 2, 0, 7, 0, 0, True, True, None),
    ]
    assert changes.first().ts_recv.microsecond == 0  # type: ignore[union-attr]  # (700 ns truncated)
    assert [s.written for s in first.values()] == [4]
    assert [(s.written, s.duplicates) for s in again.values()] == [(0, 4)]
