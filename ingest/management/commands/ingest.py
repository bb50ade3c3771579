"""python manage.py ingest replay|historical|live ... (a thin adapter over ingest.runs, which drive ingest.pipeline)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ingest import runs
from marketdata.errors import MarketDataError, ValidationError
from marketdata.timeframes import SCHEMAS
from marketdata.timeparse import time_parse
from ops.runtime import interpreter_tune

EXIT_CODES = (
    "Exit status: 0 when every input was read whole (a replay or live run stopped by SIGTERM or Ctrl-C "
    "included, once what it read is stored); 1 when any input could not be read whole (a missing, cut, "
    "corrupt, empty or non-DBN file, a directory: each named on stderr with its reason, while what was read "
    "whole stays stored), a historical fetch is incomplete (stopped early included), the live feed ended on "
    "an error, or the run failed (a refused or missing API key, another ingester holding the feed, the "
    "database); 2 on bad arguments."
)
# Each source's run (ingest.runs) and the options it takes, besides --no-publish.
RUNS: dict[str, tuple[Callable[..., str | None], tuple[str, ...]]] = {
    "replay": (runs.replay, ("files", "speed", "loop", "symbols")),
    "historical": (runs.historical, ("dataset", "schema", "symbols", "start", "end", "gateway")),
    "live": (runs.live, ("dataset", "schema", "symbols", "start", "gateway")),
}


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
        run, names = RUNS[options["source"]]
        try:
            error = run(
                **{name: options[name] for name in names}, publish=not options["no_publish"],
                out=self.stdout.write, err=self.stderr.write,
            )  # fmt: skip
        except MarketDataError as exc:  # a refused or missing API key, a feed held by another ingester, bad arguments
            raise CommandError(exc.message) from None
        if error is not None:
            raise CommandError(error)
