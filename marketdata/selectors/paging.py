"""What every page read shares: its limits, the checks of its range, and opaque cursors."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime, timedelta

from ..errors import ERR_NAIVE_DATETIME, ValidationError
from ..timeframes import ORIGIN
from ..timeparse import TIME_MAX, TIME_MIN

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000

ERR_LIMIT = "limit must be an integer between 1 and {max}, got {value!r}"
ERR_CURSOR = "cursor is not one this service issued"
ERR_RANGE = "start must be before end"


def aware(field: str, value: datetime | None) -> datetime | None:
    """``value`` when it is None or aware; a ValidationError on ``field`` when it is naive."""
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValidationError(ERR_NAIVE_DATETIME.format(field=field, value=value), field=field)
    return value


def cursor_encode(ts: datetime) -> str:
    """Opaque cursor: the open time of the last bar served, in microseconds."""
    micros = (ts - ORIGIN) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"v1:{micros}".encode()).decode().rstrip("=")


def cursor_text(cursor: str) -> str:
    """The text inside an opaque cursor; ValueError unless it is strict unpadded base64url of UTF-8."""
    # urlsafe_b64decode skips characters outside the alphabet: "AAPL" and "AA\x01PL" would be one cursor.
    if not _CURSOR_RE.fullmatch(cursor):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not base64url of UTF-8") from None


_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]*")
_BAR_CURSOR_RE = re.compile(r"v1:(-?[0-9]{1,20})")
# The open times a cursor may carry: those of the times a client may give (marketdata.timeparse).
_MICROS_MIN = (TIME_MIN - ORIGIN) // timedelta(microseconds=1)
_MICROS_MAX = (TIME_MAX - ORIGIN) // timedelta(microseconds=1)


def cursor_ts(micros: str) -> datetime:
    value = int(micros)
    if not _MICROS_MIN <= value <= _MICROS_MAX:
        raise ValueError("out of range")
    return ORIGIN + timedelta(microseconds=value)


def cursor_decode(cursor: str) -> datetime:
    """Inverse of cursor_encode; a foreign cursor is a ValidationError on ``cursor``."""
    try:
        match = _BAR_CURSOR_RE.fullmatch(cursor_text(cursor))
        if match is None:
            raise ValueError("not a bar cursor")
        return cursor_ts(match[1])
    except ValueError:
        raise ValidationError(ERR_CURSOR, field="cursor") from None
