"""python manage.py demo_data: write the demo DBN files (a thin adapter over ingest.demo)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ingest import demo


class Command(BaseCommand):
    help = "Write realistic demo Databento DBN files: days of 1m history and a live session (trades, 1s and 1m bars)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--symbols", type=int, default=demo.DEFAULT_SYMBOLS, help=f"1-{demo.MAX_SYMBOLS}")
        parser.add_argument("--days", type=int, default=demo.DEFAULT_DAYS, help="weekdays of 1m history")
        parser.add_argument("--out", type=Path, default=Path("var/demo"), help="output directory")
        parser.add_argument("--seed", type=int, default=demo.DEFAULT_SEED, help="random seed (same seed, same files)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            files = demo.write_demo(
                out=options["out"],
                now=datetime.now(UTC),
                symbols=options["symbols"],
                days=options["days"],
                seed=options["seed"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        for f in files:
            counts = ", ".join(f"{schema} {n}" for schema, n in sorted(f.counts.items()))
            self.stdout.write(f"{f.path}: {f.total} records ({counts})")
