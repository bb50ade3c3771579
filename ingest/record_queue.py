"""The bounded queue between the source and the batcher (back-pressure: a full queue blocks the source)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sized
from typing import Any

CLOSED = object()  # what get returns once the queue is closed and drained


class RecordQueue:
    """A queue bounded in records whose items are lists of rows or columns, so a source hands over many at once."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._items: deque[Any] = deque()
        self._rows = 0
        self._closed = False
        self._cond = threading.Condition()

    def put(self, rows: Sized, timeout: float) -> bool:
        """Add ``rows``; wait while that would pass the bound (an empty queue takes any list). False on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._rows or self._rows + len(rows) <= self.max_rows, timeout):
                return False
            self._items.append(rows)
            self._rows += len(rows)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None) -> Any:
        """The next list of rows; None on timeout; CLOSED once closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                return CLOSED
            rows = self._items.popleft()
            self._rows -= len(rows)
            self._cond.notify_all()
            return rows

    def close(self) -> None:
        """No more puts: get drains what is queued, then returns CLOSED."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def clear(self) -> None:
        """Drop everything queued (the writer failed) and release waiting producers."""
        with self._cond:
            self._items.clear()
            self._rows = 0
            self._cond.notify_all()

    def qsize(self) -> int:
        """Rows waiting."""
        return self._rows

    @property
    def closed(self) -> bool:
        return self._closed
