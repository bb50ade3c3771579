#!/usr/bin/env bash
# Make a TimescaleDB PostgreSQL cluster ready for the tests, beside the machine's main one.
#
#   0. a server that is not a cluster of this machine already answers at
#      TIMESCALEDB_DATABASE_URL, offering and preloading timescaledb (a CI service
#      container, a `docker run` of timescale/timescaledb): use it as it is, build and start
#      nothing; only its role and database are made sure of (step 3);
#   1. the extension is installed for the machine's PostgreSQL: use it; else build and
#      install it from the vendored source (timescaledb-2.28.3.tar.gz, checked against
#      its sha256), installing Debian's postgresql-server-dev-<major> and cmake first
#      when they are missing (as root);
#   2. a cluster named "tsdb" on TIMESCALEDB_DATABASE_URL's port (pg_createcluster) that
#      preloads it, telemetry off, trust on loopback (as the main cluster); created when
#      absent, started only when down;
#   3. its role and database (scripts/services.sh against that URL).
#
# The machine's main cluster (port 5432) is never touched: not its settings, not its state.
# Idempotent, and silent when there is nothing to do; it prints one line per change.
#
# Exit status: 0 ready; 3 skipped, after one line "timescaledb: skipped: <why>" (no
# source tarball, no compiler, no Debian cluster tools, not root to install what the
# build needs: a developer's machine); 1 anything else that went wrong, said on stderr.
#
# Usage: scripts/timescaledb.sh
# Environment:
#   TIMESCALEDB_DATABASE_URL  default postgres://root@127.0.0.1:5433/marketdata
#   TIMESCALEDB_TARBALL       the source tarball; default: vendor/ of ../shared beside the
#                             checkout, else /work/shared/vendor (as the tests' samples)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="2.28.3"
SHA256="ec2f7de0ba53a473c01e0a57e09053898c6b1f7487228caff0f1d31c8cb2dedb"
TARBALL_NAME="timescaledb-$VERSION.tar.gz"
CLUSTER="tsdb"
URL="${TIMESCALEDB_DATABASE_URL:-postgres://root@127.0.0.1:5433/marketdata}"

for arg in "$@"; do
    case "$arg" in
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "timescaledb: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

say() { printf 'timescaledb: %s\n' "$*"; }
die() { printf 'timescaledb: %s\n' "$*" >&2; exit 1; }
skip() { printf 'timescaledb: skipped: %s\n' "$*"; exit 3; }
have() { command -v "$1" >/dev/null 2>&1; }

PORT="$(python3 -c 'import sys; from urllib.parse import urlsplit; print(urlsplit(sys.argv[1]).port or 5432)' "$URL")"
HOST="$(python3 -c 'import sys; from urllib.parse import urlsplit; print(urlsplit(sys.argv[1]).hostname or "")' "$URL")"

# --- 0. A TimescaleDB server already there ------------------------------------------

# A Debian cluster of this machine on that port is managed below (its settings kept in step).
local_cluster_on_port() {
    case "$HOST" in 127.* | localhost | ::1) ;; *) return 1 ;; esac
    have pg_lsclusters || return 1
    local version name port rest
    while read -r version name port rest; do
        [[ "$port" == "$PORT" ]] && return 0
    done < <(pg_lsclusters --no-header 2>/dev/null)
    return 1
}

# Exit status 0: it answers and offers and preloads timescaledb; 1: it answers without;
# 2: it does not answer (or the venv to ask with is missing).
server_offers_timescaledb() {
    [[ -x "$ROOT/.venv/bin/python" ]] || return 2
    "$ROOT/.venv/bin/python" - "$URL" <<'EOF'
import sys
from urllib.parse import unquote, urlsplit

import psycopg

url = urlsplit(sys.argv[1])
try:
    with psycopg.connect(host=url.hostname or "127.0.0.1", port=url.port or 5432, dbname="postgres",
                         user=unquote(url.username or "") or None, password=unquote(url.password or "") or None,
                         connect_timeout=3) as conn:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
            " AND current_setting('shared_preload_libraries') ~ '(^|[ ,])timescaledb($|[ ,])'"
        ).fetchone()
