"""python manage.py ingest replay|historical|live ... (a thin adapter over ingest.pipeline)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ingest.pipeline import IngestLockedError, run_replay
from ingest.records import Stats


def _symbols(value: str) -> list[str]:
    symbols = [s.strip() for s in value.split(",") if s.strip()]
    if not symbols:
        raise argparse.ArgumentTypeError("--symbols needs at least one symbol, e.g. AAPL,MSFT")
    return symbols


def _speed(value: str) -> float:
    try:
        speed = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speed must be a positive number, got {value!r}") from None
    if not speed > 0:
        raise argparse.ArgumentTypeError(f"--speed must be a positive number, got {value!r}")
    return speed


class Command(BaseCommand):
    help = "Ingest Databento data (DBN files, historical API, live API) into the store, then publish it."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="source", required=True, parser_class=argparse.ArgumentParser)
        replay = sub.add_parser("replay", help="replay DBN files (v1-v3, .dbn or .dbn.zst)")
        replay.add_argument("files", nargs="+", type=Path, metavar="FILE")
        pace = replay.add_mutually_exclusive_group()
        pace.add_argument("--speed", type=_speed, help="pace records by their timestamps, X times real time")
        pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")
        replay.add_argument("--loop", action="store_true", help="repeat forever, shifting times to now")
        replay.add_argument("--symbols", type=_symbols, help="only these symbols, e.g. AAPL,MSFT")
        replay.add_argument("--no-publish", action="store_true", help="store only; publish nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["source"] == "replay":
            self._replay(options)

    def _progress(self, stats: Stats, elapsed: float) -> None:
        rate = stats.written / elapsed if elapsed else 0.0
        lag = "-"
        if stats.last_ts is not None:
            from django.utils import timezone

            lag = f"{(timezone.now() - stats.last_ts).total_seconds():.1f}s"
        self.stderr.write(f"records={stats.records} written={stats.written} rate={rate:,.0f}/s lag={lag}")

    def _replay(self, options: dict[str, Any]) -> None:
        try:
            results = run_replay(
                paths=options["files"],
                speed=options["speed"],
                loop=options["loop"],
                symbols=options["symbols"],
                publish=not options["no_publish"],
                progress=self._progress,
            )
        except IngestLockedError as exc:
            raise CommandError(exc.message) from None
        for dataset, stats in results.items():
            self.stdout.write(f"{dataset}: {stats.summary()}")
