"""Bars, trades and quotes as columns: a batch held as numpy arrays and written by one binary COPY.

A replay or a historical download hands the ingester thousands of records at once. As
rows, each trade cost about 5 us of the ingester's Python: two datetimes, a tuple, a COPY
row formatted field by field, a tuple pickled for the publisher; a bar about as much. As
columns the same work is a few array operations per batch, and the COPY payload is built
in one go in PostgreSQL's binary format. Rows (``BarIn``, ``TradeIn``) are still what the
live feed, the services API and the tests hand over; ``columns_of`` turns them into
columns, so every bar and trade reaches its table by the same path.

Times are integer microseconds since the Unix epoch: what PostgreSQL keeps (DBN's
nanoseconds are truncated, as for rows). Timeframes are their two-byte text (every
stored timeframe is two characters). A column that may be NULL (a quote's absent side)
holds NULL_INT there, and the COPY payload says NULL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Self, TypeVar

import numpy as np

from .errors import ERR_OUT_OF_COLUMN, ValidationError
from .timeframes import QUOTE_SCHEMAS

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00Z in Unix microseconds: binary COPY's time zero
UNDEF_PRICE = 2**63 - 1  # Databento's undefined price (as marketdata.services.bars_trades)
SIDES = (b"A", b"B", b"N")
STORED = (b"1s", b"1m", b"1h", b"1d")  # marketdata.timeframes.STORED_TIMEFRAMES
# PostgreSQL's binary COPY: signature, flags, header extension length ... rows ... trailer.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
COPY_TRAILER = b"\xff\xff"

NULL_INT = -(2**63)  # a NULL in a nullable column (Columns.NULLABLE); no value stored there is int64's minimum
C = TypeVar("C", bound="Columns")
Field = tuple[str, str, str]  # name, in-memory dtype, PostgreSQL binary form (big-endian, fixed width)


class Columns:
    """Equal-length arrays, one per field of the row type, in the table's column order."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[Field, ...]]
    TIMES: ClassVar[tuple[str, ...]]  # fields holding Unix microseconds
    TEXTS: ClassVar[tuple[str, ...]]  # fields holding bytes, text to the row type
    NULLABLE: ClassVar[tuple[str, ...]] = ()  # fields holding NULL_INT for NULL, None to the row type

    def __len__(self) -> int:
        return len(getattr(self, self.FIELDS[0][0]))

    def __getitem__(self, index: slice | np.ndarray) -> Self:
        """The rows at ``index`` (a slice, a mask or indices), as columns."""
        return type(self)(*(getattr(self, f.name)[index] for f in fields(self)))  # type: ignore[arg-type]

    def row(self, i: int) -> tuple:
        """Row ``i`` as the row type's values (times as aware datetimes, texts as str)."""
        values = []
        for name, _, _ in self.FIELDS:
            value = getattr(self, name)[i].item()
            if name in self.NULLABLE and value == NULL_INT:
                value = None
            elif name in self.TIMES:
                value = utc(value)
            elif name in self.TEXTS:
                value = value.decode()
            values.append(value)
        return tuple(values)

    @classmethod
    def empty(cls) -> Self:
        return cls(*(np.empty(0, dtype=dtype) for _, dtype, _ in cls.FIELDS))


