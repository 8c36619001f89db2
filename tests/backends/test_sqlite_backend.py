"""What only the SQLite backend has to get right: the library it needs, closing and opening again."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from functools import partial
from pathlib import Path

import pytest

from dtfx.backends.sql import operations
from dtfx.backends.sqlite import SqliteBackend
from dtfx.core.errors import BackendUnavailableError, ConfigurationError
from tests.backends.test_contract import start_event


async def test_a_sqlite_library_too_old_for_the_task_hub_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    backend = SqliteBackend(f"sqlite:///{tmp_path}/hub.db")
    try:
        with pytest.raises(ConfigurationError, match=r"needs SQLite 3\.35\.0 or newer.*3\.34\.1"):
            await backend.start()
    finally:
        await backend.close()


async def test_a_hub_closed_can_be_opened_again_by_a_new_backend(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/hub.db"
    first = SqliteBackend(url)
    await first.create_instance(start_event("a"))
    await first.close()
    with pytest.raises(BackendUnavailableError, match="has been closed"):
        await first.get_instance("a")
    second = SqliteBackend(url)
    try:
        state = await second.get_instance("a")
        assert state is not None and state.name == "orch"
    finally:
        await second.close()


async def test_work_queued_behind_close_does_not_open_the_file_again(tmp_path: Path) -> None:
    backend = SqliteBackend(f"sqlite:///{tmp_path}/hub.db")
    await backend.start()
    gate = threading.Event()
    backend._thread.submit(gate.wait)  # the database thread is busy
    closing = asyncio.create_task(backend.close())
    await asyncio.sleep(0)  # close() has queued the closing of the connection
    # What another thread queues meanwhile (a watch round, say) runs after the connection is closed.
    late = backend._thread.submit(backend._transact, partial(operations.get_history, "a"), False)
    gate.set()
    await closing
    with pytest.raises(BackendUnavailableError, match="has been closed"):
        late.result(timeout=10)
    assert backend._connection is None
