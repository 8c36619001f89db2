"""Opening the task hub a command works on."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from dtfx.backends import Backend, default_url, open_backend
from dtfx.backends.memory import MemoryBackend
from dtfx.backends.sqlite import parse_sqlite_url
from dtfx.backends.urls import redact
from dtfx.cli.root import CommandError, configure_logging
from dtfx.client import AsyncClient
from dtfx.core.errors import BackendError


@contextlib.asynccontextmanager
async def started_backend(url: str | None) -> AsyncIterator[Backend]:
    """The backend at ``url`` (default: ``DTFX_BACKEND`` or the SQLite file), started.

    A backend that cannot be opened (nothing listening, a file that cannot be
    created) raises :class:`~dtfx.BackendError` naming the URL, password hidden.
    """
    url = url or default_url()
    backend = open_backend(url)
    try:
        await backend.start()
    except Exception as error:
        with contextlib.suppress(Exception):
            await backend.close()
        raise BackendError(f"Cannot open the backend {redact(url)}: {error}") from error
    try:
        yield backend
    finally:
        await backend.close()


@contextlib.asynccontextmanager
async def connect(url: str | None, verbosity: int, *, creates: bool = False) -> AsyncIterator[AsyncClient]:
    """Set up logging, then a client on the started backend at ``url`` (see :func:`started_backend`).

    A command that does one thing and says how it went logs only errors unless
    asked with ``-v``: a driver's warnings (a connection retried) would bury that line.
    Unless it ``creates`` instances, it refuses a SQLite file that does not exist: a
    mistyped path would otherwise make an empty task hub, and look like one whose
    instances are gone.
    """
    configure_logging(verbosity, quiet=logging.ERROR)
    url = url or default_url()
    if not creates:
        _refuse_missing_file(url)
    async with started_backend(url) as backend:
        refuse_memory(backend)
        yield AsyncClient(backend)


def refuse_memory(backend: Backend) -> None:
    """Refuse a memory backend to a command that does one thing: it would not outlive it."""
    if isinstance(backend, MemoryBackend):
        raise CommandError(
            "memory:// keeps nothing past this command; use the task hub your workers use"
            " (sqlite:///path.db or postgresql://...)."
        )


def _refuse_missing_file(url: str) -> None:
    if urlsplit(url).scheme.lower() != "sqlite":
        return
    path, _ = parse_sqlite_url(url)
    if not Path(path).exists():
        raise CommandError(
            f"No task hub at {redact(url)}: {path} does not exist (a worker, `dtfx start`, `dtfx serve` or"
            " `dtfx migrate` creates it). Check --backend or DTFX_BACKEND."
        )


def shown(url: str) -> str:
    """``url`` as a command shows it: its password hidden, and a relative SQLite path with the
    file it means (another directory means another task hub)."""
    if urlsplit(url).scheme.lower() == "sqlite":
        path, _ = parse_sqlite_url(url)
        if path != ":memory:" and not Path(path).is_absolute():
            return f"{redact(url)} ({Path(path).resolve()})"
    return redact(url)
