"""Structured JSON logs: one event per line, request and trace ids included, secrets redacted.

Credentials reach the gateway in a query (``?token=``) and in ``Authorization``; no line
may carry them. ``redact`` (``ops.redaction``) is applied to every value of every event as
it is rendered (structlog's and the standard library's alike, tracebacks included), and
the server's access log is this log (``access_log``): request lines with the query redacted.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

from . import tracing
from .redaction import REDACTED, redact

# Fields that are credentials whatever their value.
_SECRET_KEYS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "token", "password"})


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: REDACTED if str(k).lower() in _SECRET_KEYS else _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # Any other object is rendered by its repr (as JSONRenderer would): Django's request
    # loggers pass the request, whose repr holds the query.
    return redact(repr(value))


def redact_secrets(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Redact tokens from every field of the event, nested ones and the formatted traceback included."""
    return _redacted(event)


ACCESS_LOGGER = "gateway.access"
_access = structlog.get_logger(ACCESS_LOGGER)
_WS_EVENTS = {"connecting": "ws_connecting", "connected": "ws_connected", "rejected": "ws_rejected",
              "disconnected": "ws_disconnected"}  # fmt: skip


def access_log(protocol: str, action: str, details: dict[str, Any]) -> None:
    """daphne's action logger: one JSON line per HTTP response and WebSocket step, the query redacted.

    Nothing of the request's headers is logged (Authorization, cookies): the method, the
    path with its query, the status, the size, the duration and the client address.
    """
    if not _access.isEnabledFor(logging.INFO):
        return
    path = redact(str(details.get("path", "")))
    if protocol == "http" and action == "complete":
        _access.info(
            "http_request", method=details.get("method"), path=path, status=details.get("status"),
            size=details.get("size"), duration_ms=round(1000 * float(details.get("time_taken") or 0), 3),
            client=details.get("client"),
        )  # fmt: skip
    elif protocol == "websocket" and action in _WS_EVENTS:
        _access.info(_WS_EVENTS[action], path=path, client=details.get("client"))


def server_access_log_install() -> None:
    """Make daphne's access log (on by default: every request line, query included, on stdout) ``access_log``.

    daphne builds its ``AccessLogGenerator`` after it has loaded the application, which
    calls this (ops.apps), so every way of starting it (``python -m streaming.server``,
    the ``daphne`` command) writes JSON lines through this log; ``-v 0`` still turns
    it off.
    """
    try:
        from daphne import access
    except ImportError:  # another server: it keeps its own access log
        return

    def __call__(self: Any, protocol: str, action: str, details: dict[str, Any]) -> None:
        access_log(protocol, action, details)

    access.AccessLogGenerator.__call__ = __call__


def add_span_ids(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """With tracing on, the active span's trace and span ids (the bound trace_id wins)."""
    ids = tracing.current_ids()
    if ids is not None:
        event.setdefault("trace_id", ids[0])
        event.setdefault("span_id", ids[1])
    return event


SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    add_span_ids,
    structlog.stdlib.ExtraAdder(),  # stdlib `extra=` fields become keys too
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def build_logging(level: str) -> dict[str, Any]:
    """Return the LOGGING dict and configure structlog to render through it."""
    structlog.configure(
        processors=[
            *SHARED_PROCESSORS,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": structlog.stdlib.ProcessorFormatter,
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    redact_secrets,  # last: what the lines above added (a traceback) is covered too
                    structlog.processors.JSONRenderer(),
                ],
                "foreign_pre_chain": SHARED_PROCESSORS,
            },
        },
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json"}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "django.db.backends": {"level": "WARNING"},
            "daphne": {"level": "WARNING"},
            "django.channels.server": {"level": "WARNING"},
        },
    }
