"""python manage.py ingest replay|historical|live ... (a thin adapter over ingest.pipeline)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ingest.pipeline import IngestLockedError
from ingest.records import Stats
from ingest.sources.keys import ApiKeyError, api_key_get
from ingest.sources.replay import FileRead, run_replay
from marketdata.errors import ValidationError
from marketdata.timeframes import SCHEMAS
from marketdata.timeparse import time_parse
from ops.runtime import interpreter_tune

OUT_READ_WHOLE = "read whole: {path} ({records} records)"
OUT_STOPPED = "stopped: {path} (the run was stopped before its end)"
ERR_FILE_FAILED = "failed: {reason}"
ERR_FILES_FAILED = "{failed} of {total} files could not be read whole (each named above)"
ERR_HISTORICAL_INCOMPLETE = (
    "historical fetch incomplete ({reason}): run the same command again to resume from the store"
)
STOPPED_EARLY = "stopped before the end of the window"
ERR_LIVE_GAVE_UP = "live feed gave up reconnecting; see the log for the last error"
EXIT_CODES = (
    "Exit status: 0 when every input was read whole (a replay or live run stopped by SIGTERM or Ctrl-C "
    "included, once what it read is stored); 1 when any input could not be read whole (a missing, cut, "
    "corrupt, empty or non-DBN file, a directory: each named on stderr with its reason, while what was read "
    "whole stays stored), a historical fetch is incomplete (stopped early included), the live feed ended on "
    "an error, or the run failed (a refused or missing API key, another ingester holding the feed, the "
    "database); 2 on bad arguments."
)


def _symbols(value: str) -> list[str]:
    symbols = [s.strip() for s in value.split(",") if s.strip()]
    if not symbols:
        raise argparse.ArgumentTypeError("--symbols needs at least one symbol, e.g. AAPL,MSFT")
    return symbols


def _time(field: str) -> Callable[[str], datetime]:
    def parse(value: str) -> datetime:
        try:
            return time_parse(value, field=field)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return parse


def _speed(value: str) -> float:
    try:
        speed = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speed must be a positive number, got {value!r}") from None
    if not speed > 0:
        raise argparse.ArgumentTypeError(f"--speed must be a positive number, got {value!r}")
    return speed


class Command(BaseCommand):
    # The system checks import every URL module (DRF, the admin...): a second of startup
    # an ingester does not need; `manage.py check` and the gateway still run them.
    requires_system_checks: list[str] = []
    help = "Ingest Databento data (DBN files, historical API, live API) into the store, then publish it. " + EXIT_CODES

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="source", required=True)
        replay = sub.add_parser(
            "replay", help="replay DBN files (v1-v3, .dbn or .dbn.zst)",
            description="Replay DBN files (v1-v3, .dbn or .dbn.zst); each file is reported read whole or failed. "
            + EXIT_CODES,
        )  # fmt: skip
        replay.add_argument("files", nargs="+", type=Path, metavar="FILE")
        pace = replay.add_mutually_exclusive_group()
        pace.add_argument("--speed", type=_speed, help="pace records by their timestamps, X times real time")
        pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")
        replay.add_argument("--loop", action="store_true", help="repeat forever, shifting times to now")
        replay.add_argument("--symbols", type=_symbols, help="only these symbols, e.g. AAPL,MSFT")
        replay.add_argument("--no-publish", action="store_true", help="store only; publish nothing")

        historical = sub.add_parser("historical", help="fetch from Databento's historical API (DATABENTO_API_KEY)")
        live = sub.add_parser("live", help="stream from Databento's live API (DATABENTO_API_KEY)")
        for p in (historical, live):
            p.add_argument("--dataset", required=True, help="e.g. XNAS.ITCH")
            p.add_argument("--schema", required=True, choices=SCHEMAS)
            p.add_argument("--symbols", type=_symbols, required=True, help="raw symbols, e.g. AAPL,MSFT")
            p.add_argument("--no-publish", action="store_true", help="store only; publish nothing")
        historical.add_argument("--start", type=_time("start"), required=True, help="RFC 3339 or epoch ms")
        historical.add_argument("--end", type=_time("end"), required=True, help="RFC 3339 or epoch ms")
        historical.add_argument("--gateway", help="another historical gateway URL (https)")
        live.add_argument("--start", type=_time("start"), help="intraday replay from this time (RFC 3339)")
        live.add_argument(
            "--gateway", default=settings.DATABENTO_LIVE_GATEWAY or None,
            help="HOST:PORT of another live gateway (default: DATABENTO_LIVE_GATEWAY, else Databento's)",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        interpreter_tune()
        try:
            if options["source"] == "replay":
                self._replay(options)
            elif options["source"] == "historical":
                self._historical(options)
            else:
                self._live(options)
        except (IngestLockedError, ApiKeyError, ValidationError) as exc:
            raise CommandError(exc.message) from None

    def _progress(self, stats: Stats, elapsed: float) -> None:
        rate = stats.written / elapsed if elapsed else 0.0
        lag = "-"
        if stats.last_ts is not None:
            from django.utils import timezone

            lag = f"{(timezone.now() - stats.last_ts).total_seconds():.1f}s"
        self.stderr.write(f"records={stats.records} written={stats.written} rate={rate:,.0f}/s lag={lag}")

    def _replay(self, options: dict[str, Any]) -> None:
        said: dict[Path, str] = {}
        failed: set[Path] = set()

        def on_file(read: FileRead) -> None:
            if read.error:
                failed.add(read.path)
                line, out = ERR_FILE_FAILED.format(reason=read.error), self.stderr
            elif read.stopped:
                line, out = OUT_STOPPED.format(path=read.path), self.stdout
            else:
                line, out = OUT_READ_WHOLE.format(path=read.path, records=read.records), self.stdout
            if said.get(read.path) != line:  # a looped pass that went as the last one is not said again
                said[read.path] = line
                out.write(line)

        results = run_replay(
            paths=options["files"],
            speed=options["speed"],
            loop=options["loop"],
            symbols=options["symbols"],
            publish=not options["no_publish"],
            progress=self._progress,
            on_file=on_file,
            install_signals=True,
        )
        for dataset, stats in results.items():
            self.stdout.write(f"{dataset}: {stats.summary()}")
        if failed:
            raise CommandError(ERR_FILES_FAILED.format(failed=len(failed), total=len(set(options["files"]))))

    def _historical(self, options: dict[str, Any]) -> None:
        from ingest.sources.historical import API_ERRORS, run_historical

        stats = run_historical(
            dataset=options["dataset"], schema=options["schema"], symbols=options["symbols"],
            start=options["start"], end=options["end"], gateway=options["gateway"],
            publish=not options["no_publish"], progress=self._progress, install_signals=True,
        )  # fmt: skip
        self.stdout.write(f"{options['dataset']} {options['schema']}: {stats.summary()}")
        if any(stats.errors[cause] for cause in API_ERRORS):
            raise CommandError(ERR_HISTORICAL_INCOMPLETE.format(reason=stats.last_error))
        if not stats.complete:
            raise CommandError(ERR_HISTORICAL_INCOMPLETE.format(reason=STOPPED_EARLY))

    def _live(self, options: dict[str, Any]) -> None:
        from ingest.sources.live import INTRADAY_REPLAY_NS, LiveAuthError, last_stored_ns, run_live
        from ingest.symbology import ns_datetime

        key = api_key_get(source="ingest live")
        start = options["start"]
        if start is None:
            # A restarted feed first fills what it missed while down (intraday replay reaches a day back).
            stored = last_stored_ns(schema=options["schema"], symbols=options["symbols"])
            if stored is not None and time.time_ns() - stored < INTRADAY_REPLAY_NS:
                start = ns_datetime(stored)
                self.stderr.write(f"live: resuming from the last stored record, {start.isoformat()}")
        try:
            stats = run_live(
                dataset=options["dataset"], schema=options["schema"], symbols=options["symbols"], key=key,
                start=start, gateway=options["gateway"], publish=not options["no_publish"],
                progress=self._progress, install_signals=True,
            )  # fmt: skip
        except LiveAuthError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"{options['dataset']} {options['schema']}: {stats.summary()}")
        if stats.errors["reconnects_exhausted"]:
            raise CommandError(ERR_LIVE_GAVE_UP)
