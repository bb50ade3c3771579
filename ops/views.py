"""Liveness, readiness and metrics endpoints."""

from __future__ import annotations

import hmac

from django.conf import settings
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


METRICS_PATH = "/metrics"
# Answers that tests assert on.
METRICS_NO_CREDENTIALS = "metrics: an Authorization: Bearer <METRICS_TOKEN> header is required\n"
METRICS_BAD_CREDENTIALS = "metrics: wrong token\n"
METRICS_NOT_HERE = "not found\n"


def metrics_refusal(request: HttpRequest) -> HttpResponse | None:
    """Why this request may not read the metrics (a response to send), or None when it may.

    With METRICS_PORT the metrics are served on that port of the server only (404
    elsewhere); with METRICS_TOKEN the request must carry ``Authorization: Bearer
    <METRICS_TOKEN>`` (401 without, 403 with another token, compared in constant time).
    """
    port = getattr(settings, "METRICS_PORT", None)
    if port is not None and request.META.get("SERVER_PORT") != str(port):
        return HttpResponse(METRICS_NOT_HERE, status=404, content_type="text/plain")
    expected = getattr(settings, "METRICS_TOKEN", "")
    if not expected:
        return None
    scheme, _, given = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        response = HttpResponse(METRICS_NO_CREDENTIALS, status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        return HttpResponse(METRICS_BAD_CREDENTIALS, status=403, content_type="text/plain")
    return None


def metrics_port_answer(request: HttpRequest) -> HttpResponse | None:
    """What the metrics endpoint answers before any other middleware, or None to go on.

    ``/metrics`` is answered here, ahead of the host check (Prometheus scrapes a pod by
    its address, which ALLOWED_HOSTS does not list; the answer names no host) and of the
    HTTPS redirect (scrapes are plain HTTP inside the cluster). On METRICS_PORT nothing
    but the metrics is served.
    """
    port = getattr(settings, "METRICS_PORT", None)
    on_metrics_port = port is not None and request.META.get("SERVER_PORT") == str(port)
    if request.path_info == METRICS_PATH:
        return metrics_view(request)
    if on_metrics_port:
        return HttpResponse(METRICS_NOT_HERE, status=404, content_type="text/plain")
    return None


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Serve the Prometheus registry in text format to whom METRICS_TOKEN / METRICS_PORT allow."""
    refused = metrics_refusal(request)
    if refused is not None:
        return refused
    return HttpResponse(metrics.render(), content_type=CONTENT_TYPE_LATEST)
