"""Least-privilege PostgreSQL roles: a writer for the ingester, a read-mostly role for the gateway.

Run as the role that owns the tables (the one that runs ``migrate``), after every
``migrate``: grants are per table, so a new table is granted on the next run. Each run
revokes what a role holds on the schema's tables and grants again, in one transaction,
so the result depends only on the code, never on what an earlier version granted.

Writer (``ingest``, ``retention_apply``): reads the market-data tables; writes only what
the ingest path writes; on TimescaleDB it may call ``marketdata_retention_drop``, the
owner's function through which retention drops whole chunks (drop_chunks itself needs the
owner). It cannot read users, sessions or API tokens.

Gateway (daphne: WebSocket, REST, the page, admin logins): reads every table, and writes
exactly three things, each because a request it serves must:

- ``django_session`` (SELECT, INSERT, UPDATE, DELETE): logging in and out, the session
  that the page and the WebSocket authenticate with;
- ``auth_user.last_login`` and ``auth_user.password`` (column UPDATE): ``login()`` stamps
  last_login, and Django rehashes a password at login whenever its hasher's parameters
  changed (every Django release raises the PBKDF2 iterations) - without it the first
  login after an upgrade would fail;
- ``marketdata_apitoken.last_used_at`` (column UPDATE): token authentication stamps it.

Everything else is read-only to the gateway: bars, trades, symbols, policies, tokens
(beyond last_used_at), entitlements, users (beyond the two columns) and the admin log.
Admin edits (symbols, policies, tokens, users) therefore need the owner role: serve the
admin from a process that runs with it (deploy/k8s: the internal-only ``admin``
Deployment), not from the public gateway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.db import connections, transaction
from psycopg import sql

from .errors import MarketDataError
from .storage import RETENTION_DROP_SIGNATURE

ROLE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
ERR_ROLE_NAME = "role name {name!r}: use lower-case letters, digits and _ (at most 63, not starting with a digit)"
ERR_SAME_ROLE = "the writer and the reader must be two different roles"
ERR_CURRENT_ROLE = "{name!r} is the role this command runs as: give the writer and reader roles of their own"

# table -> privileges beyond SELECT, with why.
WRITER_TABLES: dict[str, tuple[str, ...]] = {
    "marketdata_bar": ("INSERT", "UPDATE", "DELETE"),  # bars_upsert (COPY, ON CONFLICT UPDATE); retention_apply
    "marketdata_trade": ("INSERT", "DELETE"),  # trades_insert (COPY, ON CONFLICT DO NOTHING); retention_apply
    "marketdata_quote": ("INSERT", "DELETE"),  # quotes_insert (COPY, ON CONFLICT DO NOTHING); retention_apply
    "marketdata_statuschange": ("INSERT",),  # status_changes_insert (ON CONFLICT DO NOTHING)
    "marketdata_symbol": ("INSERT",),  # a symbol first seen in a feed (ingest.symbology)
    "marketdata_instrumentmapping": ("INSERT", "UPDATE"),  # instrument ids over time (ingest.symbology)
    "marketdata_feedstatus": ("INSERT", "UPDATE"),  # the feed's status row (update_or_create locks it: UPDATE)
    "marketdata_retentionpolicy": (),  # read by retention_apply
}
WRITER_VIEWS = ("daily_ohlcv_summary",)  # the TimescaleDB continuous aggregate, where it exists

# table -> {privilege: columns or None for the whole table}, on top of SELECT on every table.
READER_WRITES: dict[str, dict[str, tuple[str, ...] | None]] = {
    "django_session": {"INSERT": None, "UPDATE": None, "DELETE": None},
    "auth_user": {"UPDATE": ("last_login", "password")},
    "marketdata_apitoken": {"UPDATE": ("last_used_at",)},
}


class RoleError(MarketDataError):
    """The roles asked for cannot be made."""


@dataclass(frozen=True)
class RoleSpec:
    """A role to create or update; ``password`` None leaves an existing password as it is."""

    name: str
    password: str | None


def _check_names(writer: RoleSpec, reader: RoleSpec, current_user: str) -> None:
    for role in (writer, reader):
        if not ROLE_NAME_RE.match(role.name):
            raise RoleError(ERR_ROLE_NAME.format(name=role.name))
        if role.name == current_user:
            raise RoleError(ERR_CURRENT_ROLE.format(name=role.name))
    if writer.name == reader.name:
        raise RoleError(ERR_SAME_ROLE)


def _ensure_role(cursor: Any, raw: Any, role: RoleSpec, done: list[str]) -> None:
    """Create the role (LOGIN, no special powers) or reset its attributes; set its password if given."""
    cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role.name])
    exists = cursor.fetchone() is not None
    ident = sql.Identifier(role.name)
    attributes = sql.SQL("LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT")
    verb = sql.SQL("ALTER ROLE") if exists else sql.SQL("CREATE ROLE")
    cursor.execute(sql.SQL("{} {} {}").format(verb, ident, attributes))
    action = "updated" if exists else "created"
    if role.password is not None:
        # Hashed here (libpq's PQencryptPasswordConn, SCRAM-SHA-256), so the password
        # itself never reaches the server's statement log.
        verifier = raw.pgconn.encrypt_password(role.password.encode(), role.name.encode(), b"scram-sha-256")
        cursor.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(verifier.decode())))
        action += ", password set"
    else:
        action += ", password unchanged" if exists else ", no password (login only where pg_hba trusts it)"
    done.append(f"role {role.name}: {action}")


def _existing(cursor: Any, names: tuple[str, ...]) -> list[str]:
    """The names among ``names`` that exist in the current schema (tables, views, materialized views)."""
    cursor.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace "
        "AND c.relname = ANY(%s) ORDER BY c.relname",
        [list(names)],
    )
    return [row[0] for row in cursor.fetchall()]


def db_roles_apply(*, writer: RoleSpec, reader: RoleSpec, using: str = "default") -> list[str]:
    """Create or update the writer and gateway roles and their grants in one transaction; say what was done."""
    connection = connections[using]
    done: list[str] = []
    with transaction.atomic(using=using), connection.cursor() as cursor:
        cursor.execute("SELECT current_user, current_database(), current_schema()")
        current_user, database, schema = cursor.fetchone()
        _check_names(writer, reader, current_user)
        raw = connection.connection
        for role in (writer, reader):
            _ensure_role(cursor, raw, role, done)
        q = sql.Identifier
        db, sch = q(database), q(schema)
        for role in (writer, reader):
            r = q(role.name)
            # Start from nothing on this schema's tables and sequences, then grant.
            cursor.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(sch, r))
            cursor.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(sch, r))
            cursor.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, r))
            cursor.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sch, r))
        # The ingester stages each batch in a session temp table (marketdata.services.bars_trades).
        cursor.execute(sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(db, q(writer.name)))

        w = q(writer.name)
        for table in _existing(cursor, (*WRITER_TABLES, *WRITER_VIEWS)):
            privileges = ("SELECT", *WRITER_TABLES.get(table, ()))
            cursor.execute(
                sql.SQL("GRANT {} ON TABLE {} TO {}").format(sql.SQL(", ").join(map(sql.SQL, privileges)), q(table), w)
            )
            if "INSERT" in privileges:
                # Identity columns need no grant of their own; a serial column's sequence does.
                cursor.execute(
                    "SELECT pg_get_serial_sequence(%s, 'id') WHERE EXISTS (SELECT 1 FROM pg_attribute "
                    "WHERE attrelid = %s::regclass AND attname = 'id')",
                    [table, table],
                )
                row = cursor.fetchone()
                if row and row[0]:
                    cursor.execute(sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(sql.SQL(row[0]), w))
            done.append(f"{writer.name}: {', '.join(privileges)} on {table}")

        r = q(reader.name)
        cursor.execute("SELECT to_regprocedure(%s) IS NOT NULL", [RETENTION_DROP_SIGNATURE])
        if cursor.fetchone()[0]:  # TimescaleDB: retention's chunk drops (marketdata.storage)
            drop = sql.SQL(RETENTION_DROP_SIGNATURE)
            cursor.execute(sql.SQL("REVOKE ALL ON FUNCTION {} FROM {}, {}").format(drop, w, r))
            cursor.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(drop, w))
            done.append(f"{writer.name}: EXECUTE on {RETENTION_DROP_SIGNATURE}")

        cursor.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(sch, r))
        done.append(f"{reader.name}: SELECT on every table of schema {schema}")
        for table in _existing(cursor, tuple(READER_WRITES)):
            for privilege, columns in READER_WRITES[table].items():
                target = (
                    sql.SQL("{} ({})").format(sql.SQL(privilege), sql.SQL(", ").join(map(q, columns)))
                    if columns
                    else sql.SQL(privilege)
                )
                cursor.execute(sql.SQL("GRANT {} ON TABLE {} TO {}").format(target, q(table), r))
                done.append(
                    f"{reader.name}: {privilege}{' (' + ', '.join(columns) + ')' if columns else ''} on {table}"
                )
    return done
