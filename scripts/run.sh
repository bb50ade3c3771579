#!/usr/bin/env bash
# The tail of `make run`, once the venv and the services are up: migrate, make sure an
# admin user exists, load demo data and start the live demo feed, then serve (daphne).
#
# Environment:
#   ADMIN_PASSWORD          password for a newly created `admin` user (default: admin;
#                           a local demo only, never a deployed service)
#   RUN_HOST, RUN_PORT      where daphne listens (default 127.0.0.1 and 8000)
#   DJANGO_SETTINGS_MODULE  default config.settings.local
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-config.settings.local}"
HOST="${RUN_HOST:-127.0.0.1}"
PORT="${RUN_PORT:-8000}"
ADMIN_USER=admin
export ADMIN_PASSWORD="${ADMIN_PASSWORD:-admin}"

manage() { "$BIN/python" manage.py "$@"; }

manage migrate --noinput

# Create the admin user only if missing: an existing user's password is left alone.
created="$(ADMIN_USER="$ADMIN_USER" manage shell -c '
import os
from django.contrib.auth import get_user_model

User = get_user_model()
name = os.environ["ADMIN_USER"]
if User.objects.filter(username=name).exists():
    print("exists")
else:
    User.objects.create_superuser(username=name, email="", password=os.environ["ADMIN_PASSWORD"])
    print("created")
' | tail -n 1)"

# Demo data: days of 1m history (stored and published), then a live feed: the live file
# replayed in a loop at real speed, its times shifted to now, in the background.
DEMO_DIR="${DEMO_DIR:-var/demo}"
manage demo_data --out "$DEMO_DIR"
manage ingest replay "$DEMO_DIR/history.ohlcv-1m.dbn.zst" --max
mkdir -p var/log
"$BIN/python" manage.py ingest replay "$DEMO_DIR/live.dbn.zst" --loop --speed 1 >>var/log/live-feed.log 2>&1 &
feed_pid=$!
# The feed stops (and flushes) when the server does, however the server ends.
trap 'kill -TERM "$feed_pid" 2>/dev/null; wait "$feed_pid" 2>/dev/null' EXIT
echo "run: live demo feed started (pid $feed_pid, log var/log/live-feed.log)"

cat <<EOF

  Market-data gateway: http://$HOST:$PORT/
  Admin:               http://$HOST:$PORT/admin/
EOF
if [[ "$created" == created ]]; then
    echo "  Log in as:           $ADMIN_USER / $ADMIN_PASSWORD   (user created just now)"
else
    echo "  Log in as:           $ADMIN_USER, with the password it was created with"
    echo "                       (make run's default is 'admin'; change it: .venv/bin/python manage.py changepassword admin)"
fi
echo "  Stop with Ctrl+C."
echo

"$BIN/python" -m streaming.server -b "$HOST" -p "$PORT" config.asgi:application
