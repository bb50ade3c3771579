"""A run's first failure: every stage reports to ``fail``; the first one is the run's, later ones its consequences."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("ingest.pipeline")  # the run's log lines keep the logger they always had


class RunFailure:
    """The first failure of a run, first-wins; ``wakes`` release stages waiting on others when it fails."""

    def __init__(self, *, record_error: Callable[[BaseException], None]) -> None:
        self.failure: BaseException | None = None
        self._record_error = record_error  # into feed status
        self._lock = threading.Lock()
        self.wakes: list[Callable[[], None]] = []

    def fail(self, exc: BaseException, log_as: str | None = None) -> bool:
        """Record ``exc`` as the run's failure if it is the first (logged as ``log_as``); release every waiting stage.

        True if it was the first.
        """
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = exc
        if first:
            if log_as is not None:
                log.error(log_as, exc_info=exc)
            self._record_error(exc)
        for wake in self.wakes:
            wake()
        return first

    def check(self, what: str = "ingest writer failed") -> None:
        """Raise the run's failure (as RuntimeError ``what``), if there is one."""
        if self.failure is not None:
            raise RuntimeError(what) from self.failure
