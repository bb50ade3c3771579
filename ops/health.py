"""Readiness checks: each returns None when healthy or a short reason when not."""

from __future__ import annotations

from collections.abc import Callable

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


CHECKS = {"database": check_database, "redis": check_redis}
# Checks of what other apps own, run once the database answers, each giving {name: "ok" or
# why not}. Each app adds its own when it loads (marketdata: its live feeds' ages), so ops
# imports none of them.
DATABASE_CHECKS: list[Callable[[], dict[str, str]]] = []


def database_check_add(check: Callable[[], dict[str, str]]) -> None:
    """Run ``check`` in every readiness check, after the database has answered."""
    if check not in DATABASE_CHECKS:
        DATABASE_CHECKS.append(check)


def readiness() -> tuple[bool, dict[str, str]]:
    """Run every check; ready only if all pass."""
    results = {name: (check() or "ok") for name, check in CHECKS.items()}
    if results["database"] == "ok":
        for check in DATABASE_CHECKS:
            results.update(check())
    return all(v == "ok" for v in results.values()), results
