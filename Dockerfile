# syntax=docker/dockerfile:1
# The gateway and ingester image: one image, two commands (see compose.yaml and deploy/k8s/).
#   docker build -t marketdata-gateway .
#   docker run -e DJANGO_SECRET_KEY=... -e DJANGO_ALLOWED_HOSTS=... -e DATABASE_URL=... \
#              -e REDIS_URL=... -e METRICS_TOKEN=... -p 8000:8000 marketdata-gateway

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: every pinned requirement as a wheel, compiled here if it must be ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY requirements/ requirements/
RUN pip wheel --wheel-dir /wheels -r requirements/production.txt

# ---- assets: the chart page's npm packages (package-lock.json), as `make assets` does ----
FROM node:22-slim AS assets
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund \
    && mkdir -p /vendor \
    && cp node_modules/lightweight-charts/dist/lightweight-charts.standalone.production.js /vendor/

# ---- runtime: slim, no compiler, non-root ----
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DJANGO_SETTINGS_MODULE=config.settings.production \
    PORT=8000

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app

WORKDIR /app
COPY requirements/ requirements/
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels -r requirements/production.txt

COPY . .
COPY --from=assets /vendor/ static/vendor/
# collectstatic runs here, at build time, into /app/staticfiles (STATIC_ROOT): the
# gateway refuses to start without its manifest (check ops.E001), so an image always has
# it. Production settings refuse to load without a secret key and allowed hosts; these
# dummies exist for this RUN line only and are not in the image's environment.
RUN DJANGO_SECRET_KEY=build-only DJANGO_ALLOWED_HOSTS=x python manage.py collectstatic --noinput \
    && python -m compileall -q config marketdata ingest streaming ops

USER app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/app/scripts/healthcheck.py"]
# daphne plus slow-client detection (streaming/server.py); same arguments as daphne. Its
# access log is the JSON log, tokens redacted (ops/logging.py). Runtime needs, beside the
# docker run line above: METRICS_TOKEN or METRICS_PORT (README "Configuration").
CMD ["python", "-m", "streaming.server", "-b", "0.0.0.0", "-p", "8000", "config.asgi:application"]
