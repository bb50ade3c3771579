"""Normalisation: a DBN record becomes a BarIn, TradeIn, quotes (QuoteColumns) or a StatusIn under its
symbol, or a counted skip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import databento_dbn as dbn
import numpy as np
import structlog

from marketdata.columns import BarColumns, QuoteColumns, TradeColumns, groups
from marketdata.services.bars_trades import UNDEF_PRICE, BarIn, TradeIn
from marketdata.services.status import StatusIn

from .anomalies import AnomalyDetector
from .book_records import QUOTE_RECORDS, BookNormalising
from .stats import Stats
from .symbology import COLUMN_TS_LIMIT, DAY_NS, UNDEF_TIMESTAMP, Resolver

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
# A trade's and a bar's record bytes, as databento_dbn lays them out (the same in DBN v1, v2 and v3).
TRADE_RECORD = np.dtype(dbn.TradeMsg._dtypes)
BAR_RECORD = np.dtype(dbn.OHLCVMsg._dtypes)
_TF_BYTES = {rtype: tf.encode() for rtype, tf in BAR_RTYPES.items()}
UPGRADE = dbn.VersionUpgradePolicy.UPGRADE_TO_V3  # every decoder here reads DBN v1/v2 as v3


@dataclass(frozen=True, slots=True)
class RawRecords:
    """Whole records of one fixed-size layout (``kind``) as a file holds them, read without
    an object per record (ingest/sources/replay.py); ``header`` is the file's DBN metadata,
    to decode them one by one where the normaliser cannot take them as columns."""

    kind: type
    data: bytes
    header: bytes

    def __len__(self) -> int:
        return len(self.data) // RAW_SIZES[self.kind]

    def first_ts(self) -> int | None:
        """The first record's ts_event (None for no record)."""
        return int.from_bytes(self.data[8:16], "little") if self.data else None

    def records(self) -> list[object]:
        """The records as databento_dbn decodes them."""
        decoder = dbn.DBNDecoder(upgrade_policy=UPGRADE)
        return list(decoder.write_and_decode(self.header + self.data)[1:])


RAW_SIZES: dict[type, int] = {dbn.OHLCVMsg: BAR_RECORD.itemsize, dbn.TradeMsg: TRADE_RECORD.itemsize}


