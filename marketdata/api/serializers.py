"""Query parameters (validated here) and response shapes (for the OpenAPI document only).

Responses are written as JSON text by marketdata.wire, never through these serializers:
prices stay exact and a 1,000-bar page costs no per-field serializer work.
"""

from __future__ import annotations

import base64
import unicodedata
from datetime import datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import RegexValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from marketdata.errors import MarketDataError
from marketdata.models import TICKER_MAX_LENGTH, dataset_validator, ticker_validator
from marketdata.selectors.leaderboard import LEADERBOARD_DEFAULT_LIMIT, LEADERBOARD_MAX_LIMIT, LEADERBOARD_METRICS
from marketdata.selectors.paging import DEFAULT_LIMIT, ERR_RANGE, MAX_LIMIT, cursor_decode, cursor_text
from marketdata.selectors.trades import trade_cursor_decode
from marketdata.timeframes import ANOMALY_NAMES, SERVED_TIMEFRAMES
from marketdata.timeparse import time_parse

LATEST_MAX_SYMBOLS = 100
ERR_TF = "unknown timeframe {input!r}: expected one of " + " ".join(SERVED_TIMEFRAMES)
ERR_LIMIT = "limit must be an integer between {min} and {max}"
ERR_CHOICE = "{input!r} is not one of {choices}"
ERR_SYMBOLS_EMPTY = "symbols names no symbol: give one or more tickers separated by commas"
ERR_SYMBOLS_MANY = "symbols names more than {max} symbols"
ERR_SYMBOL_CURSOR = "cursor is not a symbols cursor this service issued"
ERR_CONTROL = "control characters are not allowed"
ERR_TICKER = "{value!r} is not a ticker: printable ASCII, at most 70 characters, no leading or trailing space"
ERR_DATASET = "{value!r} is not a dataset: it looks like XNAS.ITCH or GLBX.MDP3"
ERR_UTF8 = "{field} is not UTF-8 text once percent-decoded"
# Unicode categories no parameter may hold: controls (NUL, ESC, newlines), format characters
# (bidi overrides, zero-width spaces), surrogates, private use and unassigned code points.
NOT_TEXT = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
TIME_HELP = (
    "RFC 3339 with an offset or Z (2024-01-02T14:30:00Z), or epoch milliseconds. A time without offset is refused."
)


def query_utf8_check(query_string: str) -> None:
    """Refuse a query string whose percent-decoded bytes are not UTF-8, naming the parameter.

    Django decodes them with replacement characters, which would turn ``%FF`` into a
    legitimate-looking U+FFFD; ``query_string`` is the raw one, as WSGI gives it (latin-1).
    """
    if query_string.isascii() and "%" not in query_string:
        return
    for pair in query_string.split("&"):
        name, _, value = pair.partition("=")
        try:
            key = _percent_decoded(name)
        except (UnicodeError, ValueError):
            raise serializers.ValidationError(ERR_UTF8.format(field="a parameter name")) from None
        try:
            _percent_decoded(value)
        except (UnicodeError, ValueError):
            raise serializers.ValidationError({key: ERR_UTF8.format(field=key)}) from None


def _percent_decoded(text: str) -> str:
    return unquote_to_bytes(text.replace("+", " ").encode("latin-1")).decode("utf-8")


def _is_text(value: str) -> bool:
    return all(char == " " or unicodedata.category(char) not in NOT_TEXT for char in value)


class TextParam(serializers.CharField):
    """A text parameter: control and other invisible characters are refused, not trimmed or sent to the database."""

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, str) and not _is_text(data):
            raise serializers.ValidationError(ERR_CONTROL)
        return str(super().to_internal_value(data))


def _shaped(validator: RegexValidator, value: str) -> bool:
    try:
        validator(value)
    except DjangoValidationError:
        return False
    return True


def is_ticker(value: str) -> bool:
    """Whether ``value`` has a ticker's shape (marketdata.models): no such text can name a symbol otherwise."""
    return len(value) <= TICKER_MAX_LENGTH and _shaped(ticker_validator, value)


def ticker_check(value: str) -> None:
    """A ValidationError naming ``value`` unless it has a ticker's shape."""
    if not is_ticker(value):
        raise serializers.ValidationError(ERR_TICKER.format(value=value[: TICKER_MAX_LENGTH + 1]))


@extend_schema_field({"type": "string", "example": "2024-01-02T14:30:00Z"})
class TimeParamField(serializers.Field):
    """A time as RFC 3339 with an offset, or epoch milliseconds; a naive time is an error naming the field."""

    def to_internal_value(self, data: Any) -> datetime:
        try:
            return time_parse(str(data), field=self.field_name or "time")
        except MarketDataError as exc:
            raise serializers.ValidationError(exc.message) from None

    def to_representation(self, value: datetime) -> str:
        return value.isoformat()


