"""Top of book (mbp-1, tbbo, bbo-1s/1m, cbbo-1s/1m) and trading status records, normalised.

``BookNormalising`` is a base of ``ingest.records.Normaliser``: its methods follow the same
rules over the same state as bars and trades (symbology, each series' order, the
ordinals), which the Normaliser holds; apart so that each module reads as one kind of
record. Quotes are normalised as columns only (``quote_columns``), status records one at
a time (``_status``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, SupportsBytes

import databento_dbn as dbn
import numpy as np

from marketdata.columns import NULL_INT, QuoteColumns
from marketdata.services.bars_trades import UNDEF_PRICE
from marketdata.services.status import StatusIn
from marketdata.timeframes import QUOTE_SCHEMAS
from marketdata.timeparse import EPOCH

from .symbology import COLUMN_TS_LIMIT, UNDEF_TIMESTAMP

if TYPE_CHECKING:
    from .stats import Stats

# Top of book: each record type's layout, and each rtype's schema. tbbo sends MBP-1 records:
# a quote of an MBP-1 record is tbbo's when its feed is (``feed_schema``).
QUOTE_RECORDS: dict[type, np.dtype] = {kind: np.dtype(kind._dtypes) for kind in (dbn.MBP1Msg, dbn.BBOMsg, dbn.CBBOMsg)}
QUOTE_RTYPES: dict[int, str] = {
    dbn.RType.MBP_1.value: "mbp-1",
    dbn.RType.BBO_1S.value: "bbo-1s",
    dbn.RType.BBO_1M.value: "bbo-1m",
    dbn.RType.CBBO_1S.value: "cbbo-1s",
    dbn.RType.CBBO_1M.value: "cbbo-1m",
}
STATUS_RECORD = np.dtype(dbn.StatusMsg._dtypes)
TRI_STATE = {b"Y": True, b"N": False}  # anything else ("~": not available) is unknown: None
UNDEF_TS = UNDEF_TIMESTAMP  # a BBO's ts_event before the book's first update


class BookNormalising:
    """Quotes and status changes (a base of ``ingest.records.Normaliser``, which provides the rest)."""

    if TYPE_CHECKING:  # what the Normaliser provides
        stats: Stats
        shift_ns: int
        feed_schema: str
        last_quote: dict[tuple[int, int], tuple[int, int, int]]
        last_status: dict[tuple[int, int], tuple[int, int]]

        def _resolve(self, instrument_id: int, ts_event: int) -> int | None: ...
        def _resolve_many(self, instrument_ids: np.ndarray, ts_event: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
        def _ordinals(
            self,
            symbol_ids: np.ndarray,
            publishers: np.ndarray,
            ts_ns: np.ndarray,
            seqs: np.ndarray,
            *,
            state: dict[tuple[int, int], tuple[int, int, int]] | None = None,
            bits: int = 16,
        ) -> np.ndarray: ...

    def _status(self, record: dbn.StatusMsg) -> StatusIn | None:
        # Read from the record's bytes: a code databento_dbn has no enum member for is kept as sent.
        (rec,) = np.frombuffer(bytes(record)[: STATUS_RECORD.itemsize], dtype=STATUS_RECORD)
        ts_recv = int(rec["ts_recv"])
        symbol_id = self._resolve(int(rec["instrument_id"]), ts_recv)
        if symbol_id is None:
            return None
        shift = self.shift_ns
        publisher_id = int(rec["publisher_id"])
        ts_ns = ts_recv + shift
        key = (symbol_id, publisher_id)
        last = self.last_status.get(key)
        ordinal = 0
        if last is not None:
            if last[0] == ts_ns:
                ordinal = last[1] + 1
            elif ts_ns < last[0]:
                self.stats.warnings["out_of_order"] += 1
        self.last_status[key] = (ts_ns, ordinal)
        ts_event = int(rec["ts_event"])
        return StatusIn(
            symbol_id=symbol_id,
            ts_recv=EPOCH + timedelta(0, 0, ts_ns // 1000),
            ts_event=None if ts_event == UNDEF_TS else EPOCH + timedelta(0, 0, (ts_event + shift) // 1000),
            publisher_id=publisher_id,
            ordinal=ordinal,
            action=int(rec["action"]),
            reason=int(rec["reason"]),
            trading_event=int(rec["trading_event"]),
            is_trading=TRI_STATE.get(bytes(rec["is_trading"])),
            is_quoting=TRI_STATE.get(bytes(rec["is_quoting"])),
            is_short_sell_restricted=TRI_STATE.get(bytes(rec["is_short_sell_restricted"])),
        )

    def quote_columns(self, records: Sequence[SupportsBytes]) -> QuoteColumns | None:
        """Normalise top-of-book records of one type (MBP1Msg, BBOMsg or CBBOMsg) at once, as columns.

        Symbology by each record's ``ts_recv`` (a BBO's ``ts_event`` may be undefined). A side
        whose price is undefined is absent: NULL_INT in its price, size and count. cbbo has
        no order counts (NULL) but each side's venue. Ordinals as trades' (``_ordinals``), per
        (symbol, schema, publisher) over (ts_recv, sequence). None when nothing is kept.
        """
        if not records:
            return None
        layout = QUOTE_RECORDS[type(records[0])]
        size = layout.itemsize
        raw = b"".join(map(bytes, records))
        if len(raw) != len(records) * size:  # records with ts_out: the layout's bytes of each
            raw = b"".join(bytes(r)[:size] for r in records)
        rec = np.frombuffer(raw, dtype=layout)
        stats = self.stats
        stats.records += len(rec)
        ts_recv = rec["ts_recv"]
        keep = ts_recv < COLUMN_TS_LIMIT
        if not keep.all():
            stats.skipped["time_out_of_range"] += int(np.count_nonzero(~keep))
        codes = np.zeros(len(rec), dtype=np.int64)
        for rtype in np.unique(rec["rtype"]).tolist():
            schema = QUOTE_RTYPES.get(rtype)
            if schema == "mbp-1" and self.feed_schema == "tbbo":
                schema = "tbbo"
            if schema is None:
                stats.skipped[f"rtype:{rtype}"] += int(np.count_nonzero(keep & (rec["rtype"] == rtype)))
            else:
                codes[rec["rtype"] == rtype] = QUOTE_SCHEMAS[schema]
        keep &= codes != 0
        known = np.flatnonzero(keep)
        symbol_ids, resolved = self._resolve_many(rec["instrument_id"][known], ts_recv[known])
        kept = known[resolved]
        if not len(kept):
            return None
        rec, codes, symbol_ids = rec[kept], codes[kept], symbol_ids[resolved]
        shift = self.shift_ns
        recv_ns = rec["ts_recv"].astype(np.int64) + shift
        event = rec["ts_event"]
        event_defined = (event != UNDEF_TS) & (event < COLUMN_TS_LIMIT)
        ts_event_us = np.where(event_defined, (event.astype(np.int64) + shift) // 1000, NULL_INT)
        publishers = rec["publisher_id"].astype(np.int64)
        consolidated = "bid_pb_00" in (layout.names or ())
        sequences = np.zeros(len(rec), dtype=np.int64) if consolidated else rec["sequence"].astype(np.int64)
        sides: dict[str, np.ndarray] = {}
        for side in ("bid", "ask"):
            px = rec[f"{side}_px_00"]
            present = px != UNDEF_PRICE
            sides[f"{side}_px"] = np.where(present, px, NULL_INT)
            sides[f"{side}_sz"] = np.where(present, rec[f"{side}_sz_00"].astype(np.int64), NULL_INT)
            if consolidated:
                sides[f"{side}_ct"] = np.full(len(rec), NULL_INT, dtype=np.int64)
                venue = rec[f"{side}_pb_00"].astype(np.int64)
                sides[f"{side}_publisher_id"] = np.where(present & (venue != 0), venue, NULL_INT)
            else:
                sides[f"{side}_ct"] = np.where(present, rec[f"{side}_ct_00"].astype(np.int64), NULL_INT)
                sides[f"{side}_publisher_id"] = np.full(len(rec), NULL_INT, dtype=np.int64)
        series = (codes << 16) | publishers  # schema code and publisher (u16): one series per pair and symbol
        return QuoteColumns(
            symbol_id=symbol_ids,
            ts_recv=recv_ns // 1000,
            ts_event=ts_event_us,
            publisher_id=publishers,
            schema=codes,
            sequence=sequences,
            ordinal=self._ordinals(symbol_ids, series, recv_ns, sequences, state=self.last_quote, bits=20),
            **sides,
        )
