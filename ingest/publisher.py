"""The publisher's work: derive and publish committed batches, in commit order, and its one job loop.

``PublishWork`` turns each committed batch into messages (every written bar and trade, and
the derived and forming bars of coarser timeframes) and publishes them. ``serve`` is the
job loop of both hosts (ingest/publisher_hosts.py): the thread of the ingest process, and
the child process (ingest/publisher_child.py). Behind a fast source it takes the batches
queued behind the one it got and publishes them as one (``with_backlog``).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog

from marketdata.columns import BarColumns, TradeColumns, concat, groups
from marketdata.selectors.bars import bar_range_stored, bar_ranges_stored
from marketdata.wire import bar_datas, time_texts, trade_data
from streaming.derive import Deriver
from streaming.publish import Publisher
from streaming.streams import bars_stream, trades_stream

from .retry import retry_until_success

log = structlog.get_logger("ingest.publishing")  # the publisher's log lines keep the logger they always had

PARENT_CHECK_S = 1.0  # a job loop with nothing to do asks whether it is still wanted this often
STOP = "stop"  # after the last job: the host drains what came before, then ends

Groups = dict[tuple[str, str], list[str]]  # (stream, kind) -> data texts in order, as publish_groups takes them
# What trades' messages need, as columns (marketdata/columns.py): symbol ids, ts_event in
# Unix microseconds, prices, sizes, sides. The writer sends these, not the whole trades:
# arrays pickle as their bytes, and no JSON is made in the process that writes.
TradeOut = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Job = tuple[list[BarColumns], list[TradeOut], dict[int, str]]  # bars and trades in parts, tickers not sent before
# Behind (a replay at full speed, a catch-up after an outage), the publisher takes the
# batches queued behind the one it got and publishes them as one, up to about this many
# records: a stream's costs per publish (its entry in the transaction, its derived and forming
# bars) are paid once for all of them. Live, the queue is empty and each batch goes alone.
MERGE_RECORDS = 10_000
LINGER_S = 0.02  # how long a publisher behind waits for more batches to publish as one (with_backlog)


def serve(jobs: Any, work: PublishWork, *, wanted: Callable[[], bool] = lambda: True) -> bool:
    """Publish the jobs of ``jobs`` in order until STOP (True), or until ``wanted()`` says no while idle (False).

    ``jobs`` is the host's queue (``queue.Queue`` or ``multiprocessing.Queue``).
    """
    behind = False
    while True:
        try:
            job = jobs.get(timeout=PARENT_CHECK_S)
        except queue.Empty:
            if not wanted():
                return False
            continue
        if job == STOP:
            return True
        job, stop = with_backlog(job, jobs, LINGER_S if behind else 0.0)
        work.handle(*job)
        if stop:
            return True
        behind = jobs.qsize() > 0  # batches came in meanwhile


class PublishWork:
    """Derives and publishes committed batches, in commit order; one per run, host-confined."""

    def __init__(self, run_id: str, *, closing: Callable[[], bool], warn: Callable[[str], None]) -> None:
        self.run_id = run_id  # with a batch number, names each publish so a retry is not repeated
        self.closing = closing
        self.warn = warn
        self.deriver = Deriver(
            load=lambda symbol_id, base, lo, hi: bar_range_stored(symbol_id=symbol_id, base=base, start=lo, end=hi),
            load_many=lambda base, wanted: bar_ranges_stored(base=base, wanted=wanted),
        )
        self.publisher = Publisher()
        self.tickers: dict[int, str] = {}
        self.trade_messages = TradeMessages(self.tickers)
        self._published = 0
        # Stream names and kinds by (timeframe, symbol id): made once, not per message.
        self._bar_streams: dict[tuple[str, int], tuple[str, str]] = {}

    def handle(self, bars: list[BarColumns], trades: list[TradeOut], tickers: dict[int, str]) -> None:
        """Publish one committed batch (retrying while Redis or PostgreSQL is down)."""
        self.tickers.update(tickers)
        groups: Groups = {}
        if bars:
            groups = retry_until_success(
                "derive", lambda: self.bar_messages(bars), closing=self.closing, warn=self.warn
            )[0]
        if trades:
            groups.update(self.trade_messages(trades))  # trade streams and bar streams never share a name
        if groups:
            self._published += 1
            batch_id = f"{self.run_id}:{self._published}"
            publish = self.publisher.publish_groups
            retry_until_success(
                "publish", lambda: publish(groups, batch_id=batch_id), closing=self.closing, warn=self.warn
            )

    def bar_messages(self, parts: list[BarColumns]) -> dict[tuple[str, str], list[str]]:
        """Every written bar (final), then the derived and forming bars of coarser timeframes.

        Grouped as Publisher.publish_groups takes them: (stream, "bar") -> data texts in
        order; no object per message (a Message each was a fifth of the publisher's time).
        The written bars' texts are made per batch (wire.bar_datas), and put in their
        streams' groups a stream at a time.
        """
        groups: dict[tuple[str, str], list[str]] = {}
        streams = self._bar_streams
        for cols in parts:
            written = np.array(
                bar_datas(cols.ts, cols.open, cols.high, cols.low, cols.close, cols.volume, cols.anomalies, True),
                dtype=object,
            )
            for (symbol_id, tf), where in stream_groups(cols.symbol_id, cols.timeframe):
                key = streams.get((tf, symbol_id)) or self._bar_stream(tf, symbol_id)
                groups.setdefault(key, []).extend(written[where].tolist())
        derived = self.deriver.add_columns(concat(parts))
        texts = bar_datas(*derived[1:])
        at = 0
        for symbol_id, tf, count in derived.streams:
            key = streams.get((tf, symbol_id)) or self._bar_stream(tf, symbol_id)
            groups.setdefault(key, []).extend(texts[at : at + count])
            at += count
        return groups

    def _bar_stream(self, tf: str, symbol_id: int) -> tuple[str, str]:
        key = self._bar_streams[(tf, symbol_id)] = (bars_stream(tf, self.tickers[symbol_id]), "bar")
        return key

    def close(self) -> None:
        self.publisher.close()


def stream_groups(symbol_ids: np.ndarray, timeframes: np.ndarray) -> list[tuple[tuple[int, str], np.ndarray]]:
    """Each (symbol id, timeframe) of bars with the indices of its bars, in order."""
    ids, symbol_index = np.unique(symbol_ids, return_inverse=True)
    tfs, tf_index = np.unique(timeframes, return_inverse=True)
    id_list, names = ids.tolist(), tfs.astype("U2").tolist()
    width = len(names)
    return [
        ((id_list[key // width], names[key % width]), where)
        for key, where in groups(symbol_index.astype(np.int64) * width + tf_index)
    ]


def trades_out(trades: TradeColumns) -> TradeOut:
    """What the publisher needs of written trades."""
    return (trades.symbol_id, trades.ts_event, trades.price, trades.size, trades.side)


class TradeMessages:
    """Written trades as publish groups: (``trades:<SYM>``, "trade") -> data texts, in order."""

    def __init__(self, tickers: dict[int, str]) -> None:
        self.tickers = tickers  # symbol id -> ticker
        self._streams: dict[int, tuple[str, str]] = {}

    def __call__(self, parts: list[TradeOut]) -> Groups:
        groups: Groups = {}
        streams = self._streams
        for symbol_ids, times, prices, sizes, sides in parts:
            texts = time_texts(times)  # at once: the times of trades rarely repeat
            rows = zip(
                symbol_ids.tolist(), texts, prices.tolist(), sizes.tolist(), sides.astype("U1").tolist(), strict=True
            )
            for symbol_id, ts, price, size, side in rows:
                key = streams.get(symbol_id)
                if key is None:
                    key = streams[symbol_id] = (trades_stream(self.tickers[symbol_id]), "trade")
                datas = groups.get(key)
                if datas is None:
                    datas = groups[key] = []
                datas.append(trade_data(ts, price, size, side))
        return groups


def with_backlog(job: Job, jobs: Any, linger_s: float = 0.0) -> tuple[Job, bool]:
    """``job`` and the jobs queued behind it as one, up to MERGE_RECORDS; True if STOP came after them.

    ``jobs`` is the host's queue (``queue.Queue`` or ``multiprocessing.Queue``). Its size
    says what is queued, not an empty ``get_nowait``: a process queue's jobs reach the
    child's pipe through a feeder thread, and a pipe holds less than one batch, so the next
    job is almost never readable yet when the child asks. Bars keep their commit order
    (the deriver needs each stream's in time order) and each trade stream its messages in
    order: the same messages, fewer publishes.

    With ``linger_s`` (the host passes LINGER_S when jobs came in while it published the
    last: it is behind a fast source), it also waits that long at most for jobs still to
    come. A publish costs mostly per stream (each batch of 50 symbols' 1m bars touches 350
    streams), so gathering more batches into one is what lets the publisher keep up.
    """
    bars, trades, tickers = job
    count = sum(len(part) for part in bars) + sum(len(part[0]) for part in trades)
    merged = False
    deadline = time.monotonic() + linger_s
    while count < MERGE_RECORDS:
        wait = PARENT_CHECK_S if jobs.qsize() > 0 else deadline - time.monotonic()
        if wait <= 0:
            break
        try:  # queued, so it comes at once (it may still be on its way through the pipe)
            more = jobs.get(timeout=wait)
        except queue.Empty:  # none came in time, or a parent that died mid-send: the caller's loop notices
            break
        if more == STOP:
            return (bars, trades, tickers), True
        if not merged:  # the first job's containers may still be the writer's (ThreadHost)
            bars, trades, tickers = list(bars), list(trades), dict(tickers)
            merged = True
        more_bars, more_trades, more_tickers = more
        bars.extend(more_bars)
        trades.extend(more_trades)
        tickers.update(more_tickers)
        count += sum(len(part) for part in more_bars) + sum(len(part[0]) for part in more_trades)
    return (bars, trades, tickers), False
