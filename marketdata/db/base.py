"""django-timescaledb's backend, made safe on plain PostgreSQL.

django-timescaledb 0.2.13 runs ``CREATE EXTENSION timescaledb`` unconditionally when it
prepares a database and turns every ``TimescaleDateTimeField`` into a hypertable, so
``migrate`` and test-database creation abort where the extension is missing. This
backend asks the server first and falls back to plain tables, keeping the same schema
and keys, so the rest of the code sees one API.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql.base import DatabaseWrapper as PostgresWrapper
from timescale.db.backends.postgresql.base import DatabaseWrapper as TimescaleWrapper
from timescale.db.backends.postgresql.schema import TimescaleSchemaEditor

AVAILABLE_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
   AND current_setting('shared_preload_libraries') ~ '(^|[ ,])timescaledb($|[ ,])'
"""
INSTALLED_SQL = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"


class SchemaEditor(TimescaleSchemaEditor):
    """Create hypertables on TimescaleDB; plain tables (same keys) elsewhere."""

    connection: DatabaseWrapper

    def _create_hypertable(self, model: Any, field: Any, should_migrate: bool = False) -> None:
        if self.connection.timescaledb_installed():
            super()._create_hypertable(model, field, should_migrate)

    def _drop_primary_key(self, model: Any) -> None:
        # A composite primary key that holds the partition column is valid on a
        # hypertable and is the table's natural key: keep it.
        pk = model._meta.pk
        if getattr(pk, "field_names", None):
            return
        super()._drop_primary_key(model)


class DatabaseWrapper(TimescaleWrapper):
    """PostgreSQL connection that knows whether TimescaleDB is usable here."""

    SchemaEditorClass = SchemaEditor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timescaledb_installed: bool | None = None

    def timescaledb_available(self) -> bool:
        """Tell whether the server can run TimescaleDB (available and preloaded)."""
        with self.cursor() as cursor:
            cursor.execute(AVAILABLE_SQL)
            return bool(cursor.fetchone()[0])

    def timescaledb_installed(self) -> bool:
        """Tell whether this database has the extension created (cached per connection)."""
        if self._timescaledb_installed is None:
            with self.cursor() as cursor:
                cursor.execute(INSTALLED_SQL)
                self._timescaledb_installed = bool(cursor.fetchone()[0])
        return self._timescaledb_installed

    def prepare_database(self) -> None:
        """Create the extension where the server offers it; leave plain PostgreSQL alone."""
        PostgresWrapper.prepare_database(self)
        if self.timescaledb_available():
            with self.cursor() as cursor:
                cursor.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        self._timescaledb_installed = None
