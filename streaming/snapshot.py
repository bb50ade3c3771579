"""Snapshots: the last N bars or trades of a stream, ending exactly at a seq.

Called after the connection has joined the stream's group (register, then fetch), so
every message after the snapshot's seq reaches the client through the group, and every
message up to it is in the snapshot: together no gap and no duplicate.

The seq and the newest buffer entries are read in one Redis transaction. The snapshot is
the buffer's messages (for bars the latest message per ``ts`` wins, so a forming bar
appears as its latest state) plus, when the buffer holds fewer than N items, older ones
from the database. Database bars newer than the newest buffered bar are left out: they
were committed but not yet published, and will arrive as messages after the seq.
"""

from __future__ import annotations

from datetime import datetime

from channels.db import database_sync_to_async

from marketdata.selectors.bars import bar_list
from marketdata.selectors.trades import trade_list
from marketdata.wire import bar_json, data_ts, trade_json

from .buffer import Buffer, Entry
from .streams import Stream

# How far back the buffer is searched for N items (entries hold whole batches).
MAX_SCAN_FACTOR = 20


def _ts(data: str) -> datetime:
    return datetime.fromisoformat(data_ts(data))


def _db_bars(ticker: str, tf: str, limit: int) -> list[tuple[datetime, str]]:
    page = bar_list(ticker=ticker, tf=tf, limit=limit)
    return [(b.ts, bar_json(b.ts, b.open, b.high, b.low, b.close, b.volume, b.anomalies, b.final)) for b in page.bars]


def _db_trades(ticker: str, end: datetime | None, limit: int) -> list[str]:
    page = trade_list(ticker=ticker, end=end, limit=limit)
    return [trade_json(t.ts_event, t.price, t.size, t.side) for t in page.trades]


async def _scan(buffer: Buffer, stream: str, entries: list[Entry], enough: int, want_bars: bool) -> list[str]:
    """Buffered messages' data, newest first: for bars the latest per ts, until ``enough`` items."""
    out: list[str] = []
    seen: set[str] = set()
    scanned = 0
    while entries:
        for entry in entries:
            for data in reversed(entry.datas):
                if want_bars:
                    key = data_ts(data)
                    if key in seen:
                        continue
                    seen.add(key)
                out.append(data)
                if len(out) >= enough:
                    return out
            scanned += len(entry.datas)
        if scanned >= enough * MAX_SCAN_FACTOR:
            break
        entries = await buffer.older(stream, entries[-1].first)
    return out


async def snapshot(buffer: Buffer, stream: Stream, n: int) -> tuple[int, list[str]]:
    """The stream's last seq and its last ``n`` items' JSON texts, oldest first."""
    seq, entries = await buffer.head(stream.name)
    if n <= 0:
        return seq, []
    is_bars = stream.kind == "bars"
    recent = await _scan(buffer, stream.name, entries, n, is_bars)  # newest first
    if len(recent) >= n:
        return seq, recent[::-1]
    if is_bars:
        assert stream.tf is not None
        by_ts = {_ts(d): d for d in recent}
        newest = max(by_ts) if by_ts else None
        stored = await database_sync_to_async(_db_bars)(stream.ticker, stream.tf, n)
        for ts, data in stored:
            if ts not in by_ts and (newest is None or ts < newest):
                by_ts[ts] = data
        return seq, [by_ts[ts] for ts in sorted(by_ts)[-n:]]
    oldest = _ts(recent[-1]) if recent else None
    older = await database_sync_to_async(_db_trades)(stream.ticker, oldest, n - len(recent))
    return seq, older + recent[::-1]
