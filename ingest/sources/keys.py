"""The Databento API key: checked before any connection is made."""

from __future__ import annotations

import os
import re

from marketdata.errors import MarketDataError

# Databento keys are "db-" and 29 letters or digits.
KEY_RE = re.compile(r"^db-[A-Za-z0-9]{29}$")
ERR_KEY_MISSING = "DATABENTO_API_KEY is not set: export your Databento API key (db-...) to use {source}"
ERR_KEY_MALFORMED = "DATABENTO_API_KEY is malformed: expected 'db-' and 29 letters or digits (got {length} characters)"


class ApiKeyError(MarketDataError):
    """A missing or malformed Databento API key."""

    code = "api_key"


def api_key_get(*, source: str, environ: dict[str, str] | None = None) -> str:
    """The key from DATABENTO_API_KEY, or ApiKeyError saying what is wrong (never the key itself)."""
    key = (environ if environ is not None else os.environ).get("DATABENTO_API_KEY", "").strip()
    if not key:
        raise ApiKeyError(ERR_KEY_MISSING.format(source=source))
    if not KEY_RE.match(key):
        raise ApiKeyError(ERR_KEY_MALFORMED.format(length=len(key)))
    return key
