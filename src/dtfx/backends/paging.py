"""Continuation tokens for instance queries: a keyset on (created_at, instance_id)."""

from __future__ import annotations

from datetime import datetime

from dtfx.core.errors import ConfigurationError


def encode_token(created_at: datetime, instance_id: str) -> str:
    """The token that resumes a query after this instance."""
    return f"{created_at.isoformat()}|{instance_id}"


def decode_token(token: str) -> tuple[datetime, str]:
    """The (created_at, instance_id) a token resumes after; a token :func:`encode_token` did
    not make raises :class:`~dtfx.core.errors.ConfigurationError`."""
    created, separator, instance_id = token.partition("|")
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        moment = None
    if not separator or moment is None or moment.tzinfo is None:  # encoded times say their zone
        raise ConfigurationError(f"Invalid continuation token: {token!r}")
    return moment, instance_id
