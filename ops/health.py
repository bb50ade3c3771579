"""Readiness checks: each returns None when healthy or a short reason when not."""

from __future__ import annotations

import redis
from django.conf import settings
from django.db import connection

REDIS_TIMEOUT_S = 0.5


def check_database() -> str | None:
    """Run a trivial query on the default database."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any failure means not ready; the reason is reported
        return f"{type(exc).__name__}: {exc}".strip()[:200]
    return None


def check_redis() -> str | None:
    """PING Redis with a short timeout."""
    client = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    finally:
        client.close()
    return None


def feed_ages() -> dict[str, str]:
    """Each live feed's age of last data, as a check result: "ok" or why it is stale.

    Only feeds whose last writer was ``ingest live`` are judged: a finished replay or
    historical fetch is not expected to keep writing. READYZ_FEED_MAX_AGE_S = 0 turns
    the check off (markets close; set it to what a feed's quietest hour allows).
    """
    from django.utils import timezone

    from marketdata.models import FeedStatus

    limit = settings.READYZ_FEED_MAX_AGE_S
    if not limit:
        return {}
    now = timezone.now()
    results = {}
    for feed in FeedStatus.objects.filter(source="live"):
        name = f"feed {feed.dataset} {feed.schema}"
        if feed.last_batch_at is None:
            results[name] = "no data yet"
            continue
        age = (now - feed.last_batch_at).total_seconds()
        results[name] = "ok" if age <= limit else f"no data for {age:.0f} s (limit {limit} s)"
    return results


CHECKS = {"database": check_database, "redis": check_redis}


def readiness() -> tuple[bool, dict[str, str]]:
    """Run every check; ready only if all pass."""
    results = {name: (check() or "ok") for name, check in CHECKS.items()}
    if results["database"] == "ok":
        results.update(feed_ages())
    return all(v == "ok" for v in results.values()), results
