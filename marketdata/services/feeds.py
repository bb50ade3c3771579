"""Feed status: what the ingester records of each (dataset, schema) it runs."""

from __future__ import annotations

from datetime import UTC, datetime

from django.db.models import F
from django.utils import timezone

from ..models import FeedStatus


def feed_status_record(
    *, dataset: str, schema: str, source: str, last_record_ts: datetime | None, records_written: int,
    duplicates: int, skipped: int, errors: int, last_error: str,
) -> None:  # fmt: skip
    """Record a feed's state now (the ingester, about once a second and at the end of a run)."""
    now = datetime.now(UTC)
    FeedStatus.objects.update_or_create(
        dataset=dataset,
        schema=schema,
        defaults={
            "source": source,
            "last_record_ts": last_record_ts,
            "last_batch_at": now,
            "lag_seconds": (now - last_record_ts).total_seconds() if last_record_ts else None,
            "records_written": records_written,
            "duplicates": duplicates,
            "skipped": skipped,
            "errors": errors,
            "last_error": last_error[:2000],
            "last_error_at": now if last_error else None,
        },
    )


def feed_status_errors_add(*, dataset: str, schema: str, errors: int, skipped: int, last_error: str) -> None:
    """Add a source's own errors to a feed's status (after its run recorded the pipeline's)."""
    FeedStatus.objects.filter(dataset=dataset, schema=schema).update(
        errors=F("errors") + errors,
        skipped=F("skipped") + skipped,
        last_error=last_error[:2000],
        last_error_at=timezone.now(),
    )
