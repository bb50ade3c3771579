"""Tokens taken out of text: what the logs and the trace spans' URLs must never carry."""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"
# A query parameter whose name ends in "token" (token, access_token, api_token, ...).
_QUERY_TOKEN_RE = re.compile(r"(?i)((?:^|[?&;\s])[\w.-]*token=)[^&;\s\"'#]*")
# An Authorization value: the scheme is kept, the credentials go (16 characters or more,
# so that prose such as "token validation failed" is left alone).
_SCHEME_RE = re.compile(r"(?i)\b(bearer|token|basic)(\s+)[\w.~+/=-]{16,}")
# An API token anywhere (marketdata.tokens.TOKEN_PREFIX and 43 url-safe characters).
_API_TOKEN_RE = re.compile(r"\bmdg_[\w-]{20,}")


def redact(text: str) -> str:
    """``text`` with every token it carries (query parameter, Authorization credentials, API token) replaced."""
    lowered = text.lower()
    if "token" not in lowered and "bearer" not in lowered and "basic" not in lowered and "mdg_" not in text:
        return text  # the common case, a line without any: no regular expression run
    text = _QUERY_TOKEN_RE.sub(lambda m: m.group(1) + REDACTED, text)
    text = _SCHEME_RE.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    return _API_TOKEN_RE.sub(REDACTED, text)