except psycopg.Error:
    sys.exit(2)
sys.exit(0 if row and row[0] else 1)
EOF
}

if ! local_cluster_on_port; then
    status=0
    server_offers_timescaledb || status=$?
    case $status in
        0)
            DATABASE_URL="$URL" "$ROOT/scripts/services.sh" --tests | sed 's/^services:/timescaledb:/'
            exit 0
            ;;
        1) die "the server at $URL answers but does not offer and preload timescaledb" ;;
    esac
fi

# --- From here on: a cluster of this machine, built and started where needed --------

case "$HOST" in 127.* | localhost | ::1) ;; *) die "TIMESCALEDB_DATABASE_URL must be on this machine (loopback), got $URL" ;; esac
[[ "$PORT" != 5432 ]] || die "port 5432 is the machine's main cluster; give TIMESCALEDB_DATABASE_URL another port"

have pg_lsclusters && have pg_createcluster && have pg_ctlcluster \
    || skip "Debian's cluster tools (pg_createcluster, from postgresql-common) are not installed"

# The newest PostgreSQL installed: the one the main cluster's tools also default to.
MAJOR=""
for dir in /usr/lib/postgresql/*/bin/postgres; do
    [[ -x "$dir" ]] || continue
    v="${dir#/usr/lib/postgresql/}"
    v="${v%%/*}"
    [[ -z "$MAJOR" || "$v" -gt "$MAJOR" ]] && MAJOR="$v"
done
[[ -n "$MAJOR" ]] || skip "no Debian PostgreSQL server under /usr/lib/postgresql"
PG_CONFIG="/usr/lib/postgresql/$MAJOR/bin/pg_config"
[[ -x "$PG_CONFIG" ]] || skip "$PG_CONFIG is missing"

# The cluster is the machine's, not a checkout's: one run at a time on the machine
# (make test in two checkouts, CI beside an engineer).
if have flock; then
    exec 9>"${TMPDIR:-/tmp}/marketdata-timescaledb.lock"
    flock 9
fi
# A server started below must not inherit the lock (it would hold it for its lifetime).
unlocked() { "$@" 9>&-; }

# --- 1. The extension ---------------------------------------------------------------

extension_installed() {
    # The Timescale License part (tsl) holds compression and continuous aggregates.
    [[ -f "$("$PG_CONFIG" --sharedir)/extension/timescaledb.control" ]] \
        && compgen -G "$("$PG_CONFIG" --pkglibdir)/timescaledb-tsl-*.so" >/dev/null
}

find_tarball() {
    if [[ -n "${TIMESCALEDB_TARBALL:-}" ]]; then
        [[ -f "$TIMESCALEDB_TARBALL" ]] && printf '%s\n' "$TIMESCALEDB_TARBALL"
        return
    fi
    # Where tests/conftest.py finds the shared samples: ../shared beside the checkout, else /work/shared.
    local candidates=(
        "$(dirname "$ROOT")/shared/vendor/$TARBALL_NAME"
        "/work/shared/vendor/$TARBALL_NAME"
    )
    local c
    for c in "${candidates[@]}"; do
        [[ -n "$c" && -f "$c" ]] && { printf '%s\n' "$c"; return 0; }
    done
    return 1
}

compiler_works() {
    have make || return 1
    local out
    out="$(mktemp)"
    printf 'int main(void) { return 0; }\n' | "${CC:-cc}" -x c - -o "$out" >/dev/null 2>&1
    local status=$?
    rm -f "$out"
    return $status
}

build_extension() {
    local tarball
    tarball="$(find_tarball)" \
        || skip "$TARBALL_NAME not found (${TIMESCALEDB_TARBALL:-not in ../shared/vendor/ nor /work/shared/vendor/; set TIMESCALEDB_TARBALL})"
    compiler_works || skip "no working C compiler (apt-get install -y gcc make) to build TimescaleDB $VERSION"
    [[ "$(sha256sum "$tarball" | cut -d' ' -f1)" == "$SHA256" ]] \
        || die "$tarball is not the TimescaleDB $VERSION source (sha256 differs from $SHA256)"

    local need=()
    have cmake || need+=(cmake)
    [[ -f "$("$PG_CONFIG" --includedir-server)/postgres.h" ]] || need+=("postgresql-server-dev-$MAJOR")
    if ((${#need[@]})); then
        [[ "$(id -u)" == 0 ]] && have apt-get \
            || skip "building TimescaleDB $VERSION needs ${need[*]} (as root: apt-get install -y ${need[*]})"
        say "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        local log
        log="$(mktemp)"
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1 \
            || { cat "$log" >&2; rm -f "$log"; die "apt-get install ${need[*]} failed"; }
        rm -f "$log"
    fi
    [[ -w "$("$PG_CONFIG" --pkglibdir)" ]] \
        || skip "installing TimescaleDB into $("$PG_CONFIG" --pkglibdir) needs root"

    local work
    work="$(mktemp -d)"
    say "building TimescaleDB $VERSION for PostgreSQL $MAJOR from $tarball (about 2 minutes)"
    tar -xzf "$tarball" -C "$work"
    local src="$work/timescaledb-$VERSION" log="$work/build.log"
    if ! (
        cd "$src"
        ./bootstrap -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
            -DCMAKE_BUILD_TYPE=Release -DPG_CONFIG="$PG_CONFIG"
        make -C build -j"$(nproc 2>/dev/null || echo 2)" install
    ) >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "building TimescaleDB $VERSION failed; the whole log is $log"
    fi
    rm -rf "$work"
    extension_installed || die "TimescaleDB $VERSION was built but is not in $("$PG_CONFIG" --pkglibdir)"
    say "installed TimescaleDB $VERSION"
}

extension_installed || build_extension

# --- 2. The cluster -----------------------------------------------------------------

CONF_DIR="/etc/postgresql/$MAJOR/$CLUSTER"
CONF_FILE="$CONF_DIR/conf.d/90-timescaledb.conf"
CONF="# Written by scripts/timescaledb.sh: the TimescaleDB cluster of the tests.
listen_addresses = '127.0.0.1'
port = $PORT
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
# TimescaleDB's scheduler takes a background worker per database with jobs.
max_worker_processes = 32
timescaledb.max_background_workers = 24
autovacuum = off
"
# Trust on loopback, as the main cluster has: the tests connect as roles they create
# (tests/marketdata/test_db_roles.py) by URLs without a password.
HBA_MARK="# scripts/timescaledb.sh: trust on loopback, as the main cluster"
HBA="$HBA_MARK
host all all 127.0.0.1/32 trust
host all all ::1/128 trust"

cluster_status() {
    local version name port status rest
    while read -r version name port status rest; do
        if [[ "$version" == "$MAJOR" && "$name" == "$CLUSTER" ]]; then
            [[ "$port" == "$PORT" ]] || die "cluster $MAJOR/$CLUSTER listens on $port, not $PORT (TIMESCALEDB_DATABASE_URL)"
            printf '%s\n' "$status"
            return 0
        fi
    done < <(pg_lsclusters --no-header 2>/dev/null)
    printf 'absent\n'
}

port_open() {
    python3 -c 'import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
except OSError:
    sys.exit(1)' "$1"
}

status="$(cluster_status)"
if [[ "$status" == absent ]]; then
    [[ "$(id -u)" == 0 ]] || skip "creating PostgreSQL cluster $MAJOR/$CLUSTER needs root"
    ! port_open "$PORT" || die "port $PORT is taken by something other than cluster $MAJOR/$CLUSTER"
    # pg_dropcluster leaves files it did not write: our own settings file, nothing else, may go.
    if [[ -d "$CONF_DIR" ]]; then
        [[ -z "$(find "$CONF_DIR" -type f ! -path "$CONF_FILE")" ]] \
            || die "$CONF_DIR exists but cluster $MAJOR/$CLUSTER does not; remove it or give another port"
        rm -rf "$CONF_DIR"
    fi
    log="$(mktemp)"
    unlocked pg_createcluster "$MAJOR" "$CLUSTER" -p "$PORT" >"$log" 2>&1 \
        || { cat "$log" >&2; rm -f "$log"; die "pg_createcluster $MAJOR $CLUSTER -p $PORT failed"; }
    rm -f "$log"
    say "created PostgreSQL cluster $MAJOR/$CLUSTER on port $PORT"
    status=down
fi

# The settings above, on this cluster only (the file and the rules are ours).
changed=0
if [[ ! -f "$CONF_FILE" || "$(cat "$CONF_FILE")" != "${CONF%$'\n'}" ]]; then
    [[ -w "$CONF_DIR/conf.d" ]] || die "$CONF_FILE needs updating and is not writable (run as root)"
    printf '%s' "$CONF" >"$CONF_FILE"
    chown postgres:postgres "$CONF_FILE" 2>/dev/null || true
    changed=1
fi
if ! grep -qxF "$HBA_MARK" "$CONF_DIR/pg_hba.conf"; then
    [[ -w "$CONF_DIR/pg_hba.conf" ]] || die "$CONF_DIR/pg_hba.conf needs updating and is not writable (run as root)"
    # First match wins: ahead of Debian's scram-sha-256 rules.
    { printf '%s\n' "$HBA"; cat "$CONF_DIR/pg_hba.conf"; } >"$CONF_DIR/pg_hba.conf.new"
    chown postgres:postgres "$CONF_DIR/pg_hba.conf.new" 2>/dev/null || true
    chmod 640 "$CONF_DIR/pg_hba.conf.new"
    mv "$CONF_DIR/pg_hba.conf.new" "$CONF_DIR/pg_hba.conf"
    changed=1
fi

case "$status" in
    online*)
        if ((changed)); then
            unlocked pg_ctlcluster --skip-systemctl-redirect "$MAJOR" "$CLUSTER" restart \
                || die "restarting cluster $MAJOR/$CLUSTER failed (log: /var/log/postgresql/postgresql-$MAJOR-$CLUSTER.log)"
            say "restarted PostgreSQL cluster $MAJOR/$CLUSTER (its settings changed)"
        fi
        ;;
    down*)
        unlocked pg_ctlcluster --skip-systemctl-redirect "$MAJOR" "$CLUSTER" start \
            || die "starting cluster $MAJOR/$CLUSTER failed (log: /var/log/postgresql/postgresql-$MAJOR-$CLUSTER.log)"
        say "started PostgreSQL cluster $MAJOR/$CLUSTER on port $PORT"
        ;;
    *) die "cluster $MAJOR/$CLUSTER is $status; see /var/log/postgresql/postgresql-$MAJOR-$CLUSTER.log" ;;
esac

for ((i = 0; i < 150; i++)); do
    pg_isready -q -h 127.0.0.1 -p "$PORT" -t 2 && break
    sleep 0.2
done
pg_isready -q -h 127.0.0.1 -p "$PORT" -t 2 || die "cluster $MAJOR/$CLUSTER does not answer on port $PORT"

# --- 3. Its role and database -------------------------------------------------------

# Like the main cluster's root: a superuser, since CREATE EXTENSION timescaledb needs one.
user="$(python3 -c 'import sys; from urllib.parse import unquote, urlsplit; print(unquote(urlsplit(sys.argv[1]).username or ""))' "$URL")"
if [[ -n "$user" && "$user" != postgres ]]; then
    psql -X -q -At -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -v role="$user" >/dev/null <<'EOF' \
        || die "could not create role $user in cluster $MAJOR/$CLUSTER"
SELECT format('CREATE ROLE %I LOGIN SUPERUSER', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
EOF
fi
DATABASE_URL="$URL" unlocked "$ROOT/scripts/services.sh" --tests | sed 's/^services:/timescaledb:/'

# The server must offer and preload the extension, or the tests would quietly take the plain path.
ok="$(psql -X -At -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -c \
    "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
        AND current_setting('shared_preload_libraries') ~ '(^|[ ,])timescaledb($|[ ,])'")" \
    || die "cannot query cluster $MAJOR/$CLUSTER on port $PORT"
[[ "$ok" == t ]] || die "cluster $MAJOR/$CLUSTER on port $PORT does not offer and preload timescaledb"
