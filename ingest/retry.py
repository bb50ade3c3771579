"""Waits between tries, and the loop that retries the ingester's PostgreSQL and Redis work.

Every wait between tries in ``ingest`` is a ``Backoff``: base, 2*base, 4*base, ... up to a
cap, with equal jitter where many clients may fail at once.

- Historical downloads: a bounded number of tries per window, no jitter
  (``sources/historical.py``).
- Live reconnects: 0.5 s doubling to ``backoff_max``, with jitter, so ingesters that lost
  one gateway do not all come back at the same moment (``sources/live.py``).
- The writers' and the publisher's work while PostgreSQL or Redis is down
  (``retry_until_success``): 50 ms doubling to 1 s, until it succeeds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psycopg
import redis
import structlog
from django.db import DatabaseError, InterfaceError, OperationalError, connection

log = structlog.get_logger(__name__)

T = TypeVar("T")
# Failures of a reachable-again server, not of the batch: worth retrying the same batch.
TRANSIENT = (OperationalError, InterfaceError, psycopg.OperationalError, redis.ConnectionError, redis.TimeoutError)
RETRY_FIRST_S = 0.05  # the first wait after a failed write or publish, doubling up to RETRY_MAX_S
RETRY_MAX_S = 1.0
SHUTDOWN_RETRY_S = 30.0  # once the run is closing, a server still down fails the run after this long
# Past this many doublings every cap in use has been reached; 2**n of a long outage's
# retry count would not fit in a float.
MAX_DOUBLINGS = 32


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential waits: base_s, 2*base_s, 4*base_s, ... up to cap_s; ``jitter``: equal jitter."""

    base_s: float
    cap_s: float
    jitter: bool = False

    def delay(self, retry: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first); with jitter, from [d/2, d]."""
        ceiling = min(self.cap_s, self.base_s * 2 ** min(retry, MAX_DOUBLINGS))
        if not self.jitter:
            return ceiling
        # Half the wait is kept, so a retry never comes at once; the other half spreads the
        # clients that failed together.
        return (rng or random).uniform(ceiling / 2, ceiling)  # jitter, not cryptography


STORE_BACKOFF = Backoff(base_s=RETRY_FIRST_S, cap_s=RETRY_MAX_S)


def retry_until_success(
    what: str, call: Callable[[], T], *, closing: Callable[[], bool], warn: Callable[[str], None]
) -> tuple[T, bool]:
    """``call()`` until PostgreSQL and Redis let it succeed; True when it failed at least once.

    Meanwhile the queues fill and the source waits (back-pressure). Once the run is
    closing, a failure lasting SHUTDOWN_RETRY_S is raised: a stop must end. Any error
    other than TRANSIENT is raised at once.
    """
    failures, failed_since = 0, None
    while True:
        try:
            return call(), failed_since is not None
        except TRANSIENT as exc:
            now = time.monotonic()
            failed_since = failed_since if failed_since is not None else now
            if closing() and now - failed_since > SHUTDOWN_RETRY_S:
                raise
            delay = STORE_BACKOFF.delay(failures)
            failures += 1
            warn(f"retried_{what}")
            log.warning("ingest step failed; retrying", step=what, error=str(exc), retry_in_s=delay)
            if isinstance(exc, DatabaseError | psycopg.Error):
                connection.close()  # a broken connection goes back to the pool, which replaces it
            time.sleep(delay)
