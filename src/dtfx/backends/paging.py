"""Continuation tokens for instance queries: a keyset on (created_at, instance_id)."""

from __future__ import annotations

from datetime import datetime

from dtfx.core.errors import ConfigurationError


def encode_token(created_at: datetime, instance_id: str) -> str:
    """The token that resumes a query after this instance."""
    return f"{created_at.isoformat()}|{instance_id}"


def decode_token(token: str) -> tuple[datetime, str]:
    """The (created_at, instance_id) a token resumes after."""
    created, separator, instance_id = token.partition("|")
    try:
        if not separator:
            raise ValueError(token)
        return datetime.fromisoformat(created), instance_id
    except ValueError as error:
        raise ConfigurationError(f"Invalid continuation token: {token!r}") from error
