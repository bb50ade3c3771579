"""System checks of what a served gateway needs, and the gateway's refusal to start without it.

Registered (ops.apps) as deployment checks: ``manage.py check --deploy`` reports them,
and ``StartupChecks`` runs them when a server loads the application under settings that
list it (production), so the process exits with the message instead of serving 500s or
open metrics. Other commands (``collectstatic`` first of all, which makes the manifest,
and the ingester, which serves no pages) do not run them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed

TAG = "ops"
E_STATIC_MANIFEST = "ops.E001"
E_METRICS_OPEN = "ops.E002"
STATIC_MANIFEST_MISSING = "The static files manifest {path} is missing: /login/, /admin/ and /v1/docs would answer 500."
STATIC_MANIFEST_HINT = (
    "Run `python manage.py collectstatic --noinput` with these settings (the Dockerfile runs it "
    "when it builds the image; set DJANGO_STATIC_ROOT if the files are elsewhere)."
)
METRICS_OPEN = "/metrics is open to anyone who reaches the server."
METRICS_OPEN_HINT = (
    "Set METRICS_TOKEN (scrapes send `Authorization: Bearer <METRICS_TOKEN>`) or METRICS_PORT "
    "(served on that port only), or METRICS_PUBLIC=true to keep it open on purpose."
)


@checks.register(TAG, deploy=True)
def static_manifest_check(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Error when the static storage reads a manifest (production) and it is not there."""
    from django.contrib.staticfiles.storage import ManifestFilesMixin
    from django.core.files.storage import storages

    storage = storages["staticfiles"]
    if not isinstance(storage, ManifestFilesMixin) or not storage.manifest_strict:
        return []
    if storage.manifest_storage.exists(storage.manifest_name):
        return []
    path = storage.manifest_storage.path(storage.manifest_name)
    return [checks.Error(STATIC_MANIFEST_MISSING.format(path=path), hint=STATIC_MANIFEST_HINT, id=E_STATIC_MANIFEST)]


@checks.register(TAG, deploy=True)
def metrics_access_check(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Error when nothing guards /metrics and the settings do not open it on purpose (production)."""
    if settings.METRICS_TOKEN or settings.METRICS_PORT is not None or settings.METRICS_PUBLIC:
        return []
    return [checks.Error(METRICS_OPEN, hint=METRICS_OPEN_HINT, id=E_METRICS_OPEN)]


def serving_errors() -> list[checks.CheckMessage]:
    """The errors of this module's checks under the current settings."""
    found = checks.run_checks(include_deployment_checks=True, tags=[TAG])
    return [m for m in found if m.level >= checks.ERROR and not m.is_silenced()]


class StartupChecks:
    """A middleware that runs the checks above once, when the server loads the application, and then steps aside.

    Django builds the middleware chain when the handler is made (config.asgi, at the
    server's start, before it listens): an error here stops the server with the check's
    message. Nothing runs per request (MiddlewareNotUsed).
    """

    def __init__(self, get_response: Callable[..., Any]) -> None:
        errors = serving_errors()
        if errors:
            lines = "\n".join(f"{m.id}: {m.msg} HINT: {m.hint}" for m in errors)
            raise ImproperlyConfigured(f"The gateway refuses to start:\n{lines}")
        raise MiddlewareNotUsed
