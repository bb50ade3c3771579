"""Symbols take any Databento raw symbol; mappings are time-ranged."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.core.exceptions import ValidationError

from ingest.sources.replay import run_replay
from ingest.symbology import Resolver
from marketdata.models import InstrumentMapping, Symbol
from tests.conftest import SAMPLES

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("ticker", "dataset"),
    [("BRK.B", "XNAS.ITCH"), ("ESH4", "GLBX.MDP3"), ("BRN FMJ0024!", "IFEU.IMPACT"),
     ("AAPL  240119C00150000", "OPRA.PILLAR"), ("BRK/B", "XNYS.PILLAR")],
)  # fmt: skip
def test_any_databento_raw_symbol_is_a_valid_ticker(ticker, dataset):
    symbol = Symbol(ticker=ticker, dataset=dataset)
    symbol.full_clean()
    symbol.save()
    assert Symbol.objects.get(ticker=ticker).dataset == dataset


@pytest.mark.parametrize("ticker", [" AAPL", "AAPL ", "", "AA\tPL", "ÄPPL"])
def test_malformed_tickers_are_rejected(ticker):
    with pytest.raises(ValidationError):
        Symbol(ticker=ticker, dataset="XNAS.ITCH").full_clean()


@pytest.mark.django_db(transaction=True)
def test_msft_maps_to_a_new_instrument_id_as_the_days_go_by():
    run_replay(paths=[SAMPLES / "dbn-repo" / "test_data.definition.dbn"], speed=None, loop=False, symbols=None,
               publish=False, install_signals=False)  # fmt: skip
    rows = list(InstrumentMapping.objects.filter(symbol__ticker="MSFT").order_by("valid_from"))
    # 62 daily ranges over 60 distinct ids: an id can come back for MSFT days later.
    assert len(rows) == 62
    assert len({r.instrument_id for r in rows}) == 60

    resolver = Resolver(dataset="XNAS.ITCH")
    resolver.load()
    oct4 = int(datetime(2021, 10, 4, 15, tzinfo=UTC).timestamp()) * 10**9
    oct5 = int(datetime(2021, 10, 5, 15, tzinfo=UTC).timestamp()) * 10**9
    assert resolver.resolve(6819, oct4).ticker == "MSFT"  # type: ignore[union-attr]
    assert resolver.resolve(6819, oct5) is None  # that id meant MSFT on the 4th only
    assert resolver.resolve(6830, oct5).ticker == "MSFT"  # type: ignore[union-attr]