def limit_field(default: int, maximum: int) -> serializers.IntegerField:
    message = ERR_LIMIT.format(min=1, max=maximum)
    return serializers.IntegerField(
        required=False,
        default=default,
        min_value=1,
        max_value=maximum,
        help_text=f"Results per page, 1..{maximum} (default {default}).",
        error_messages={"invalid": message, "min_value": message, "max_value": message, "max_string_length": message},
    )


def tf_field(default: str, help_text: str) -> serializers.ChoiceField:
    return serializers.ChoiceField(
        choices=SERVED_TIMEFRAMES,
        required=False,
        default=default,
        help_text=help_text,
        error_messages={"invalid_choice": ERR_TF},
    )


def choice_field(choices: tuple[str, ...], default: str, help_text: str) -> serializers.ChoiceField:
    return serializers.ChoiceField(
        choices=choices,
        required=False,
        default=default,
        help_text=help_text,
        error_messages={"invalid_choice": ERR_CHOICE.replace("{choices}", " ".join(choices))},
    )


def _check_range(attrs: dict[str, Any]) -> dict[str, Any]:
    start, end = attrs.get("start"), attrs.get("end")
    if attrs.get("cursor") is None and start is not None and end is not None and start >= end:
        raise serializers.ValidationError({"start": ERR_RANGE})
    return attrs


class OhlcvQuery(serializers.Serializer):
    """GET /v1/ohlcv."""

    symbol = TextParam(max_length=TICKER_MAX_LENGTH, validators=[ticker_check], help_text="Ticker, e.g. AAPL.")
    tf = tf_field("1m", "Timeframe; 5m 15m 30m 4h (and any not stored) are resampled from the finest stored base.")
    start = TimeParamField(required=False, help_text="Inclusive (bar open time). " + TIME_HELP)
    end = TimeParamField(required=False, help_text="Exclusive (bar open time). " + TIME_HELP)
    limit = limit_field(DEFAULT_LIMIT, MAX_LIMIT)
    cursor = TextParam(
        required=False, max_length=200, help_text="Opaque; take it from `next`, which carries the other parameters."
    )
    anomalies = choice_field(
        ("include", "exclude"), "include", "Flagged bars are included (and flagged) or dropped before aggregation."
    )

    def validate_cursor(self, value: str) -> str:
        try:
            cursor_decode(value)
        except MarketDataError as exc:
            raise serializers.ValidationError(exc.message) from None
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return _check_range(attrs)


class TradesQuery(serializers.Serializer):
    """GET /v1/trades."""

    symbol = TextParam(max_length=TICKER_MAX_LENGTH, validators=[ticker_check], help_text="Ticker, e.g. AAPL.")
    start = TimeParamField(required=False, help_text="Inclusive (ts_event). " + TIME_HELP)
    end = TimeParamField(required=False, help_text="Exclusive (ts_event). " + TIME_HELP)
    limit = limit_field(DEFAULT_LIMIT, MAX_LIMIT)
    cursor = TextParam(
        required=False, max_length=200, help_text="Opaque; take it from `next`, which carries the other parameters."
    )

    def validate_cursor(self, value: str) -> str:
        try:
            trade_cursor_decode(value)
        except MarketDataError as exc:
            raise serializers.ValidationError(exc.message) from None
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return _check_range(attrs)


class LatestQuery(serializers.Serializer):
    """GET /v1/latest."""

    symbols = TextParam(
        max_length=LATEST_MAX_SYMBOLS * 71, help_text=f"Tickers separated by commas, at most {LATEST_MAX_SYMBOLS}."
    )
    tf = tf_field("1m", "Timeframe of the bars.")

    def validate_symbols(self, value: str) -> list[str]:
        tickers = list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
        if not tickers:
            raise serializers.ValidationError(ERR_SYMBOLS_EMPTY)
        if len(tickers) > LATEST_MAX_SYMBOLS:
            raise serializers.ValidationError(ERR_SYMBOLS_MANY.format(max=LATEST_MAX_SYMBOLS))
        for ticker in tickers:
            ticker_check(ticker)
        return tickers


class LeaderboardQuery(serializers.Serializer):
    """GET /v1/leaderboard."""

    metric = choice_field(
        LEADERBOARD_METRICS, "volume", "Rank by the latest bar's volume, or by its change from the previous close."
    )
    tf = tf_field("1d", "Timeframe of the bars compared.")
    limit = limit_field(LEADERBOARD_DEFAULT_LIMIT, LEADERBOARD_MAX_LIMIT)


def symbol_cursor_encode(ticker: str) -> str:
    """Opaque cursor of the symbol list: the last ticker served."""
    return base64.urlsafe_b64encode(f"s1:{ticker}".encode()).decode().rstrip("=")


