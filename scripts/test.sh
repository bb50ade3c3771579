#!/usr/bin/env bash
# The checks of `make test`, once the venv and the services are up: ruff, ruff format
# --check, mypy, then the whole pytest suite on both storage paths: plain PostgreSQL
# (DATABASE_URL), then TimescaleDB (TIMESCALEDB_DATABASE_URL: a TimescaleDB server already
# there, such as CI's service container, or a cluster that scripts/timescaledb.sh builds and
# starts where the machine allows; where it cannot, that run is skipped with one line
# saying why). Every step runs even when an earlier one
# fails, so one run shows everything; the exit status is non-zero if any failed.
# Arguments are passed on to both pytest runs (make test does not pass any).
#
# Environment:
#   TIMESCALEDB_TESTS         auto (default): the TimescaleDB run where the machine allows;
#                             off: the plain PostgreSQL run only
#   TIMESCALEDB_DATABASE_URL  default postgres://root@127.0.0.1:5433/marketdata
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
TSDB_URL="${TIMESCALEDB_DATABASE_URL:-postgres://root@127.0.0.1:5433/marketdata}"
failed=()
ran=()
skipped=""

step() {
    local name="$1"
    shift
    echo "== $name"
    "$@" || failed+=("$name")
}

# pytest NAME [ENV=VALUE ...] -- [pytest arguments]
pytest_on() {
    local name="$1" started status
    shift
    local envs=()
    while [[ "$1" != -- ]]; do envs+=("$1"); shift; done
    shift
    echo "== pytest: $name"
    started=$SECONDS
    env "${envs[@]}" "$BIN/pytest" "$@"
    status=$?
    echo "pytest: $name: $((SECONDS - started)) s"
    if ((status == 5)); then
        # pytest's "no tests collected": a suite that proves nothing fails, as in CI.
        echo "pytest: NO TESTS WERE COLLECTED"
        failed+=("pytest on $name (no tests)")
    elif ((status != 0)); then
        failed+=("pytest on $name")
    fi
    ran+=("$name")
}

step "ruff check" "$BIN/ruff" check .
step "ruff format --check" "$BIN/ruff" format --check .
step "mypy" "$BIN/mypy" .

pytest_on "plain PostgreSQL" "DATABASE_URL=${DATABASE_URL:-postgres://root@127.0.0.1:5432/marketdata}" -- "$@"

case "${TIMESCALEDB_TESTS:-auto}" in
    off)
        echo "timescaledb: skipped: TIMESCALEDB_TESTS=off"
        skipped="; TimescaleDB skipped"
        ;;
    auto)
        echo "== timescaledb: the TimescaleDB cluster"
        TIMESCALEDB_DATABASE_URL="$TSDB_URL" scripts/timescaledb.sh
        case $? in
            0)
                # Where the extension is expected, the timescaledb tests fail rather than skip.
                pytest_on "TimescaleDB" "DATABASE_URL=$TSDB_URL" MARKETDATA_EXPECT_TIMESCALEDB=1 -- "$@"
                ;;
            3) skipped="; TimescaleDB skipped" ;; # scripts/timescaledb.sh said why, in one line
            *) failed+=("the TimescaleDB cluster (scripts/timescaledb.sh)") ;;
        esac
        ;;
    *)
        echo "TIMESCALEDB_TESTS must be auto or off, got ${TIMESCALEDB_TESTS}" >&2
        failed+=("TIMESCALEDB_TESTS")
        ;;
esac

if ((${#failed[@]})); then
    printf -v list '%s; ' "${failed[@]}"
    echo "make test: FAILED: ${list%; }" >&2
    exit 1
fi
printf -v list '%s and ' "${ran[@]}"
echo "make test: all checks passed (pytest on ${list% and }$skipped)"
