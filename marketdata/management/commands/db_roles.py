"""Create or update the ingester's writer role and the gateway's read-only role (marketdata.roles)."""

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from marketdata.roles import RoleError, RoleSpec, db_roles_apply

WRITER_PASSWORD_ENV = "DB_WRITER_PASSWORD"  # noqa: S105 (the name of a variable, not a password)
READER_PASSWORD_ENV = "DB_READER_PASSWORD"  # noqa: S105


class Command(BaseCommand):
    help = (
        "Create or update (idempotent) the ingester's writer role and the gateway's read-only role, and their "
        f"grants. Run as the owner of the tables after every migrate. Passwords come from {WRITER_PASSWORD_ENV} "
        f"and {READER_PASSWORD_ENV} (unset: an existing password is kept) and are never printed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--writer",
            default=os.environ.get("DB_WRITER_ROLE", "marketdata_writer"),
            help="the ingester's role (default: $DB_WRITER_ROLE or marketdata_writer)",
        )
        parser.add_argument(
            "--reader",
            default=os.environ.get("DB_READER_ROLE", "marketdata_gateway"),
            help="the gateway's role (default: $DB_READER_ROLE or marketdata_gateway)",
        )
        parser.add_argument("--database", default="default", help="database alias (default: default)")

    def handle(self, *args: Any, **options: Any) -> None:
        writer = RoleSpec(options["writer"], os.environ.get(WRITER_PASSWORD_ENV) or None)
        reader = RoleSpec(options["reader"], os.environ.get(READER_PASSWORD_ENV) or None)
        try:
            done = db_roles_apply(writer=writer, reader=reader, using=options["database"])
        except RoleError as exc:
            raise CommandError(str(exc)) from exc
        for line in done:
            self.stdout.write(line)
        self.stdout.write(self.style.SUCCESS(f"roles ready: writer {writer.name}, gateway {reader.name}"))
