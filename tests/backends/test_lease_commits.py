"""Leases commit without waiting for the disk; everything else, every step first, waits for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import dtfx
from dtfx.backends import open_backend
from dtfx.backends.postgres import PostgresBackend
from dtfx.backends.sql.backend import SqlBackend
from dtfx.backends.sql.program import Fetch, Program
from dtfx.backends.sqlite import SqliteBackend

_FULL, _NORMAL = 2, 1  # PRAGMA synchronous


def _flush_setting(backend: SqlBackend) -> Callable[[], Program[Any]]:
    """A program that reads, inside its transaction, whether its commit will wait for the disk."""
    sql = "PRAGMA synchronous" if isinstance(backend, SqliteBackend) else "SELECT current_setting('synchronous_commit')"

    def program() -> Program[Any]:
        rows = yield Fetch(sql)
        return rows[0][0]

    return program


async def test_only_a_transaction_run_as_not_durable_skips_the_flush(sql_url: str) -> None:
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    flushed, relaxed = (_FULL, _NORMAL) if isinstance(backend, SqliteBackend) else ("on", "off")
    program = _flush_setting(backend)
    try:
        await backend.start()
        assert await backend._run(program, write=True) == flushed
        assert await backend._run(program, write=True, durable=False) == relaxed
        assert await backend._run(program, write=True) == flushed  # the setting went back
        assert await backend._run(program, write=False) == flushed
    finally:
        await backend.close()


async def test_a_sqlite_hub_opened_with_synchronous_normal_stays_so(tmp_path: Path) -> None:
    backend = SqliteBackend(f"sqlite:///{tmp_path}/hub.db?synchronous=normal")
    program = _flush_setting(backend)
    try:
        assert await backend._run(program, write=True, durable=False) == _NORMAL
        assert await backend._run(program, write=True) == _NORMAL
    finally:
        await backend.close()


def doubling_chain(steps: int) -> dtfx.App:
    """An app whose orchestrator ``chain`` doubles its input ``steps`` times, one activity a step."""
    app = dtfx.App()

    @app.activity
    def double(ctx: dtfx.ActivityContext, value: int) -> int:
        return 2 * value

    @app.orchestrator
    def chain(ctx: dtfx.OrchestrationContext, value: int) -> Any:
        for _ in range(steps):
            value = yield ctx.call_activity(double, input=value)
        return value

    return app


async def test_every_step_of_an_orchestration_is_committed_durably(
    sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = doubling_chain(3)
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    relaxed: list[str] = []
    flushed: list[str] = []

    def record(program: Any, write: bool, durable: bool) -> None:
        if write:
            (flushed if durable else relaxed).append(getattr(program, "func", program).__name__)

    if isinstance(backend, SqliteBackend):  # where every transaction goes, whichever thread runs it
        transact = backend._transact

        def spy_sqlite(program: Any, write: bool, durable: bool = True, **kwargs: Any) -> Any:
            record(program, write, durable)
            return transact(program, write, durable, **kwargs)

        monkeypatch.setattr(backend, "_transact", spy_sqlite)
    else:
        assert isinstance(backend, PostgresBackend)
        transact, run_blocking = backend._transact, backend._run_blocking

        async def spy(program: Any, write: bool, pool: Any = None, *, durable: bool = True) -> Any:
            record(program, write, durable)
            return await transact(program, write, pool, durable=durable)

        def spy_blocking(program: Any) -> Any:  # a chain's commits, on its activity thread
            record(program, True, True)
            return run_blocking(program)

        monkeypatch.setattr(backend, "_transact", spy)
        monkeypatch.setattr(backend, "_run_blocking", spy_blocking)
    try:
        async with dtfx.Worker(backend, app=app):
            client = dtfx.AsyncClient(backend)
            instance_id = await client.schedule_new_orchestration("chain", input=1)
            state = await client.wait_for_orchestration_completion(instance_id, timeout=30)
    finally:
        await backend.close()
    assert state is not None and state.get_output() == 8
    assert "complete_orchestration_work_items" in flushed
    assert set(relaxed) <= {
        "lock_orchestration_work_items",
        "lock_activity_work_items",
        "release_empty_work_items",
        "renew_orchestration_lease",
        "renew_activity_lease",
    }
    assert "lock_orchestration_work_items" in relaxed
    migrations = {"migrate", "_migration"}  # SQLite's, PostgreSQL's
    assert {
        "complete_orchestration_work_items",
        "complete_activity_work_items",
        "create_instances",
        *migrations,
    } >= set(flushed)