def symbol_cursor_decode(cursor: str) -> str:
    """The ticker a symbols cursor carries; anything else (a NUL, which PostgreSQL refuses, too) is an error."""
    try:
        raw = cursor_text(cursor)
    except ValueError:
        raise serializers.ValidationError(ERR_SYMBOL_CURSOR) from None
    ticker = raw[3:]
    if not raw.startswith("s1:") or not is_ticker(ticker):
        raise serializers.ValidationError(ERR_SYMBOL_CURSOR)
    return ticker


class SymbolsQuery(serializers.Serializer):
    """GET /v1/symbols."""

    dataset = TextParam(required=False, max_length=32, help_text="Only this dataset, e.g. XNAS.ITCH.")
    active = serializers.BooleanField(required=False, help_text="Only active (true) or inactive (false) symbols.")
    search = TextParam(
        required=False, max_length=100, help_text="Case-insensitive text in the ticker or the description."
    )
    limit = limit_field(DEFAULT_LIMIT, MAX_LIMIT)
    cursor = TextParam(required=False, max_length=200, help_text="Opaque; take it from `next`.")

    def validate_dataset(self, value: str) -> str:
        if not _shaped(dataset_validator, value):
            raise serializers.ValidationError(ERR_DATASET.format(value=value))
        return value

    def validate_cursor(self, value: str) -> str:
        return symbol_cursor_decode(value)


# RESPONSES (documentation)


@extend_schema_field({"type": "number", "description": "Exact decimal, printed from the stored fixed-point value."})
class PriceField(serializers.Field):
    """A price: a JSON number in its shortest exact decimal form."""


class BarSerializer(serializers.Serializer):
    """The BAR object (SPEC section 5)."""

    ts = serializers.DateTimeField(help_text="The bar's open, UTC.")
    open = PriceField()
    high = PriceField()
    low = PriceField()
    close = PriceField()
    volume = serializers.IntegerField()
    final = serializers.BooleanField(help_text="False while the bar is still forming.")
    anomalies = serializers.ListField(
        child=serializers.ChoiceField(choices=list(ANOMALY_NAMES.values())),
        required=False,
        help_text="Present only when the bar is flagged.",
    )


class OhlcvResponse(serializers.Serializer):
    symbol = serializers.CharField()
    tf = serializers.ChoiceField(choices=SERVED_TIMEFRAMES)
    results = BarSerializer(many=True)
    next = serializers.URLField(allow_null=True, help_text="The next page, or null when this is the last.")


class TradeSerializer(serializers.Serializer):
    ts = serializers.DateTimeField(help_text="ts_event, UTC (microseconds).")
    price = PriceField()
    size = serializers.IntegerField()
    side = serializers.ChoiceField(choices=["A", "B", "N"], help_text="Aggressor: A ask, B bid, N none.")


class TradesResponse(serializers.Serializer):
    symbol = serializers.CharField()
    results = TradeSerializer(many=True)
    next = serializers.URLField(allow_null=True)


class LatestResponse(serializers.Serializer):
    tf = serializers.ChoiceField(choices=SERVED_TIMEFRAMES)
    results = serializers.DictField(
        child=BarSerializer(allow_null=True), help_text="By ticker, in the order asked; null where there is no bar."
    )


class LeaderboardEntry(serializers.Serializer):
    rank = serializers.IntegerField()
    symbol = serializers.CharField()
    dataset = serializers.CharField()
    bar = BarSerializer(help_text="The symbol's latest bar of tf.")
    prev_close = PriceField(allow_null=True, help_text="Close of the bar before it; null when there is none.")
    change_pct = serializers.FloatField(allow_null=True, help_text="(close - prev_close) / prev_close * 100, 4 places.")


class LeaderboardResponse(serializers.Serializer):
    metric = serializers.ChoiceField(choices=LEADERBOARD_METRICS)
    tf = serializers.ChoiceField(choices=SERVED_TIMEFRAMES)
    results = LeaderboardEntry(many=True)


class SymbolSerializer(serializers.Serializer):
    symbol = serializers.CharField()
    dataset = serializers.CharField()
    active = serializers.BooleanField()
    description = serializers.CharField(allow_blank=True)


class SymbolsResponse(serializers.Serializer):
    results = SymbolSerializer(many=True)
    next = serializers.URLField(allow_null=True)


class ErrorBody(serializers.Serializer):
    code = serializers.CharField(
        help_text=(
            "invalid, unknown_symbol, unauthenticated, not_entitled, permission_denied, rate_limited, not_found, "
            "internal (500; the message quotes the request id), ..."
        )
    )
    message = serializers.CharField()
    field = serializers.CharField(allow_null=True, help_text="The parameter at fault, when there is one.")


class ErrorResponse(serializers.Serializer):
    error = ErrorBody()
