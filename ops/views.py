"""Liveness, readiness and metrics endpoints."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from prometheus_client import CONTENT_TYPE_LATEST

from . import health, metrics


@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Answer 200 while the process serves requests."""
    return JsonResponse({"status": "ok"})


@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    """Answer 200 when every dependency is reachable, else 503 naming the failing ones."""
    ready, checks = health.readiness()
    metrics.READY.set(1 if ready else 0)
    failing = sorted(name for name, result in checks.items() if result != "ok")
    body = {"status": "ok" if ready else "unavailable", "checks": checks, "failing": failing}
    return JsonResponse(body, status=200 if ready else 503)


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Serve the Prometheus registry in text format."""
    return HttpResponse(metrics.render(), content_type=CONTENT_TYPE_LATEST)
