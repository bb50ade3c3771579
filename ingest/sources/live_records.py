"""What a live run receives: each connection's inbox, and the records already passed on.

A connection's inbox is filled by the client's callback, which only enqueues: while the
inbox is full it waits (back-pressure, see sources/live.py), never drops. ``Recent``
remembers the data records passed on, so the overlap of a gap-filling intraday replay is
recognised by its bytes and dropped before the pipeline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import databento
import databento_dbn as dbn

from ops import metrics

log = logging.getLogger("ingest.sources.live")  # the live run's log lines keep the logger they always had

QUEUE_MAX = 10_000  # records of one connection waiting for the pipeline
PUT_WAIT_S = 0.25  # the callback's wait for room, re-checked in steps of this
RECENT_MAX = 65_536  # records remembered to recognise a gap-fill replay's overlap


@dataclass(eq=False)
class Connection:
    """One client connection: its client, its queue, and what the callback has seen."""

    client: databento.Live
    start_ns: int | None
    opened: float = field(default_factory=time.monotonic)
    inbox: queue.Queue[object] = field(default_factory=lambda: queue.Queue(maxsize=QUEUE_MAX))
    abandoned: threading.Event = field(default_factory=threading.Event)
    last_seen: float = field(default_factory=time.monotonic)
    data: int = 0
    waits: int = 0  # times the callback found the queue full

    def on_record(self, record: object) -> None:
        """The client's callback (its event-loop thread): note the time, enqueue, never drop.

        Blocks only while the queue is full (back-pressure, see sources/live.py's docstring) and
        returns at once when the connection has been abandoned.
        """
        self.last_seen = time.monotonic()
        if isinstance(record, dbn.SystemMsg) and record.is_heartbeat():
            return  # liveness only
        while not self.abandoned.is_set():
            try:
                self.inbox.put(record, timeout=PUT_WAIT_S)
                return
            except queue.Full:
                self.waits += 1
                metrics.INGEST_BACKPRESSURE.inc()

    def on_error(self, exc: Exception) -> None:
        log.error("live record callback failed", exc_info=exc)


class Recent:
    """Data records already passed on, to recognise them when a gap-fill replay sends them again."""

    def __init__(self, size: int = RECENT_MAX) -> None:
        self.items: deque[tuple[int, bytes]] = deque(maxlen=size)
        self.pending: Counter[bytes] = Counter()

    def expect_replay(self, start_ns: int) -> int:
        """A replay from ``start_ns`` follows: returns how many records it resends that were seen."""
        self.pending = Counter(raw for ts, raw in self.items if ts >= start_ns)
        if len(self.items) == self.items.maxlen and self.items[0][0] > start_ns:
            log.warning(
                "live: the replay overlap is longer than the records remembered; the store's upserts absorb the rest",
                extra={"remembered": len(self.items)},
            )
        return self.pending.total()

    def seen(self, record: dbn.OHLCVMsg | dbn.TradeMsg) -> bool:
        """True when ``record`` is a resent one (drop it); otherwise remember it."""
        raw = bytes(record)
        if self.pending:
            count = self.pending.get(raw, 0)
            if count:
                if count == 1:
                    del self.pending[raw]
                else:
                    self.pending[raw] = count - 1
                return True
        self.items.append((record.ts_event, raw))
        return False
