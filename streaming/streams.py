"""Stream names (``bars:<tf>:<SYMBOL>``, ``trades:<SYMBOL>``) and their Channels group names.

Channels group names must match ``^[a-zA-Z0-9-_.]+$`` and stay under 100 characters,
while tickers may hold spaces, slashes, dots or ``!`` (``BRN FMJ0024!``, ``BRK/B``,
``BRK.B``). Every group name is built here, one to one with stream names: ``md.`` + the
stream with each ``:`` as ``.``, letters, digits and ``-`` as they are, and every other
character (``.`` and ``_`` too) escaped as ``_xx``, ``_uxxxx`` or ``_Uxxxxxx`` (its code
point in lowercase hex; what follows ``_`` tells the length, so the escapes read back one
way only). A name past GROUP_MAX keeps its first characters and ends with ``__`` and a
128-bit digest of the whole stream name: escaping never makes ``__`` (an escape's ``_`` is
followed by a hex digit, ``u`` or ``U``), so a cut name never equals a whole one.
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
GROUP_PREFIX = "md."
_PASS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_DIGEST_MARK = "__"
_DIGEST_BYTES = 16

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


def _escape(code: int) -> str:
    if code < 0x100:
        return f"_{code:02x}"
    if code < 0x10000:
        return f"_u{code:04x}"
    return f"_U{code:06x}"


class _Escapes(dict[int, str]):
    """str.translate's table: ASCII looked up, anything else escaped as it comes (not kept)."""

    def __missing__(self, code: int) -> str:
        return _escape(code)


_ESCAPES = _Escapes({code: chr(code) if chr(code) in _PASS else _escape(code) for code in range(0x80)})
_ESCAPES[ord(":")] = "."


@lru_cache(maxsize=65536)
def group_name(stream: str) -> str:
    """The Channels group of a stream: valid for Channels, and one to one with stream names."""
    name = GROUP_PREFIX + stream.translate(_ESCAPES)
    if len(name) > GROUP_MAX:
        # Lone surrogates (a JSON "\ud800") are code points too: encoded, not refused.
        whole = hashlib.blake2b(stream.encode("utf-8", "surrogatepass"), digest_size=_DIGEST_BYTES)
        name = name[: GROUP_MAX - len(_DIGEST_MARK) - 2 * _DIGEST_BYTES] + _DIGEST_MARK + whole.hexdigest()
    assert GROUP_NAME_RE.fullmatch(name), name
    return name