@dataclass(frozen=True, slots=True, eq=False)
class TradeColumns(Columns):
    """Trades: TradeIn's fields, times in microseconds."""

    FIELDS: ClassVar[tuple[Field, ...]] = (
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
    TIMES: ClassVar[tuple[str, ...]] = ("ts_event", "ts_recv")
    TEXTS: ClassVar[tuple[str, ...]] = ("side",)

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


@dataclass(frozen=True, slots=True, eq=False)
class BarColumns(Columns):
    """Bars: BarIn's fields, the time in microseconds, the timeframe as two bytes."""

    FIELDS: ClassVar[tuple[Field, ...]] = (
        ("symbol_id", "i8", ">i8"),
        ("timeframe", "S2", "S2"),
        ("ts", "i8", ">i8"),
        ("publisher_id", "i8", ">i4"),
        ("open", "i8", ">i8"),
        ("high", "i8", ">i8"),
        ("low", "i8", ">i8"),
        ("close", "i8", ">i8"),
        ("volume", "i8", ">i8"),
        ("anomalies", "i8", ">i2"),
    )
    TIMES: ClassVar[tuple[str, ...]] = ("ts",)
    TEXTS: ClassVar[tuple[str, ...]] = ("timeframe",)

    symbol_id: np.ndarray
    timeframe: np.ndarray
    ts: np.ndarray
    publisher_id: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    anomalies: np.ndarray


@dataclass(frozen=True, slots=True, eq=False)
class QuoteColumns(Columns):
    """Quotes: QuoteIn's fields, times in microseconds, NULL_INT for what is absent."""

    FIELDS: ClassVar[tuple[Field, ...]] = (
        ("symbol_id", "i8", ">i8"),
        ("ts_recv", "i8", ">i8"),
        ("ts_event", "i8", ">i8"),
        ("publisher_id", "i8", ">i4"),
        ("schema", "i8", ">i2"),
        ("sequence", "i8", ">i8"),
        ("ordinal", "i8", ">i2"),
        ("bid_px", "i8", ">i8"),
        ("ask_px", "i8", ">i8"),
        ("bid_sz", "i8", ">i8"),
        ("ask_sz", "i8", ">i8"),
        ("bid_ct", "i8", ">i8"),
        ("ask_ct", "i8", ">i8"),
        ("bid_publisher_id", "i8", ">i4"),
        ("ask_publisher_id", "i8", ">i4"),
    )
    TIMES: ClassVar[tuple[str, ...]] = ("ts_recv", "ts_event")
    TEXTS: ClassVar[tuple[str, ...]] = ()
    NULLABLE: ClassVar[tuple[str, ...]] = (
        "ts_event", "bid_px", "ask_px", "bid_sz", "ask_sz", "bid_ct", "ask_ct", "bid_publisher_id", "ask_publisher_id",
    )  # fmt: skip

    symbol_id: np.ndarray
    ts_recv: np.ndarray
    ts_event: np.ndarray
    publisher_id: np.ndarray
    schema: np.ndarray
    sequence: np.ndarray
    ordinal: np.ndarray
    bid_px: np.ndarray
    ask_px: np.ndarray
    bid_sz: np.ndarray
    ask_sz: np.ndarray
    bid_ct: np.ndarray
    ask_ct: np.ndarray
    bid_publisher_id: np.ndarray
    ask_publisher_id: np.ndarray


def utc(micros: int) -> datetime:
    """The aware UTC datetime of Unix microseconds."""
    return EPOCH + timedelta(0, 0, micros)


def micros(ts: datetime) -> int:
    """Unix microseconds of an aware datetime."""
    return (ts - EPOCH) // ONE_US


def columns_of(kind: type[C], rows: Sequence[Sequence[Any]]) -> C:
    """Rows of ``kind``'s row type as columns. Raises TypeError, ValueError or OverflowError for
    what no column holds (a naive datetime, a number past int64, a text of another width)."""
    if not rows:
        return kind.empty()
    columns: list[list[Any]] = [list(values) for values in zip(*rows, strict=True)]
    for i, (name, dtype, _) in enumerate(kind.FIELDS):
        if name in kind.NULLABLE:
            columns[i] = [NULL_INT if v is None else (micros(v) if name in kind.TIMES else v) for v in columns[i]]
        elif name in kind.TIMES:
            columns[i] = [micros(ts) for ts in columns[i]]
        elif name in kind.TEXTS:
            width = np.dtype(dtype).itemsize
            if any(len(text) != width for text in columns[i]):
                raise ValueError(f"a {name} is {width} characters")
            columns[i] = [text.encode() for text in columns[i]]
    return kind(*(np.array(values, dtype=dtype) for values, (_, dtype, _) in zip(columns, kind.FIELDS, strict=True)))


def concat(parts: Sequence[C]) -> C:
    """One set of columns of ``parts`` in order (at least one part)."""
    if len(parts) == 1:
        return parts[0]
    kind = type(parts[0])
    return kind(*(np.concatenate([getattr(p, name) for p in parts]) for name, _, _ in kind.FIELDS))


def _narrow(kind: type[Columns]) -> dict[str, tuple[int, int, int]]:
    """The range and bits of each column narrower than int8 in PostgreSQL."""
    return {
        name: (int(np.iinfo(wire).min), int(np.iinfo(wire).max), np.iinfo(wire).bits)
        for name, _, wire in kind.FIELDS
        if wire in (">i2", ">i4")
    }


_NARROW: dict[type[Columns], dict[str, tuple[int, int, int]]] = {
    kind: _narrow(kind) for kind in (TradeColumns, BarColumns, QuoteColumns)
}


def first_invalid(cols: Columns) -> int | None:
    """The index of the first row the table must not take, or None: an undefined or out-of-range
    number, a side other than A, B or N, a timeframe not stored, a high below the low, a quote
    schema code unknown."""
    if isinstance(cols, TradeColumns):
        bad = (cols.price == UNDEF_PRICE) | (cols.size == UNDEF_PRICE) | ~np.isin(cols.side, SIDES)
    elif isinstance(cols, QuoteColumns):
        bad = ~np.isin(cols.schema, list(QUOTE_SCHEMAS.values()))
        for values in (cols.bid_px, cols.ask_px):
            bad |= values == UNDEF_PRICE  # an absent side is NULL_INT, never Databento's undefined price
    else:
        assert isinstance(cols, BarColumns)
        bad = ~np.isin(timeframe_codes(cols.timeframe), _STORED_CODES) | (cols.low > cols.high)
        for values in (cols.open, cols.high, cols.close, cols.volume):
            bad |= values == UNDEF_PRICE
    for name, (lo, hi, _) in _NARROW[type(cols)].items():
        values = getattr(cols, name)
        out = (values < lo) | (values > hi)
        if name in cols.NULLABLE:
            out &= values != NULL_INT
        bad |= out
    found = np.flatnonzero(bad)
    return int(found[0]) if len(found) else None


def narrow_check(cols: Columns, i: int) -> None:
    """Raise the ValidationError for a narrow column of row ``i`` past its PostgreSQL type."""
    for name, (lo, hi, bits) in _NARROW[type(cols)].items():
        value = int(getattr(cols, name)[i])
        if not lo <= value <= hi and not (name in cols.NULLABLE and value == NULL_INT):
            raise ValidationError(ERR_OUT_OF_COLUMN.format(field=name, value=value, bits=bits), field=name)


def spans(keys: np.ndarray, times: np.ndarray) -> dict[int, tuple[datetime, datetime]]:
    """Each key's first and last time (integer keys; times in microseconds)."""
    if not len(keys):
        return {}
    order = np.lexsort((times, keys))  # by key, then time: a key's first and last time bound its run
    keys, times = keys[order], times[order]
    firsts = np.concatenate(([0], np.flatnonzero(np.diff(keys)) + 1))
    lasts = np.append(firsts[1:] - 1, len(keys) - 1)
    return {
        key: (utc(lo), utc(hi))
        for key, lo, hi in zip(keys[firsts].tolist(), times[firsts].tolist(), times[lasts].tolist(), strict=True)
    }


def groups(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Each distinct key (integers) with the indices that hold it, in order."""
    if not len(keys):
        return []
    uniques, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return list(zip(uniques.tolist(), np.split(order, bounds), strict=True))


def timeframe_codes(timeframes: np.ndarray) -> np.ndarray:
    """Two-byte timeframes as integers (their bytes, big-endian): cheap to compare and to sort."""
    return np.ascontiguousarray(timeframes, dtype="S2").view(">u2").astype(np.int64)


def timeframe_of(code: int) -> str:
    return code.to_bytes(2, "big").decode()


_STORED_CODES = timeframe_codes(np.array(STORED, dtype="S2"))


def bar_spans(cols: BarColumns) -> dict[tuple[int, str], tuple[datetime, datetime]]:
    """(symbol_id, timeframe) -> the first and last time of its bars in ``cols``."""
    ids, index = np.unique(cols.symbol_id, return_inverse=True)  # dense: any id packs with the timeframe
    keys = (index.astype(np.int64) << 16) | timeframe_codes(cols.timeframe)
    id_list = ids.tolist()
    return {(id_list[key >> 16], timeframe_of(key & 0xFFFF)): span for key, span in spans(keys, cols.ts).items()}


def last_per_key(cols: BarColumns) -> BarColumns:
    """Keep the last of bars sharing a key (symbol, timeframe, ts, publisher): one INSERT ... ON
    CONFLICT may not touch a row twice."""
    keys = list(
        zip(cols.symbol_id.tolist(), cols.timeframe.tolist(), cols.ts.tolist(), cols.publisher_id.tolist(), strict=True)
    )
    last = {key: i for i, key in enumerate(keys)}
    if len(last) == len(keys):
        return cols
    return cols[np.array(sorted(last.values()), dtype=np.int64)]


def copy_payload(cols: Columns) -> bytes:
    """The rows as a whole binary COPY payload (header, rows, trailer), columns in FIELDS order.

    Rows with NULLs (a nullable column holding NULL_INT) have another layout: a NULL is its
    length, -1, and no bytes. Rows are laid out per pattern of NULLs (an array operation
    each) and written pattern after pattern: COPY does not care in which order rows come.
    """
    nullable = [name for name, _, _ in cols.FIELDS if name in cols.NULLABLE]
    if not nullable:
        return COPY_HEADER + _rows(cols, frozenset()) + COPY_TRAILER
    patterns = np.zeros(len(cols), dtype=np.int64)
    for bit, name in enumerate(nullable):
        patterns |= (getattr(cols, name) == NULL_INT).astype(np.int64) << bit
    parts = []
    for pattern, where in groups(patterns):
        nulls = frozenset(name for bit, name in enumerate(nullable) if pattern >> bit & 1)
        parts.append(_rows(cols[where], nulls))
    return COPY_HEADER + b"".join(parts) + COPY_TRAILER


def _rows(cols: Columns, nulls: frozenset[str]) -> bytes:
    """The rows of ``cols`` in binary COPY's wire format, the fields in ``nulls`` as NULL."""
    layout = [("count", ">i2")]
    for name, _, wire in cols.FIELDS:
        layout += [(f"{name}_len", ">i4")] if name in nulls else [(f"{name}_len", ">i4"), (name, wire)]
    rows = np.empty(len(cols), dtype=layout)
    rows["count"] = len(cols.FIELDS)
    for name, _, wire in cols.FIELDS:
        if name in nulls:
            rows[f"{name}_len"] = -1
            continue
        rows[f"{name}_len"] = np.dtype(wire).itemsize
        values = getattr(cols, name)
        rows[name] = values - PG_EPOCH_US if name in cols.TIMES else values
    return rows.tobytes()
