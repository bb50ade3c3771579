"""Interpreter settings for the long-running processes (the gateway and the ingester)."""

from __future__ import annotations

import gc
import sys

GC_THRESHOLD = 50_000  # allocations between young-generation collections (Python's default: 700)
SWITCH_INTERVAL_S = 0.0005  # how long a thread may hold the interpreter lock while others wait (default 5 ms)


def warm_up() -> None:
    """Load now what Django loads on a process's first request: the URLconf with every view module.

    Call once Django is set up. Without it the first request after a start imported the
    URLconf and the views it names in its worker thread, holding the interpreter lock
    ~30 ms while every socket waited (py-spy on bench/abuse.py's first REST phase); loaded
    here, it is also frozen with the rest by ``interpreter_tune``.
    """
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 (the property imports the URLconf and its views)


def interpreter_tune() -> None:
    """Call once everything long-lived is loaded (Django, the modules, the settings).

    What is loaded by then is frozen out of the cyclic collector's walks: an oldest-generation
    collection walked all of it with the interpreter lock held, stalling every request in
    flight ~70 ms in the gateway (five times in a 30 s bench/history.py run with the cache
    off: p99 110 -> 51 ms). Young collections come every GC_THRESHOLD allocations: with a
    tuple or two per record they were a tenth of the ingester's CPU. A thread back from
    PostgreSQL or Redis waited up to the default 5 ms switch interval for the lock, once per
    round trip (the ingester's writer: 300,000 bars 10.6 -> 8.5 s with 0.5 ms).
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
