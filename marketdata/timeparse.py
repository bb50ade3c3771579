"""Times given by people and clients: RFC 3339 with an offset or Z, or epoch milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from .errors import ValidationError

ERR_TIME_NAIVE = "{field} has no UTC offset: {value!r}; add Z or an offset such as +00:00 (times are never guessed)"
ERR_TIME_FORMAT = "{field} is not a time: {value!r}; expected RFC 3339 (2024-01-02T14:30:00Z) or epoch milliseconds"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_EPOCH_MS = 253402300799999  # 9999-12-31T23:59:59.999Z


def time_parse(value: str, *, field: str) -> datetime:
    """Parse ``value`` into an aware UTC datetime or raise ValidationError naming ``field``."""
    text = value.strip()
    if text.isascii() and text.isdigit():  # str.isdigit also takes "¹" and other digits int() refuses
        millis = int(text)
        if millis > MAX_EPOCH_MS:
            raise ValidationError(ERR_TIME_FORMAT.format(field=field, value=value), field=field)
        return EPOCH + timedelta(milliseconds=millis)
    if len(text) < 11 or text[10] not in "Tt ":
        raise ValidationError(ERR_TIME_FORMAT.format(field=field, value=value), field=field)
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" else text)
    except ValueError:
        raise ValidationError(ERR_TIME_FORMAT.format(field=field, value=value), field=field) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValidationError(ERR_TIME_NAIVE.format(field=field, value=value), field=field)
    return parsed.astimezone(UTC)
