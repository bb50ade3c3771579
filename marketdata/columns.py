"""Trades as columns: a batch held as numpy arrays and written by one binary COPY.

A replay or a historical download hands the ingester thousands of trades at once. As
rows, each cost about 5 us of the ingester's Python: two datetimes, a tuple, a COPY row
formatted field by field, a tuple pickled for the publisher. As columns the same work is
a few array operations per batch, and the COPY payload is built in one go in PostgreSQL's
binary format. Rows (``TradeIn``) are still what the live feed, the services API and the
tests hand over; ``trade_columns`` turns them into columns, so every trade reaches the
table by the same path.

Times are integer microseconds since the Unix epoch: what PostgreSQL keeps (DBN's
nanoseconds are truncated, as for rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from .errors import ERR_OUT_OF_COLUMN, ValidationError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00Z in Unix microseconds: binary COPY's time zero
UNDEF_PRICE = 2**63 - 1  # Databento's undefined price (as marketdata.services)
SIDES = (b"A", b"B", b"N")
# PostgreSQL's binary COPY: signature, flags, header extension length ... rows ... trailer.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
COPY_TRAILER = b"\xff\xff"

# Each column's in-memory dtype and its PostgreSQL binary form (big-endian, fixed width);
# the order is the table's, TradeIn's and TRADE_COLUMNS'.
TRADE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("symbol_id", "i8", ">i8"),
    ("ts_event", "i8", ">i8"),
    ("ts_recv", "i8", ">i8"),
    ("publisher_id", "i8", ">i4"),
    ("sequence", "i8", ">i8"),
    ("ordinal", "i8", ">i2"),
    ("price", "i8", ">i8"),
    ("size", "i8", ">i8"),
    ("side", "S1", "S1"),
    ("flags", "i8", ">i2"),
)
_TIMES = ("ts_event", "ts_recv")
_COPY_ROW = np.dtype(
    [("count", ">i2")] + [item for name, _, wire in TRADE_FIELDS for item in ((f"{name}_len", ">i4"), (name, wire))]
)
# The range each column's PostgreSQL type holds, and its bits, for the columns narrower than int8.
_NARROW = {
    name: (int(np.iinfo(wire).min), int(np.iinfo(wire).max), np.iinfo(wire).bits)
    for name, _, wire in TRADE_FIELDS
    if wire in (">i2", ">i4")
}


@dataclass(frozen=True, slots=True, eq=False)
class TradeColumns:
    """Trades as equal-length arrays, one per TradeIn field (times in microseconds)."""

    symbol_id: np.ndarray
    ts_event: np.ndarray
    ts_recv: np.ndarray
    publisher_id: np.ndarray
    sequence: np.ndarray
    ordinal: np.ndarray
    price: np.ndarray
    size: np.ndarray
    side: np.ndarray
    flags: np.ndarray

    def __len__(self) -> int:
        return len(self.symbol_id)

    def __getitem__(self, index: slice | np.ndarray) -> TradeColumns:
        """The trades at ``index`` (a slice or a mask), as columns."""
        return TradeColumns(*(getattr(self, f.name)[index] for f in fields(self)))

    def row(self, i: int) -> tuple:
        """Trade ``i`` as a TradeIn's values (times as aware datetimes)."""
        values = [getattr(self, f.name)[i].item() for f in fields(self)]
        values[1], values[2] = utc(values[1]), utc(values[2])
        values[8] = values[8].decode()
        return tuple(values)


def utc(micros: int) -> datetime:
    """The aware UTC datetime of Unix microseconds."""
    return EPOCH + timedelta(0, 0, micros)


def micros(ts: datetime) -> int:
    """Unix microseconds of an aware datetime."""
    return (ts - EPOCH) // ONE_US


def trade_columns(rows: Sequence[Sequence[object]]) -> TradeColumns:
    """TradeIn rows as columns. Raises TypeError or OverflowError for what no column can hold
    (a naive datetime, a number past int64, a side longer than one character)."""
    if not rows:
        return empty_trades()
    columns: list[list[Any]] = [list(values) for values in zip(*rows, strict=True)]
    for i in (1, 2):
        columns[i] = [micros(ts) for ts in columns[i]]
    if any(len(side) != 1 for side in columns[8]):
        raise TypeError("a side is one character")
    columns[8] = [side.encode() for side in columns[8]]
    return TradeColumns(
        *(np.array(values, dtype=dtype) for values, (_, dtype, _) in zip(columns, TRADE_FIELDS, strict=True))
    )


def empty_trades() -> TradeColumns:
    return TradeColumns(*(np.empty(0, dtype=dtype) for _, dtype, _ in TRADE_FIELDS))


def trades_concat(parts: Sequence[TradeColumns]) -> TradeColumns:
    """One TradeColumns of ``parts`` in order."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return empty_trades()
    return TradeColumns(*(np.concatenate([getattr(p, name) for p in parts]) for name, _, _ in TRADE_FIELDS))


def trades_invalid(cols: TradeColumns) -> int | None:
    """The index of the first trade the table must not take (an undefined or out-of-range
    number, a side other than A, B or N), or None."""
    bad = (cols.price == UNDEF_PRICE) | (cols.size == UNDEF_PRICE)
    bad |= (cols.side != SIDES[0]) & (cols.side != SIDES[1]) & (cols.side != SIDES[2])
    for name, (lo, hi, _) in _NARROW.items():
        values = getattr(cols, name)
        bad |= (values < lo) | (values > hi)
    found = np.flatnonzero(bad)
    return int(found[0]) if len(found) else None


def narrow_check(cols: TradeColumns, i: int) -> None:
    """Raise the ValidationError for a narrow column of trade ``i`` past its PostgreSQL type."""
    for name, (lo, hi, bits) in _NARROW.items():
        value = int(getattr(cols, name)[i])
        if not lo <= value <= hi:
            raise ValidationError(ERR_OUT_OF_COLUMN.format(field=name, value=value, bits=bits), field=name)


def trade_spans(cols: TradeColumns) -> dict[int, tuple[datetime, datetime]]:
    """symbol_id -> the first and last ts_event of its trades in ``cols``."""
    ids, inverse = np.unique(cols.symbol_id, return_inverse=True)
    first = np.full(len(ids), np.iinfo(np.int64).max)
    last = np.full(len(ids), np.iinfo(np.int64).min)
    np.minimum.at(first, inverse, cols.ts_event)
    np.maximum.at(last, inverse, cols.ts_event)
    return {
        symbol_id: (utc(lo), utc(hi))
        for symbol_id, lo, hi in zip(ids.tolist(), first.tolist(), last.tolist(), strict=True)
    }


def trades_copy(cols: TradeColumns) -> bytes:
    """The trades as a whole binary COPY payload (header, rows, trailer), columns as TRADE_FIELDS."""
    rows = np.empty(len(cols), dtype=_COPY_ROW)
    rows["count"] = len(TRADE_FIELDS)
    for name, _, wire in TRADE_FIELDS:
        rows[f"{name}_len"] = np.dtype(wire).itemsize
        values = getattr(cols, name)
        rows[name] = values - PG_EPOCH_US if name in _TIMES else values
    return COPY_HEADER + rows.tobytes() + COPY_TRAILER
