"""Production: secrets only from the environment; refuses unsafe configurations."""

from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import BASE_DIR, MIDDLEWARE, env

SECRET_KEY = env("DJANGO_SECRET_KEY")  # no default: a missing key fails at start
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS")
STREAMING_ALLOW_ANONYMOUS = env.bool("STREAMING_ALLOW_ANONYMOUS", default=False)

if DEBUG:
    raise ImproperlyConfigured("DJANGO_DEBUG must be off in production settings.")
if STREAMING_ALLOW_ANONYMOUS:
    raise ImproperlyConfigured("STREAMING_ALLOW_ANONYMOUS must be off in production settings.")

# SECURITY
# Safe by default; each can be loosened from the environment (check --deploy then warns).
# TLS ends at the proxy (ingress): it must set X-Forwarded-Proto on every request and
# drop any the client sent; empty DJANGO_SECURE_PROXY_SSL_HEADER trusts no header.
_proxy_header = env("DJANGO_SECURE_PROXY_SSL_HEADER", default="HTTP_X_FORWARDED_PROTO")
SECURE_PROXY_SSL_HEADER = (_proxy_header, "https") if _proxy_header else None
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
# Kubernetes probes and Prometheus scrape the pod over plain HTTP inside the cluster: a
# redirect there would count as success for a probe (any 3xx) and hide a failing /readyz.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=True)
SECURE_CONTENT_TYPE_NOSNIFF = True
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

STORAGES = {
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
# Where collectstatic writes (the Dockerfile: at build time) and whitenoise serves from.
STATIC_ROOT = Path(env("DJANGO_STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))

# METRICS ACCESS
# /metrics needs METRICS_TOKEN or METRICS_PORT here, or METRICS_PUBLIC=true (ops.E002).
METRICS_PUBLIC = env.bool("METRICS_PUBLIC", default=False)

# STARTUP CHECKS
# The server refuses to start when the static manifest is missing (ops.E001: pages would
# answer 500) or /metrics is open (ops.E002); `manage.py check --deploy` reports the same.
MIDDLEWARE = ["ops.checks.StartupChecks", *MIDDLEWARE]
