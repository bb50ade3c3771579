"""Reads of symbols: one by ticker, many at once, the active ones, the /v1/symbols list."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from django.db import connection
from django.db.models import Q

from ..errors import ERR_UNKNOWN_SYMBOL, UnknownSymbolError
from ..models import Symbol


def symbol_get(*, ticker: str) -> Symbol:
    """Return the symbol with this ticker or raise UnknownSymbolError."""
    try:
        return Symbol.objects.get(ticker=ticker)
    except Symbol.DoesNotExist:
        raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=ticker), field="symbol") from None


class SymbolRef(NamedTuple):
    """What serving a symbol's data needs to know of it: its id, ticker and dataset."""

    id: int
    ticker: str
    dataset: str


def symbol_ref(*, ticker: str) -> SymbolRef:
    """Like symbol_get, in one plain query (the hot path of every history request)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, ticker, dataset FROM marketdata_symbol WHERE ticker = %s", [ticker])
        row = cursor.fetchone()
    if row is None:
        raise UnknownSymbolError(ERR_UNKNOWN_SYMBOL.format(value=ticker), field="symbol")
    return SymbolRef(*row)


def symbol_refs(*, tickers: Collection[str]) -> dict[str, SymbolRef]:
    """The symbols of these tickers that exist, in one query (the others are absent)."""
    if not tickers:
        return {}
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, ticker, dataset FROM marketdata_symbol WHERE ticker = ANY(%s)", [list(tickers)])
        return {row[1]: SymbolRef(*row) for row in cursor.fetchall()}


def active_symbols(*, datasets: Collection[str] | None) -> list[SymbolRef]:
    """The active symbols of these datasets (None: all), by ticker in the database's collation."""
    rows = Symbol.objects.filter(active=True).order_by("ticker")
    if datasets is not None:
        rows = rows.filter(dataset__in=sorted(datasets))
    return [SymbolRef(*row) for row in rows.values_list("id", "ticker", "dataset")]


def symbol_list(
    *,
    datasets: Collection[str] | None,
    dataset: str | None = None,
    active: bool | None = None,
    search: str | None = None,
    after: str | None = None,
    limit: int,
) -> list[tuple[str, str, bool, str]]:
    """(ticker, dataset, active, description) of the symbols /v1/symbols lists, by ticker, after ``after``.

    ``datasets`` are those the caller may read (None: all); ``search`` matches the ticker or
    the description, ignoring case.
    """
    rows = Symbol.objects.order_by("ticker")
    if datasets is not None:
        rows = rows.filter(dataset__in=sorted(datasets))
    if dataset is not None:
        rows = rows.filter(dataset=dataset)
    if active is not None:
        rows = rows.filter(active=active)
    if search is not None:
        rows = rows.filter(Q(ticker__icontains=search) | Q(description__icontains=search))
    if after is not None:
        rows = rows.filter(ticker__gt=after)
    return list(rows.values_list("ticker", "dataset", "active", "description")[:limit])
