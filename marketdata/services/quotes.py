"""Writes of quotes (top of book, rows or columns): checked, then an appending COPY or a staged insert."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import NamedTuple

from ..columns import QuoteColumns, spans
from ..errors import ERR_UNDEFINED_PRICE, ValidationError
from ..storage import QUOTE_TABLE
from ..timeframes import QUOTE_SCHEMAS
from .bars_trades import (
    QUOTE_SERIES,
    UNDEF_PRICE,
    WriteResult,
    _checked,
    check_aware,
    insert_once,
)

ERR_BAD_QUOTE_SCHEMA = "schema code {value!r} is not a quote schema: expected one of {codes}"


class QuoteIn(NamedTuple):
    """A quote to write: prices in Databento fixed-point (1e-9); None where a side (or ts_event) is absent."""

    symbol_id: int
    ts_recv: datetime
    ts_event: datetime | None
    publisher_id: int
    schema: int  # timeframes.QUOTE_SCHEMAS code
    sequence: int
    ordinal: int
    bid_px: int | None
    ask_px: int | None
    bid_sz: int | None
    ask_sz: int | None
    bid_ct: int | None
    ask_ct: int | None
    bid_publisher_id: int | None = None
    ask_publisher_id: int | None = None


QUOTE_COLUMNS = QuoteIn._fields
QUOTE_KEY = ("symbol_id", "ts_recv", "publisher_id", "schema", "sequence", "ordinal")
QUOTE_INSERT_SQL = f"""
INSERT INTO {QUOTE_TABLE} ({", ".join(QUOTE_COLUMNS)})
SELECT {", ".join(QUOTE_COLUMNS)} FROM quote_stage
ON CONFLICT ({", ".join(QUOTE_KEY)}) DO NOTHING
"""
_CODES = frozenset(QUOTE_SCHEMAS.values())


def _check_quote(row: QuoteIn) -> None:
    """Raise the ValidationError for the first thing wrong with ``row``, in a fixed order of checks."""
    check_aware("ts_recv", row.ts_recv)
    if row.ts_event is not None:
        check_aware("ts_event", row.ts_event)
    if row.schema not in _CODES:
        codes = ", ".join(f"{code} ({name})" for name, code in QUOTE_SCHEMAS.items())
        raise ValidationError(ERR_BAD_QUOTE_SCHEMA.format(value=row.schema, codes=codes), field="schema")
    for field in ("bid_px", "ask_px"):
        if getattr(row, field) == UNDEF_PRICE:  # an absent side is None, never Databento's undefined price
            raise ValidationError(ERR_UNDEFINED_PRICE.format(field=field, value=row), field=field)


def quotes_checked(quotes: Sequence[QuoteIn] | QuoteColumns) -> QuoteColumns:
    """Quotes checked (as bars_trades._checked), as columns."""
    return _checked(QuoteColumns, quotes, _check_quote, QuoteIn)


def quotes_insert(
    *, quotes: Sequence[QuoteIn] | QuoteColumns, before_commit: Callable[[], None] | None = None
) -> WriteResult:
    """Insert quotes (rows or columns) in one transaction; a quote already stored is kept once.

    As trades: a batch whose every quote is newer (``ts_recv``) than the newest stored for
    its symbol is copied straight into the table (the live and replay case); otherwise, or
    when the unique key refuses the copy, COPY to a staging table and INSERT ... ON
    CONFLICT DO NOTHING. One binary COPY payload, NULLs and all (columns.copy_payload).
    ``before_commit``: as for bars_upsert.
    """
    if not len(quotes):
        return WriteResult(0, 0, 0)
    started = time.perf_counter()
    cols = quotes_checked(quotes)
    series = {(symbol_id, QUOTE_SERIES): span for symbol_id, span in spans(cols.symbol_id, cols.ts_recv).items()}
    return insert_once(
        cols, series, QUOTE_TABLE, QUOTE_COLUMNS, "quote_stage", QUOTE_INSERT_SQL, before_commit, started
    )
