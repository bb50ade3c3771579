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
BAR_RTYPES = {
    int(dbn.RType.OHLCV_1S): "1s",
    int(dbn.RType.OHLCV_1M): "1m",
    int(dbn.RType.OHLCV_1H): "1h",
    int(dbn.RType.OHLCV_1D): "1d",
}
SIDES = {"A": "A", "B": "B", "N": "N"}


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

    def __call__(self, record: object) -> BarIn | TradeIn | None:
        """Normalise one record; None means it was consumed (symbology) or skipped with a count."""
        self.stats.records += 1
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

    def _resolve(self, record: dbn.OHLCVMsg | dbn.TradeMsg) -> int | None:
        interval = self.resolver.resolve(record.instrument_id, record.ts_event)
        if interval is None:
            self.stats.skip("unknown_instrument")
            return None
        if not self.resolver.wanted(interval.ticker):
            self.stats.skip("symbol_filtered")
            return None
        return interval.symbol_id

    def _bar(self, record: dbn.OHLCVMsg) -> BarIn | None:
        tf = BAR_RTYPES.get(int(record.rtype))
        if tf is None:
            self.stats.skip(f"rtype:{int(record.rtype)}")
            return None
        symbol_id = self._resolve(record)
        if symbol_id is None:
            return None
        o, h, low, c = record.open, record.high, record.low, record.close
        if UNDEF_PRICE in (o, h, low, c):
            self.stats.skip("undefined_price")
            return None
        if h < low:
            self.stats.skip("high_below_low")
            return None
        ts_ns = record.ts_event + self.shift_ns
        key = (symbol_id, tf, record.publisher_id)
        if ts_ns < self.last_bar_ts.get(key, 0):
            self.stats.warnings["out_of_order"] += 1
        else:
            self.last_bar_ts[key] = ts_ns
        volume = record.volume
        flags = self.anomalies.flags(symbol_id, tf, volume)
        ts = EPOCH + timedelta(microseconds=ts_ns // 1000)
        return BarIn(symbol_id, tf, ts, record.publisher_id, o, h, low, c, volume, flags)

    def _trade(self, record: dbn.TradeMsg) -> TradeIn | None:
        symbol_id = self._resolve(record)
        if symbol_id is None:
            return None
        if record.price == UNDEF_PRICE:
            self.stats.skip("undefined_price")
            return None
        ts_ns, seq = record.ts_event + self.shift_ns, record.sequence
        key = (symbol_id, record.publisher_id)
        last = self.last_trade.get(key)
        ordinal = 0
        if last is not None:
            if last[0] == ts_ns and last[1] == seq:
                ordinal = last[2] + 1
            elif ts_ns < last[0]:
                self.stats.warnings["out_of_order"] += 1
        self.last_trade[key] = (ts_ns, seq, ordinal)
        side = SIDES.get(str(record.side), "N")
        return TradeIn(
            symbol_id, EPOCH + timedelta(microseconds=ts_ns // 1000),
            EPOCH + timedelta(microseconds=(record.ts_recv + self.shift_ns) // 1000), record.publisher_id, seq, ordinal,
            record.price, record.size, side, int(record.flags),
        )  # fmt: skip
