#!/usr/bin/env bash
# The checks of `make test`, once the venv and the services are up: ruff, ruff format
# --check, mypy, then the whole pytest suite (settings from pyproject.toml). Every step
# runs even when an earlier one fails, so one run shows everything; the exit status is
# non-zero if any failed. Arguments are passed on to pytest (make test does not pass any).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
failed=()

step() {
    local name="$1"
    shift
    echo "== $name"
    "$@" || failed+=("$name")
}

step "ruff check" "$BIN/ruff" check .
step "ruff format --check" "$BIN/ruff" format --check .
step "mypy" "$BIN/mypy" .

echo "== pytest"
"$BIN/pytest" "$@"
status=$?
if ((status == 5)); then
    # pytest's "no tests collected": a suite that proves nothing fails, as in CI.
    echo "pytest: NO TESTS WERE COLLECTED"
    failed+=("pytest (no tests)")
elif ((status != 0)); then
    failed+=("pytest")
fi

if ((${#failed[@]})); then
    printf -v list '%s; ' "${failed[@]}"
    echo "make test: FAILED: ${list%; }" >&2
    exit 1
fi
echo "make test: all checks passed"
