"""The runs the ``ingest`` command starts: each source through ``pipeline.run``, as an operator sees it.

A run here takes SIGTERM and Ctrl-C as a drained stop (``install_signals``), reports its
progress on ``err`` and its summary on ``out``, and returns why the command exits 1 (None
when every input was read whole); errors that stop it before it starts (a refused or
missing API key, another ingester holding the feed, bad arguments) are raised. The
historical and live sources are imported when they run: ``databento`` costs a replay's
start nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from django.utils import timezone

from .sources.keys import api_key_get
from .sources.replay import FileRead, run_replay
from .stats import Stats

Write = Callable[[str], None]

OUT_READ_WHOLE = "read whole: {path} ({records} records)"
OUT_STOPPED = "stopped: {path} (the run was stopped before its end)"
OUT_RESUMING = "live: resuming from the last stored record, {start}"
ERR_FILE_FAILED = "failed: {reason}"
ERR_FILES_FAILED = "{failed} of {total} files could not be read whole (each named above)"
ERR_HISTORICAL_INCOMPLETE = (
    "historical fetch incomplete ({reason}): run the same command again to resume from the store"
)
STOPPED_EARLY = "stopped before the end of the window"
ERR_LIVE_GAVE_UP = "live feed gave up reconnecting; see the log for the last error"


def progress_reporter(err: Write) -> Callable[[Stats, float], None]:
    """The progress line of a run (records, written, rate, lag), written to ``err`` about once a second."""

    def progress(stats: Stats, elapsed: float) -> None:
        rate = stats.written / elapsed if elapsed else 0.0
        lag = "-"
        if stats.last_ts is not None:
            lag = f"{(timezone.now() - stats.last_ts).total_seconds():.1f}s"
        err(f"records={stats.records} written={stats.written} rate={rate:,.0f}/s lag={lag}")

    return progress


def replay(
    *, files: list[Path], speed: float | None, loop: bool, symbols: list[str] | None, publish: bool, out: Write,
    err: Write,
) -> str | None:  # fmt: skip
    """Replay DBN files, saying of each whether it was read whole; a reason to exit 1 if any was not."""
    said: dict[Path, str] = {}
    failed: set[Path] = set()

    def on_file(read: FileRead) -> None:
        if read.error:
            failed.add(read.path)
            line, write = ERR_FILE_FAILED.format(reason=read.error), err
        elif read.stopped:
            line, write = OUT_STOPPED.format(path=read.path), out
        else:
            line, write = OUT_READ_WHOLE.format(path=read.path, records=read.records), out
        if said.get(read.path) != line:  # a looped pass that went as the last one is not said again
            said[read.path] = line
            write(line)

    results = run_replay(
        paths=files, speed=speed, loop=loop, symbols=symbols, publish=publish, progress=progress_reporter(err),
        on_file=on_file, install_signals=True,
    )  # fmt: skip
    for dataset, stats in results.items():
        out(f"{dataset}: {stats.summary()}")
    return ERR_FILES_FAILED.format(failed=len(failed), total=len(set(files))) if failed else None


def historical(
    *, dataset: str, schema: str, symbols: list[str], start: datetime, end: datetime, gateway: str | None,
    publish: bool, out: Write, err: Write,
) -> str | None:  # fmt: skip
    """Fetch a window from the historical API; a reason to exit 1 if it was not fetched to its end."""
    from .sources.historical import API_ERRORS, run_historical

    stats = run_historical(
        dataset=dataset, schema=schema, symbols=symbols, start=start, end=end, gateway=gateway, publish=publish,
        progress=progress_reporter(err), install_signals=True,
    )  # fmt: skip
    out(f"{dataset} {schema}: {stats.summary()}")
    if any(stats.errors[cause] for cause in API_ERRORS):
        return ERR_HISTORICAL_INCOMPLETE.format(reason=stats.last_error)
    if not stats.complete:
        return ERR_HISTORICAL_INCOMPLETE.format(reason=STOPPED_EARLY)
    return None


def live(
    *, dataset: str, schema: str, symbols: list[str], start: datetime | None, gateway: str | None, publish: bool,
    out: Write, err: Write,
) -> str | None:  # fmt: skip
    """Stream a live subscription until stopped; a reason to exit 1 if it gave up reconnecting.

    Without ``start``, a restarted feed first fills what it missed while down, from the
    last stored record, when that is within the gateway's intraday replay (a day back).
    """
    from .sources.live import INTRADAY_REPLAY_NS, last_stored_ns, run_live
    from .symbology import ns_datetime

    key = api_key_get(source="ingest live")
    if start is None:
        stored = last_stored_ns(schema=schema, symbols=symbols)
        if stored is not None and time.time_ns() - stored < INTRADAY_REPLAY_NS:
            start = ns_datetime(stored)
            err(OUT_RESUMING.format(start=start.isoformat()))
    stats = run_live(
        dataset=dataset, schema=schema, symbols=symbols, key=key, start=start, gateway=gateway, publish=publish,
        progress=progress_reporter(err), install_signals=True,
    )  # fmt: skip
    out(f"{dataset} {schema}: {stats.summary()}")
    return ERR_LIVE_GAVE_UP if stats.errors["reconnects_exhausted"] else None
