"""Times given by people and clients: RFC 3339 with an offset or Z, or epoch milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from .errors import ValidationError

ERR_TIME_NAIVE = "{field} has no UTC offset: {value!r}; add Z or an offset such as +00:00 (times are never guessed)"
ERR_TIME_FORMAT = "{field} is not a time: {value!r}; expected RFC 3339 (2024-01-02T14:30:00Z) or epoch milliseconds"
ERR_TIME_RANGE = "{field} is out of range: {value!r}; times run from 1970-01-01T00:00:00Z to 2262-04-11T23:47:16Z"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The instants a Databento timestamp (nanoseconds since the epoch, signed 64-bit in most
# clients) can name, to the second. Bounding what is served also leaves years of room
# on both sides for the bucket, cursor and page arithmetic (a day added, a span
# subtracted), which overflowed Python's datetime at years 1 and 9999.
TIME_MIN = EPOCH
TIME_MAX = datetime(2262, 4, 11, 23, 47, 16, tzinfo=UTC)
MAX_EPOCH_MS = (TIME_MAX - EPOCH) // timedelta(milliseconds=1)


def time_parse(value: str, *, field: str) -> datetime:
    """Parse ``value`` into an aware UTC datetime within [TIME_MIN, TIME_MAX] or raise naming ``field``."""
    text = value.strip()
    # RFC 3339 is printable ASCII; datetime.fromisoformat would skip a NUL and take the rest.
    if not (text.isascii() and text.isprintable()):
        raise ValidationError(ERR_TIME_FORMAT.format(field=field, value=value), field=field)
    if text.isdigit():
        # Longer than any instant in range: refused before int() (which refuses over 4,300 digits itself).
        millis = int(text) if len(text) <= len(str(MAX_EPOCH_MS)) else MAX_EPOCH_MS + 1
        if millis > MAX_EPOCH_MS:
            raise ValidationError(ERR_TIME_RANGE.format(field=field, value=value), field=field)
        return EPOCH + timedelta(milliseconds=millis)
    if len(text) < 11 or text[10] not in "Tt ":
        raise ValidationError(ERR_TIME_FORMAT.format(field=field, value=value), field=field)
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" else text)
    except ValueError:
        raise ValidationError(ERR_TIME_FORMAT.format(field=field, value=value), field=field) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValidationError(ERR_TIME_NAIVE.format(field=field, value=value), field=field)
    try:
        utc = parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValidationError(ERR_TIME_RANGE.format(field=field, value=value), field=field) from None
    if not TIME_MIN <= utc <= TIME_MAX:
        raise ValidationError(ERR_TIME_RANGE.format(field=field, value=value), field=field)
    return utc
