"""Storage backends, chosen by URL: ``memory://``, ``sqlite:///path.db``, ``postgresql://...``."""

from __future__ import annotations

import os

from dtfx.backends.base import Backend, WorkKind
from dtfx.backends.memory import MemoryBackend
from dtfx.backends.urls import redact
from dtfx.core.errors import ConfigurationError

DEFAULT_URL = "sqlite:///./.dtfx/taskhub.db"
"""The backend used when none is given and ``DTFX_BACKEND`` is not set."""


def default_url() -> str:
    """``DTFX_BACKEND`` if set, else :data:`DEFAULT_URL`."""
    return os.environ.get("DTFX_BACKEND") or DEFAULT_URL


def open_backend(url: str | None = None) -> Backend:
    """A new backend for ``url`` (default: :func:`default_url`); call ``start()`` before use."""
    url = url or default_url()
    scheme = url.partition(":")[0].lower()
    if url == "memory://" or scheme == "memory":
        return MemoryBackend()
    if scheme == "sqlite":
        from dtfx.backends.sqlite import SqliteBackend

        return SqliteBackend(url)
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        try:
            from dtfx.backends.postgres import PostgresBackend
        except ImportError as error:  # its message says which extra to install
            raise ConfigurationError(str(error)) from error
        return PostgresBackend(url)
    raise ConfigurationError(
        f"Unknown backend URL {redact(url)!r}: use memory://, sqlite:///path/to/file.db or postgresql://user@host/db"
    )


__all__ = ["DEFAULT_URL", "Backend", "MemoryBackend", "WorkKind", "default_url", "open_backend"]
