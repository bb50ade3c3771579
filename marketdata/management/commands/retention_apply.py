"""Delete bars and trades older than their retention policy."""

from typing import Any

from django.core.management.base import BaseCommand

from marketdata.services.retention import retention_apply


class Command(BaseCommand):
    help = "Delete bars and trades past their (dataset, schema) retention policy (default keep 365 days)."

    def handle(self, *args: Any, **options: Any) -> None:
        deleted = retention_apply()
        for schema, count in deleted.items():
            self.stdout.write(f"{schema}: deleted {count} rows")
        self.stdout.write(self.style.SUCCESS(f"retention applied: {sum(deleted.values())} rows deleted"))
