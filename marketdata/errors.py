"""The one domain exception base, and the messages tests assert on."""

from __future__ import annotations


class MarketDataError(Exception):
    """Base of every error this service raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ValidationError(MarketDataError):
    """Input that cannot be stored or served as given."""

    code = "invalid"


class UnknownSymbolError(MarketDataError):
    """A ticker the service does not know."""

    code = "unknown_symbol"


ERR_NAIVE_DATETIME = "{field} must be timezone-aware (UTC), got naive datetime {value!r}"
ERR_UNDEFINED_PRICE = "{field} is Databento's undefined price (2^63-1) in {value!r}"
ERR_OUT_OF_RANGE = "{field}={value!r} is out of range for a signed 64-bit integer"
ERR_OUT_OF_COLUMN = "{field}={value!r} is out of range for its column, a signed {bits}-bit integer"
ERR_BAD_TIMEFRAME_STORED = "timeframe {value!r} is not stored: expected one of 1s 1m 1h 1d"
ERR_BAD_SIDE = "side must be one of A, B, N; got {value!r}"
ERR_HIGH_LOW = "{field}: high {high} is below low {low}"
ERR_UNKNOWN_SYMBOL = "unknown symbol {value!r}"