class Normaliser(BookNormalising):
    """Turns decoded DBN records into store rows; keeps symbology and per-stream order state.

    It is longer than a class should be because it normalises two ways, a record at a time
    (``__call__``) and a run of records as columns (``bar_columns``, ``trade_columns``),
    which must follow the same rules over the same state (each stream's last time, trade
    ordinals, the anomaly norms, symbology): held by one object, a run may follow single
    records and be followed by them with nothing handed between two.
    """

    def __init__(self, resolver: Resolver, stats: Stats) -> None:
        self.resolver = resolver
        self.stats = stats
        # Added to record times when a replay acts as a live feed (symbology still uses the originals).
        self.shift_ns = 0
        self.anomalies = AnomalyDetector()
        self.last_bar_ts: dict[tuple[int, str, int], int] = {}
        self.last_trade: dict[tuple[int, int], tuple[int, int, int]] = {}
        # Quotes' ordinals per (symbol, schema and publisher), as trades' (see quote_columns).
        self.last_quote: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.last_status: dict[tuple[int, int], tuple[int, int]] = {}  # (symbol, publisher) -> (ts_recv, ordinal)
        # The schema of the feed whose records come now (FeedStart): tells tbbo's MBP-1 records from mbp-1's.
        self.feed_schema = ""
        self._times: dict[int, datetime] = {}

    def __call__(self, record: object) -> BarIn | TradeIn | StatusIn | QuoteColumns | None:
        """Normalise one record; None means it was consumed (symbology) or skipped with a count.

        A quote comes as QuoteColumns of one row: quotes are normalised as columns only.
        """
        kind = type(record)
        if kind in QUOTE_RECORDS:
            return self.quote_columns([record])  # type: ignore[list-item]
        self.stats.records += 1
        if kind is dbn.OHLCVMsg:
            return self._bar(record)  # type: ignore[arg-type]
        if kind is dbn.TradeMsg:
            return self._trade(record)  # type: ignore[arg-type]
        if isinstance(record, dbn.OHLCVMsg):
            return self._bar(record)
        if isinstance(record, dbn.TradeMsg):
            return self._trade(record)
        if isinstance(record, dbn.StatusMsg):
            return self._status(record)
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

    def trade_columns(self, records: list[dbn.TradeMsg] | bytes) -> TradeColumns | None:
        """Normalise a run of trade records at once: the trades, counts and state ``_trade`` gives
        one by one (same skips by cause, ordinals, out-of-order warnings, symbology).

        ``records`` may be their bytes, as the file holds them (RawRecords). None when the
        records' bytes are not trade records of the expected layout or hold times past
        COLUMN_TS_LIMIT; the caller then normalises them one by one.
        """
        raw = _record_bytes(records, TRADE_RECORD.itemsize)
        if raw is None:
            return None
        rec = np.frombuffer(raw, dtype=TRADE_RECORD)
        ts_event, ts_recv = rec["ts_event"], rec["ts_recv"]
        if len(rec) and max(int(ts_event.max()), int(ts_recv.max())) >= COLUMN_TS_LIMIT:
            return None
        stats = self.stats
        stats.records += len(rec)
        symbol_ids, keep = self._resolve_many(rec["instrument_id"], ts_event)
        price = rec["price"]
        undefined = keep & (price == UNDEF_PRICE)
        if undefined.any():
            stats.skipped["undefined_price"] += int(np.count_nonzero(undefined))
            keep &= ~undefined
        kept = np.flatnonzero(keep)
        shift = self.shift_ns
        ts_ns = ts_event[kept].astype(np.int64) + shift
        symbol_ids, publishers = symbol_ids[kept], rec["publisher_id"][kept].astype(np.int64)
        sequences = rec["sequence"][kept].astype(np.int64)
        side = rec["side"][kept]
        return TradeColumns(
            symbol_id=symbol_ids,
            ts_event=ts_ns // 1000,
            ts_recv=(ts_recv[kept].astype(np.int64) + shift) // 1000,
            publisher_id=publishers,
            sequence=sequences,
            ordinal=self._ordinals(symbol_ids, publishers, ts_ns, sequences),
            price=price[kept],
            size=rec["size"][kept].astype(np.int64),
            side=np.where((side == b"A") | (side == b"B"), side, b"N"),  # anything else is N, as SIDES.get
            flags=rec["flags"][kept].astype(np.int64),
        )

    def bar_columns(self, records: list[dbn.OHLCVMsg] | bytes) -> BarColumns | None:
        """Normalise a run of bar records at once: the bars, counts and state ``_bar`` gives one
        by one (same skips by cause, out-of-order warnings, anomaly flags, symbology).

        ``records`` may be their bytes, as the file holds them (RawRecords). None when the
        records' bytes are not bar records of the expected layout, hold times past
        COLUMN_TS_LIMIT or a volume past int64; the caller then normalises them one by one.
        """
        raw = _record_bytes(records, BAR_RECORD.itemsize)
        if raw is None:
            return None
        rec = np.frombuffer(raw, dtype=BAR_RECORD)
        ts_event, volume = rec["ts_event"], rec["volume"]
        if len(rec) and (int(ts_event.max()) >= COLUMN_TS_LIMIT or int(volume.max()) >= UNDEF_PRICE):
            return None
        stats = self.stats
        stats.records += len(rec)
        rtypes = rec["rtype"]
        timeframe = np.zeros(len(rec), dtype="S2")
        for rtype in np.unique(rtypes).tolist():
            tf = _TF_BYTES.get(rtype)
            if tf is None:
                stats.skipped[f"rtype:{rtype}"] += int(np.count_nonzero(rtypes == rtype))
            else:
                timeframe[rtypes == rtype] = tf
        known = np.flatnonzero(timeframe != b"")
        symbol_ids, keep = self._resolve_many(rec["instrument_id"][known], ts_event[known])
        o, h, low, c = (rec[name][known] for name in ("open", "high", "low", "close"))
        undefined = keep & ((o == UNDEF_PRICE) | (h == UNDEF_PRICE) | (low == UNDEF_PRICE) | (c == UNDEF_PRICE))
        if undefined.any():
            stats.skipped["undefined_price"] += int(np.count_nonzero(undefined))
            keep &= ~undefined
        inverted = keep & (h < low)
        if inverted.any():
            stats.skipped["high_below_low"] += int(np.count_nonzero(inverted))
            keep &= ~inverted
        kept = known[keep]
        symbol_ids = symbol_ids[keep]
        rtypes = rtypes[kept]
        publishers = rec["publisher_id"][kept].astype(np.int64)
        ts_ns = ts_event[kept].astype(np.int64) + self.shift_ns
        volume = volume[kept].astype(np.int64)
        # Dense keys: symbols numbered 0.. in this run, then rtype (8 bits) and publisher (16 bits).
        ids, symbol_index = np.unique(symbol_ids, return_inverse=True)
        series = (symbol_index.astype(np.int64) << 8) | rtypes
        self._bar_order(ids.tolist(), (series << 16) | publishers, ts_ns)
        return BarColumns(
            symbol_id=symbol_ids,
            timeframe=timeframe[kept],
            ts=ts_ns // 1000,
            publisher_id=publishers,
            open=rec["open"][kept],
            high=rec["high"][kept],
            low=rec["low"][kept],
            close=rec["close"][kept],
            volume=volume,
            anomalies=self._anomalies(ids.tolist(), series, volume),
        )

    def _bar_order(self, ids: list[int], keys: np.ndarray, ts_ns: np.ndarray) -> None:
        """``_bar``'s out-of-order count for bars in order: per (symbol, timeframe, publisher), a
        bar earlier than the latest one before it (``last_bar_ts``, carried over)."""
        last_bar_ts = self.last_bar_ts
        out_of_order = 0
        for key, where in groups(keys):
            state_key = (ids[key >> 24], BAR_RTYPES[(key >> 16) & 0xFF], key & 0xFFFF)
            times = ts_ns[where]
            before = last_bar_ts.get(state_key, 0)
            if times[0] >= before and (len(times) == 1 or bool((times[1:] >= times[:-1]).all())):
                last_bar_ts[state_key] = int(times[-1])  # in order, the common case
                continue
            latest = np.maximum.accumulate(np.concatenate((np.array([before], dtype=np.int64), times)))
            late = int(np.count_nonzero(times < latest[:-1]))
            out_of_order += late
            if state_key in last_bar_ts or late < len(times):  # one by one, the latest is kept once one is not late
                last_bar_ts[state_key] = int(latest[-1])
        if out_of_order:
            self.stats.warnings["out_of_order"] += out_of_order

    def _anomalies(self, ids: list[int], series: np.ndarray, volume: np.ndarray) -> np.ndarray:
        """Anomaly flags of bars in order, per (symbol, timeframe) as ``AnomalyDetector.flags``."""
        flags = np.zeros(len(volume), dtype=np.int64)
        for key, where in groups(series):
            flags[where] = self.anomalies.flags_many(ids[key >> 8], BAR_RTYPES[key & 0xFF], volume[where].tolist())
        return flags

    def _resolve_many(self, instrument_ids: np.ndarray, ts_event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Symbol ids of records (by their original times) and which are kept: ``_resolve`` at once,
        per instrument, and record by record only for an instrument whose mapping changes within."""
        resolver, stats = self.resolver, self.stats
        allowed = resolver.allowed
        symbol_ids = np.zeros(len(instrument_ids), dtype=np.int64)
        keep = np.zeros(len(instrument_ids), dtype=bool)
        unknown = filtered = 0
        ids, inverse = np.unique(instrument_ids, return_inverse=True)
        for k, instrument_id in enumerate(ids.tolist()):
            where = np.flatnonzero(inverse == k)
            times = ts_event[where]
            found = resolver.resolve_span(instrument_id, int(times.min()), int(times.max()))
            if found is False:
                for i, ts in zip(where.tolist(), times.tolist(), strict=True):
                    interval = resolver.resolve(instrument_id, ts)
                    if interval is None:
                        unknown += 1
                    elif allowed is not None and interval.ticker not in allowed:
                        filtered += 1
                    else:
                        symbol_ids[i], keep[i] = interval.symbol_id, True
            elif found is None:
                unknown += len(where)
            elif allowed is not None and found.ticker not in allowed:
                filtered += len(where)
            else:
                symbol_ids[where], keep[where] = found.symbol_id, True
        if unknown:
            stats.skipped["unknown_instrument"] += unknown
        if filtered:
            stats.skipped["symbol_filtered"] += filtered
        return symbol_ids, keep

    def _ordinals(
        self,
        symbol_ids: np.ndarray,
        publishers: np.ndarray,
        ts_ns: np.ndarray,
        seqs: np.ndarray,
        *,
        state: dict[tuple[int, int], tuple[int, int, int]] | None = None,
        bits: int = 16,
    ) -> np.ndarray:
        """``_trade``'s ordinals and out-of-order count for trades in order, carrying ``last_trade``.

        Per (symbol, publisher), in order: a trade with the time and sequence of the one
        before it takes the next ordinal, any other 0; one earlier than the one before it
        is out of order. Quotes pass their own ``state`` and, as ``publishers``, a series
        number of ``bits`` bits (schema and publisher).
        """
        mask = (1 << bits) - 1
        n = len(symbol_ids)
        if not n:
            return np.zeros(0, dtype=np.int64)
        ids, symbol_index = np.unique(symbol_ids, return_inverse=True)
        id_list = ids.tolist()
        # Dense symbol numbers, then the publisher id (uint16): one integer key per (symbol, publisher).
        keys, inverse = np.unique((symbol_index.astype(np.int64) << bits) | publishers, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        group, ts, seq = inverse[order], ts_ns[order], seqs[order]
        pos = np.arange(n)
        first = np.ones(n, dtype=bool)
        first[1:] = group[1:] != group[:-1]
        prev_ts, prev_seq = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        prev_ts[1:], prev_seq[1:] = ts[:-1], seq[:-1]
        has_prev = ~first
        base = np.zeros(n, dtype=np.int64)  # a run's first ordinal when it goes on from the state's last trade
        last_trade = self.last_trade if state is None else state
        starts = np.flatnonzero(first)
        for p, key in zip(starts.tolist(), keys[group[starts]].tolist(), strict=True):
            last = last_trade.get((id_list[key >> bits], key & mask))
            if last is not None:
                prev_ts[p], prev_seq[p], base[p], has_prev[p] = last[0], last[1], last[2] + 1, True
        same = has_prev & (ts == prev_ts) & (seq == prev_seq)
        out_of_order = int(np.count_nonzero(has_prev & ~same & (ts < prev_ts)))
        if out_of_order:
            self.stats.warnings["out_of_order"] += out_of_order
        run = np.maximum.accumulate(np.where(first | ~same, pos, 0))  # where each trade's run began
        ordinal_sorted = pos - run + np.where(same[run], base[run], 0)
        last_of_group = np.ones(n, dtype=bool)
        last_of_group[:-1] = first[1:]
        for p, key in zip(np.flatnonzero(last_of_group).tolist(), keys[group[last_of_group]].tolist(), strict=True):
            last_trade[(id_list[key >> bits], key & mask)] = (int(ts[p]), int(seq[p]), int(ordinal_sorted[p]))
        ordinals = np.empty(n, dtype=np.int64)
        ordinals[order] = ordinal_sorted
        return ordinals


def _record_bytes(records: Sequence[object] | bytes, size: int) -> bytes | None:
    """The records' bytes one after another; None unless each is ``size`` bytes long."""
    if isinstance(records, bytes):
        return records if len(records) % size == 0 else None
    raw = b"".join(map(bytes, records))  # type: ignore[arg-type]
    return raw if len(raw) == len(records) * size else None
