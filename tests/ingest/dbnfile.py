"""Write small DBN files for tests with databento_dbn's own encoder."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from types import SimpleNamespace

import databento_dbn as dbn
import zstandard

NS = 1_000_000_000
P = 1_000_000_000


def metadata(
    *, dataset: str = "XNAS.ITCH", schema: dbn.Schema | None = dbn.Schema.OHLCV_1M, symbols: dict[str, int],
    start: date = date(2024, 1, 2), end: date = date(2024, 1, 3),
) -> bytes:  # fmt: skip
    """DBN v3 metadata mapping each raw symbol to its instrument_id over [start, end)."""
    mappings = [
        SimpleNamespace(raw_symbol=s, intervals=[SimpleNamespace(start_date=start, end_date=end, symbol=str(i))])
        for s, i in symbols.items()
    ]
    return dbn.Metadata(
        dataset=dataset, schema=schema, start=0, stype_in=dbn.SType.RAW_SYMBOL, stype_out=dbn.SType.INSTRUMENT_ID,
        symbols=list(symbols), partial=[], not_found=[], mappings=mappings, end=None, limit=None, ts_out=False,
        version=3,
    ).encode()  # fmt: skip


def bar(instrument_id: int, ts_s: int, close: int, *, volume: int = 100, rtype: dbn.RType = dbn.RType.OHLCV_1M,
        publisher_id: int = 2) -> bytes:  # fmt: skip
    """One OHLCV record (prices in whole units, turned into 1e-9 fixed point)."""
    return bytes(
        dbn.OHLCVMsg(
            rtype=int(rtype),
            publisher_id=publisher_id,
            instrument_id=instrument_id,
            ts_event=ts_s * NS,
            open=close * P,
            high=(close + 1) * P,
            low=(close - 1) * P,
            close=close * P,
            volume=volume,
        )
    )


def write(path: Path, header: bytes, records: list[bytes], *, zstd: bool = False) -> Path:
    """Write header + records, zstd-compressed when asked."""
    payload = header + b"".join(records)
    path.write_bytes(zstandard.ZstdCompressor().compress(payload) if zstd else payload)
    return path
