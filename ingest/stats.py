"""What an ingest run did, by cause: counted by the normaliser and the stages, reported by the run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import structlog

log = structlog.get_logger(__name__)


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
