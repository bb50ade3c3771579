"""Stream names (``bars:<tf>:<SYMBOL>``, ``trades:<SYMBOL>``) and their Channels group names.

Channels group names must match ``^[a-zA-Z0-9-_.]+$`` and stay under 100 characters,
while tickers may hold spaces, slashes or ``!`` (``BRN FMJ0024!``, ``BRK/B``). Every
group name is built here: readable characters pass through, others are escaped as
``_xx`` hex, and a long name is cut and suffixed with a hash so it stays unique.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

from marketdata.errors import ValidationError
from marketdata.timeframes import SERVED_TIMEFRAMES

GROUP_NAME_RE = re.compile(r"^[a-zA-Z0-9\-_.]+$")
GROUP_MAX = 99
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")

ERR_INVALID_STREAM = "invalid stream {value!r}: expected bars:<tf>:<SYMBOL> or trades:<SYMBOL>"


@dataclass(frozen=True, slots=True)
class Stream:
    """A parsed stream: kind is 'bars' or 'trades'; tf is None for trades."""

    kind: str
    ticker: str
    tf: str | None = None

    @property
    def name(self) -> str:
        return f"bars:{self.tf}:{self.ticker}" if self.kind == "bars" else f"trades:{self.ticker}"


def stream_parse(value: object) -> Stream:
    """Parse a stream name, or raise ValidationError (code invalid_stream)."""
    if not isinstance(value, str) or len(value) > 120:
        raise ValidationError(ERR_INVALID_STREAM.format(value=value), field="streams")
    kind, _, rest = value.partition(":")
    if kind == "trades" and rest:
        return Stream("trades", rest)
    if kind == "bars":
        tf, _, ticker = rest.partition(":")
        if tf in SERVED_TIMEFRAMES and ticker:
            return Stream("bars", ticker, tf)
    raise ValidationError(ERR_INVALID_STREAM.format(value=value), field="streams")


def bars_stream(tf: str, ticker: str) -> str:
    """Name of the bars stream of ``ticker`` at ``tf``."""
    return f"bars:{tf}:{ticker}"


def trades_stream(ticker: str) -> str:
    """Name of the trades stream of ``ticker``."""
    return f"trades:{ticker}"


@lru_cache(maxsize=65536)
def group_name(stream: str) -> str:
    """The Channels group of a stream: valid for Channels whatever the ticker holds."""
    escaped = "".join(c if c in _SAFE else f"_{ord(c):02x}" for c in stream.replace(":", "."))
    name = f"md.{escaped}"
    if len(name) > GROUP_MAX:
        digest = hashlib.sha1(stream.encode(), usedforsecurity=False).hexdigest()[:16]
        name = f"{name[: GROUP_MAX - 17]}_{digest}"
    assert GROUP_NAME_RE.match(name), name
    return name
