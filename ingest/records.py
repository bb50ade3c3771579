"""Normalisation: a DBN record becomes a BarIn or TradeIn under its symbol, or a counted skip."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import databento_dbn as dbn
import structlog

from marketdata.services import UNDEF_PRICE, BarIn, TradeIn

from .anomalies import AnomalyDetector
from .symbology import DAY_NS, UNDEF_TIMESTAMP, Resolver

log = structlog.get_logger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Looked up by the enums' values: an RType or Side itself hashes and compares through
# Python-level calls into the decoder (428 against 165 ns for an RType, with .value).
BAR_RTYPES: dict[int, str] = {
    dbn.RType.OHLCV_1S.value: "1s",
    dbn.RType.OHLCV_1M.value: "1m",
    dbn.RType.OHLCV_1H.value: "1h",
    dbn.RType.OHLCV_1D.value: "1d",
}
SIDES: dict[str, str] = {dbn.Side.ASK.value: "A", dbn.Side.BID.value: "B", dbn.Side.NONE.value: "N"}
# A row without NamedTuple's Python-level __new__ (a fifth of normalising a record).
_new_row = tuple.__new__
TIMES_KEPT = 4096  # datetimes remembered by Normaliser._utc (bars of one minute share one)


@dataclass
class Stats:
    """What an ingest run did, by cause."""

    records: int = 0
    written: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    last_ts: datetime | None = None
    last_error: str = ""

    def skip(self, cause: str) -> None:
        self.skipped[cause] += 1

    def error(self, cause: str, message: str) -> None:
        self.errors[cause] += 1
        self.last_error = message
        log.warning("ingest error", cause=cause, detail=message)

    def summary(self) -> str:
        """One line for the end of a run."""
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        warnings = ", ".join(f"{k}={v}" for k, v in sorted(self.warnings.items())) or "none"
        return (
            f"records={self.records} written={self.written} duplicates={self.duplicates} "
            f"skipped: {skipped}; errors: {errors}; warnings: {warnings}"
        )


class Normaliser:
    """Turns decoded DBN records into store rows; keeps symbology and per-stream order state."""

    def __init__(self, resolver: Resolver, stats: Stats) -> None:
        self.resolver = resolver
        self.stats = stats
        # Added to record times when a replay acts as a live feed (symbology still uses the originals).
        self.shift_ns = 0
        self.anomalies = AnomalyDetector()
        self.last_bar_ts: dict[tuple[int, str, int], int] = {}
        self.last_trade: dict[tuple[int, int], tuple[int, int, int]] = {}
        self._times: dict[int, datetime] = {}

    def __call__(self, record: object) -> BarIn | TradeIn | None:
        """Normalise one record; None means it was consumed (symbology) or skipped with a count."""
        self.stats.records += 1
        kind = type(record)
        if kind is dbn.OHLCVMsg:
            return self._bar(record)  # type: ignore[arg-type]
        if kind is dbn.TradeMsg:
            return self._trade(record)  # type: ignore[arg-type]
        if isinstance(record, dbn.OHLCVMsg):
            return self._bar(record)
        if isinstance(record, dbn.TradeMsg):
            return self._trade(record)
        if isinstance(record, dbn.SymbolMappingMsg):
            # Live sessions send undefined bounds: the mapping holds for the session,
            # whose intraday replay reaches back up to a day before the message.
            start = record.start_ts
            if start == UNDEF_TIMESTAMP:
                start = record.ts_event - record.ts_event % DAY_NS - DAY_NS
            end = None if record.end_ts == UNDEF_TIMESTAMP else record.end_ts
            self.resolver.add_mapping(
                ticker=record.stype_in_symbol, instrument_id=record.instrument_id, start_ns=start, end_ns=end
            )
            return None
        if isinstance(record, dbn.InstrumentDefMsg):
            # A definition names the instrument for its day; Databento sends them again each day.
            day = record.ts_recv - record.ts_recv % DAY_NS
            self.resolver.add_mapping(
                ticker=record.raw_symbol, instrument_id=record.instrument_id, start_ns=day, end_ns=day + DAY_NS
            )
            return None
        if isinstance(record, dbn.ErrorMsg):
            self.stats.error("gateway_error", str(record.err))
            return None
        if isinstance(record, dbn.SystemMsg):
            return None
        self.stats.skip(f"schema:{type(record).__name__}")
        return None

    def _resolve(self, instrument_id: int, ts_event: int) -> int | None:
        interval = self.resolver.resolve(instrument_id, ts_event)
        if interval is None:
            self.stats.skip("unknown_instrument")
            return None
        allowed = self.resolver.allowed
        if allowed is not None and interval.ticker not in allowed:
            self.stats.skip("symbol_filtered")
            return None
        return interval.symbol_id

    def _bar(self, record: dbn.OHLCVMsg) -> BarIn | None:
        # Each attribute of a decoded record is a call into the decoder: read each once.
        rtype = record.rtype.value
        tf = BAR_RTYPES.get(rtype)
        if tf is None:
            self.stats.skip(f"rtype:{rtype}")
            return None
        ts_event = record.ts_event
        symbol_id = self._resolve(record.instrument_id, ts_event)
        if symbol_id is None:
            return None
        o, h, low, c = record.open, record.high, record.low, record.close
        if o == UNDEF_PRICE or h == UNDEF_PRICE or low == UNDEF_PRICE or c == UNDEF_PRICE:
            self.stats.skip("undefined_price")
            return None
        if h < low:
            self.stats.skip("high_below_low")
            return None
        ts_ns = ts_event + self.shift_ns
        publisher_id = record.publisher_id
        key = (symbol_id, tf, publisher_id)
        if ts_ns < self.last_bar_ts.get(key, 0):
            self.stats.warnings["out_of_order"] += 1
        else:
            self.last_bar_ts[key] = ts_ns
        volume = record.volume
        flags = self.anomalies.flags(symbol_id, tf, volume)
        return _new_row(BarIn, (symbol_id, tf, self._utc(ts_ns), publisher_id, o, h, low, c, volume, flags))

    def _utc(self, ts_ns: int) -> datetime:
        """The UTC datetime of a DBN time (truncated to microseconds), shared by records of one time."""
        us = ts_ns // 1000
        ts = self._times.get(us)
        if ts is None:
            if len(self._times) >= TIMES_KEPT:
                self._times.clear()
            ts = self._times[us] = EPOCH + timedelta(0, 0, us)
        return ts

    def _trade(self, record: dbn.TradeMsg) -> TradeIn | None:
        ts_event = record.ts_event
        symbol_id = self._resolve(record.instrument_id, ts_event)
        if symbol_id is None:
            return None
        price = record.price
        if price == UNDEF_PRICE:
            self.stats.skip("undefined_price")
            return None
        shift = self.shift_ns
        ts_ns, seq, publisher_id = ts_event + shift, record.sequence, record.publisher_id
        key = (symbol_id, publisher_id)
        last = self.last_trade.get(key)
        ordinal = 0
        if last is not None:
            if last[0] == ts_ns and last[1] == seq:
                ordinal = last[2] + 1
            elif ts_ns < last[0]:
                self.stats.warnings["out_of_order"] += 1
        self.last_trade[key] = (ts_ns, seq, ordinal)
        raw_side = record.side  # a Side, or its character when the decoder knows no Side for it
        side = SIDES.get(raw_side if isinstance(raw_side, str) else raw_side.value, "N")
        # Trade times rarely repeat: converted directly (timedelta's positional form is the fastest).
        ts_event_dt = EPOCH + timedelta(0, 0, ts_ns // 1000)
        ts_recv_dt = EPOCH + timedelta(0, 0, (record.ts_recv + shift) // 1000)
        row = (
            symbol_id,
            ts_event_dt,
            ts_recv_dt,
            publisher_id,
            seq,
            ordinal,
            price,
            record.size,
            side,
            int(record.flags),
        )
        return _new_row(TradeIn, row)
