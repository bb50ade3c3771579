"""Databento instrument_id -> Symbol over time, from file metadata, definitions and live mappings.

Instrument ids change from day to day. Each record is stored under the symbol its
instrument_id had at the record's own time; an id with no mapping at that time is an
unknown instrument, counted and never guessed.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from django.db import transaction

from marketdata.models import InstrumentMapping, Symbol

NS_PER_S = 1_000_000_000
OPEN_END_NS = 2**63 - 1
UNDEF_TIMESTAMP = 2**64 - 1
# Record times past this (year 2116) are normalised one by one, where a time past what a
# datetime holds is dealt with as it always was; below it, shifted times stay in int64.
COLUMN_TS_LIMIT = 2**62
DAY_NS = 86400 * NS_PER_S


def date_ns(day: date) -> int:
    """Nanoseconds since the epoch at 00:00 UTC of ``day``."""
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * NS_PER_S


def ns_datetime(ns: int) -> datetime:
    """Exact UTC datetime (to the microsecond) of a nanosecond timestamp."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)


@dataclass(slots=True)
class Interval:
    start_ns: int
    end_ns: int
    symbol_id: int
    ticker: str


@dataclass
class Resolver:
    """In-memory map (instrument_id, ts) -> symbol, backed by InstrumentMapping rows."""

    dataset: str
    allowed: frozenset[str] | None = None
    by_id: dict[int, list[Interval]] = field(default_factory=dict)
    symbols: dict[str, Symbol] = field(default_factory=dict)
    tickers: dict[int, str] = field(default_factory=dict)
    # The interval each id resolved to last: records of an id come in time order, so the
    # next one almost always falls in the same interval (one check instead of a scan).
    # Kept with the start of the next interval, since a later-starting one wins an overlap.
    last_hit: dict[int, tuple[Interval, int]] = field(default_factory=dict)

    def load(self) -> None:
        """Read every stored mapping of this dataset."""
        rows = InstrumentMapping.objects.filter(symbol__dataset=self.dataset).select_related("symbol")
        for row in rows:
            end = date_or_dt_ns(row.valid_until) if row.valid_until else OPEN_END_NS
            self._add(row.instrument_id, date_or_dt_ns(row.valid_from), end, row.symbol)

    def _add(self, instrument_id: int, start_ns: int, end_ns: int, symbol: Symbol) -> None:
        self.symbols[symbol.ticker] = symbol
        self.tickers[symbol.pk] = symbol.ticker
        intervals = self.by_id.setdefault(instrument_id, [])
        self.last_hit.pop(instrument_id, None)
        for existing in intervals:
            if existing.start_ns == start_ns and existing.symbol_id == symbol.pk:
                existing.end_ns = max(existing.end_ns, end_ns)
                return
        bisect.insort(intervals, Interval(start_ns, end_ns, symbol.pk, symbol.ticker), key=lambda i: i.start_ns)

    def wanted(self, ticker: str) -> bool:
        """Tell whether --symbols lets this ticker through."""
        return self.allowed is None or ticker in self.allowed

    def symbol_for(self, ticker: str) -> Symbol:
        """The Symbol row of ``ticker`` in this dataset, created (active) if new."""
        symbol = self.symbols.get(ticker)
        if symbol is None:
            symbol, _ = Symbol.objects.get_or_create(ticker=ticker, defaults={"dataset": self.dataset})
            self.symbols[ticker] = symbol
        return symbol

    def add_mapping(self, *, ticker: str, instrument_id: int, start_ns: int, end_ns: int | None) -> None:
        """Record that ``instrument_id`` meant ``ticker`` over [start_ns, end_ns), in memory and stored."""
        if not self.wanted(ticker):
            return
        symbol = self.symbol_for(ticker)
        known = self.by_id.get(instrument_id, [])
        end = end_ns or OPEN_END_NS
        if any(i.symbol_id == symbol.pk and i.start_ns <= start_ns and end <= i.end_ns for i in known):
            return
        valid_until = ns_datetime(end) if end != OPEN_END_NS else None
        with transaction.atomic():
            row, created = InstrumentMapping.objects.select_for_update().get_or_create(
                symbol=symbol, instrument_id=instrument_id, valid_from=ns_datetime(start_ns),
                defaults={"valid_until": valid_until},
            )  # fmt: skip
            # A range is only ever extended, never cut short by a narrower source.
            if not created and row.valid_until is not None and (valid_until is None or valid_until > row.valid_until):
                row.valid_until = valid_until
                row.save(update_fields=["valid_until"])
        self._add(instrument_id, start_ns, end, symbol)

    def add_metadata_mappings(self, mappings: Mapping[str, Iterable[Mapping[str, object]]]) -> None:
        """Apply a DBN file's symbology (raw symbol -> instrument_id per date range)."""
        for ticker, intervals in mappings.items():
            if not self.wanted(ticker):
                continue
            for interval in _merge_days(intervals):
                self.add_mapping(ticker=ticker, **interval)

    def resolve(self, instrument_id: int, ts_ns: int) -> Interval | None:
        """The interval that maps ``instrument_id`` at ``ts_ns``, or None."""
        hit = self.last_hit.get(instrument_id)
        if hit is not None and hit[0].start_ns <= ts_ns < hit[0].end_ns and ts_ns < hit[1]:
            return hit[0]
        intervals = self.by_id.get(instrument_id)
        if not intervals:
            return None
        next_start = OPEN_END_NS + 1
        for interval in reversed(intervals):
            if interval.start_ns <= ts_ns < interval.end_ns:
                self.last_hit[instrument_id] = (interval, next_start)
                return interval
            next_start = interval.start_ns
        return None

    def resolve_span(self, instrument_id: int, first_ns: int, last_ns: int) -> Interval | Literal[False] | None:
        """What ``resolve`` gives at every time in [first_ns, last_ns], when that is one answer: the
        interval, or None when no interval maps any of them; False when the answer changes within."""
        intervals = self.by_id.get(instrument_id)
        if not intervals:
            return None
        if any(first_ns < interval.start_ns <= last_ns for interval in intervals):
            return False  # one starts within, and a later start wins an overlap
        found = self.resolve(instrument_id, first_ns)
        if found is None:
            return None  # none maps first_ns and none starts later within: none maps any of them
        return found if last_ns < found.end_ns else False


def date_or_dt_ns(value: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime (exact to the microsecond)."""
    return int(value.timestamp()) * NS_PER_S + value.microsecond * 1000


def _merge_days(intervals: Iterable[Mapping[str, object]]) -> list[dict[str, int]]:
    """Join consecutive date ranges that map to the same instrument_id (DBN lists one a day)."""
    merged: list[dict[str, int]] = []
    ordered = sorted(intervals, key=lambda i: i["start_date"])  # type: ignore[arg-type,return-value]
    for interval in ordered:
        raw_id = str(interval["symbol"])
        if not raw_id.isdigit():
            continue  # the mapping service had no id for that day
        instrument_id = int(raw_id)
        start = date_ns(interval["start_date"])  # type: ignore[arg-type]
        end = date_ns(interval["end_date"])  # type: ignore[arg-type]
        if merged and merged[-1]["instrument_id"] == instrument_id and merged[-1]["end_ns"] == start:
            merged[-1]["end_ns"] = end
        else:
            merged.append({"instrument_id": instrument_id, "start_ns": start, "end_ns": end})
    return merged
