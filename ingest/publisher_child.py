"""The entry point of the ingester's publisher process (see ingest/publisher_hosts.py).

A module of its own, importing nothing of Django's at import time: a spawned child
unpickles its target before Django is set up, and models cannot be imported before that.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import traceback
from typing import Any


def ignore_stop_signals() -> dict[int, Any]:
    """Ignore SIGINT and SIGTERM; return the handlers to restore (none outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}


def child_main(
    run_id: str, jobs: Any, reports: Any, closing: Any, settings_module: str, inherited: dict[str, Any]
) -> None:
    """The publisher process: set up Django as the parent has it, then publish jobs until told to stop."""
    ignore_stop_signals()
    work = None
    try:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
        import django
        from django.conf import settings

        for name, value in inherited.items():  # before setup: apps may reach the database while loading
            setattr(settings, name, value)
        django.setup()
        from ops.runtime import interpreter_tune

        from .publisher import PublishWork, log, serve

        interpreter_tune()
        parent = multiprocessing.parent_process()
        work = PublishWork(run_id, closing=closing.is_set, warn=lambda what: reports.put(("warning", what)))
        reports.put(("ready",))
        if serve(jobs, work, wanted=lambda: parent is None or parent.is_alive()):
            reports.put(("done",))
        else:
            log.error("ingest publisher: parent process gone; stopping")
    except BaseException as exc:
        traceback.print_exc()  # stderr: logging may not be set up yet
        reports.put(("failed", type(exc).__name__, str(exc)))
        raise SystemExit(1) from None
    finally:
        if work is not None:
            from django.db import connections

            work.close()
            connections.close_all()
            for conn in connections.all(initialized_only=True):
                # The pool's sessions end now, not whenever the server notices this process is gone.
                getattr(conn, "close_pool", lambda: None)()
