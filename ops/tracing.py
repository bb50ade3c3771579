"""OpenTelemetry traces, exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set.

``setup`` runs once per process, early (config/asgi.py, manage.py), before Django loads
its middleware. Without the variable it imports nothing of OpenTelemetry and ``span`` is
a shared no-op context manager: tracing then costs one function call per batch.

With it: a TracerProvider with a batching OTLP/HTTP exporter (the SDK reads the standard
``OTEL_*`` variables: endpoint, headers, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``), and the Django, psycopg and Redis
instrumentations. Django's span continues an incoming W3C ``traceparent``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ParamSpec, TypeVar

from .redaction import redact

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

P = ParamSpec("P")
R = TypeVar("R")

_enabled: bool | None = None
_tracer: Any = None
_NOOP: AbstractContextManager[None] = nullcontext()


def configured() -> bool:
    """True when the environment asks for traces to be exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(os.environ.get(name) for name in ENDPOINT_VARS)


def setup(service_name: str = "marketdata") -> bool:
    """Set tracing up if the environment asks for it (idempotent); True when spans are exported.

    ``service_name`` applies when OTEL_SERVICE_NAME is not set.
    """
    global _enabled, _tracer
    if _enabled is not None:
        return _enabled
    if not configured():
        _enabled = False
        return False

    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))  # shuts down (flushes) at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    # Adds its middleware first in settings.MIDDLEWARE; the hook redacts the URL attributes.
    DjangoInstrumentor().instrument(request_hook=redact_span_urls)
    PsycopgInstrumentor().instrument()
    RedisInstrumentor().instrument()
    _tracer = trace.get_tracer("marketdata")
    _enabled = True
    return True


# Attributes of the Django server span that hold the query (old and new HTTP conventions).
URL_ATTRIBUTES = ("http.url", "http.target", "url.full", "url.query")


def redact_span_urls(span: Any, request: Any) -> None:
    """Rewrite the span's URL attributes with their tokens redacted (``?token=``, as in the logs)."""
    attributes = getattr(span, "attributes", None) or {}
    for key in URL_ATTRIBUTES:
        value = attributes.get(key)
        if isinstance(value, str) and redact(value) != value:
            span.set_attribute(key, redact(value))


def enabled() -> bool:
    """True once setup has turned tracing on."""
    return bool(_enabled)


def span(name: str, attributes: dict[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A span around a block when tracing is on; else a no-op."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=attributes)


def traced(
    name: str, attributes: Callable[..., dict[str, Any]] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function to run in a span when tracing is on; ``attributes(*args)`` names its attributes."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if _tracer is None:
                return function(*args, **kwargs)
            with _tracer.start_as_current_span(name, attributes=attributes(*args, **kwargs) if attributes else None):
                return function(*args, **kwargs)

        return wrapper

    return decorate


def current_context() -> Any:
    """The active trace context, to go on with in another thread (``continued``); None when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry import context

    return context.get_current()


def continued(parent: Any, name: str, attributes: dict[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A span ``name`` under ``parent`` (a ``current_context`` taken in another thread); else a no-op."""
    if _tracer is None or parent is None:
        return _NOOP
    return _tracer.start_as_current_span(name, context=parent, attributes=attributes)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the active span, or None (tracing off, or no span)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
