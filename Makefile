# The README's two commands, and the small ones they are made of.
#
#   make run     venv + services + migrate + admin user + demo data, then serve on :8000
#   make test    venv + services + ruff + ruff format --check + mypy + pytest on plain
#                PostgreSQL, then pytest on TimescaleDB where the machine allows (what CI runs)
#
# Other targets: venv, assets, services, timescaledb, lint, fmt, bench, clean, help.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

VENV := .venv
BIN := $(VENV)/bin
# The project runs on Python 3.11 (pyproject: requires-python >=3.11,<3.12).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
REQUIREMENTS := requirements/base.txt requirements/local.txt
# Touched after a successful install: pip runs again only when a requirements file changed.
STAMP := $(VENV)/.requirements.stamp

export PIP_DISABLE_PIP_VERSION_CHECK := 1

# The chart page's browser assets: npm packages pinned by package-lock.json; the vendored
# build is copied into static/ (gitignored) and served by WhiteNoise like the rest.
VENDOR_JS := static/vendor/lightweight-charts.standalone.production.js

.PHONY: help venv assets services timescaledb run test lint fmt bench clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create .venv (Python 3.11) and install requirements/local.txt
	@:

$(STAMP): $(REQUIREMENTS)
	@if [[ ! -x $(BIN)/python ]]; then \
		[[ -n "$(PYTHON)" ]] || { echo "venv: Python 3.11 is needed (python3.11 or python3 on PATH)" >&2; exit 1; }; \
		"$(PYTHON)" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
			|| { echo "venv: $(PYTHON) is not Python 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }; \
		echo "venv: creating $(VENV) with $(PYTHON)"; \
		"$(PYTHON)" -m venv $(VENV); \
	fi
	@echo "venv: installing requirements/local.txt"
	@$(BIN)/python -m pip install -q -r requirements/local.txt
	@touch $@

assets: $(VENDOR_JS) ## Install the page's npm packages (npm ci) and copy lightweight-charts into static/vendor/
	@:

$(VENDOR_JS): package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "assets: npm is needed (Node.js >= 18; Debian: apt-get install npm)" >&2; exit 1; }
	@echo "assets: npm ci"
	@npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@mkdir -p $(@D)
	@cp node_modules/lightweight-charts/dist/lightweight-charts.standalone.production.js $@

services: venv ## Make PostgreSQL and Redis reachable and create the database
	@scripts/services.sh

timescaledb: venv ## Build TimescaleDB from ../shared/vendor if missing; start its cluster (port 5433)
	@scripts/timescaledb.sh || { status=$$?; [[ $$status == 3 ]] || exit $$status; }

run: venv assets ## Serve the demo on http://127.0.0.1:8000/ (migrate, admin user, demo data)
	@scripts/services.sh
	@DJANGO_SETTINGS_MODULE=config.settings.local scripts/run.sh

test: venv assets ## Everything CI runs: ruff, ruff format --check, mypy, pytest on both storage paths
	@scripts/services.sh --tests
	@scripts/test.sh

lint: venv ## ruff, ruff format --check and mypy, without the tests
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

fmt: venv ## Format and autofix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: venv ## Run every bench/*.py (not _*.py) with the venv's python; figures are printed
	@scripts/services.sh
	@shopt -s nullglob; files=(bench/*.py); \
	if (( $${#files[@]} == 0 )); then echo "bench: no bench/*.py yet"; exit 0; fi; \
	failed=(); \
	for f in "$${files[@]}"; do \
		case "$${f##*/}" in _*) continue ;; esac; \
		echo "== $$f"; \
		PYTHONPATH=$(CURDIR) $(BIN)/python "$$f" || failed+=("$$f"); \
	done; \
	if (( $${#failed[@]} )); then echo "bench: FAILED: $${failed[*]}" >&2; exit 1; fi

clean: ## Remove caches and collected static files (keeps .venv and var/)
	rm -rf .mypy_cache .ruff_cache .pytest_cache .hypothesis staticfiles
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
