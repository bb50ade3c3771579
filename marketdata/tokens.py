"""API tokens: generated once, stored as SHA-256, looked up by hash."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "mdg_"  # noqa: S105 (a label, not a secret)


def token_generate() -> str:
    """A new random token (shown to its owner once)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The stored form of a token; tokens are high-entropy, so a plain SHA-256 suffices."""
    return hashlib.sha256(token.encode()).hexdigest()
