"""What only the SQLite backend has to get right: the library it needs, closing and opening again,
and which thread runs a transaction."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import dtfx
from dtfx.backends import Backend
from dtfx.backends.sql import operations
from dtfx.backends.sql.program import Fetch, Program
from dtfx.backends.sqlite import SqliteBackend, _lengthen_log
from dtfx.core.errors import BackendUnavailableError, ConfigurationError
from dtfx.core.history import OrchestrationStatus
from dtfx.core.state import OrchestrationQuery
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


def test_backends_opening_a_new_file_at_the_same_moment_all_open_it(tmp_path: Path) -> None:
    """As processes starting together do: one's switch to WAL mode finds the file locked by another's."""
    failures: list[BaseException] = []
    for round_ in range(10):
        path = tmp_path / f"hub-{round_}.db"
        together = threading.Barrier(6)

        def open_and_query(path: Path = path, together: threading.Barrier = together) -> None:
            backend = SqliteBackend(f"sqlite:///{path}")
            together.wait()
            try:
                asyncio.run(backend.query_instances(OrchestrationQuery()))
            except BaseException as error:
                failures.append(error)
            finally:
                asyncio.run(backend.close())

        threads = [threading.Thread(target=open_and_query) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


async def test_a_watch_round_reads_the_instances_waited_for_only_once_another_connection_has_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[list[str]] = []
    versions = operations.instance_versions

    def counted(dialect: Any, instance_ids: list[str]) -> Program[dict[str, tuple[int, int]]]:
        reads.append(list(instance_ids))
        return versions(dialect, instance_ids)

    monkeypatch.setattr(operations, "instance_versions", counted)
    monkeypatch.setattr(SqliteBackend, "watch_interval", 0.01)
    path = tmp_path / "hub.db"
    backend = SqliteBackend(f"sqlite:///{path}")
    try:
        await backend.create_instance(start_event("a"))
        waiting = asyncio.create_task(
            backend.wait_for_instance(
                "a", lambda state: state.runtime_status.is_terminal, 30, may_satisfy=lambda status: status.is_terminal
            )
        )
        for _ in range(1000):  # until the first watch round, which reads
            if reads:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # about 30 more rounds, none of which reads
        assert reads == [["a"]]
        with closing(sqlite3.connect(path)) as other:  # another process ends the instance
            other.execute(
                "UPDATE instances SET status = ?, last_updated_at = last_updated_at + 1 WHERE instance_id = 'a'",
                (int(OrchestrationStatus.COMPLETED),),
            )
            other.commit()
        state = await asyncio.wait_for(waiting, 10)  # a round read it, and woke the waiter
        assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
        assert len(reads) >= 2
    finally:
        await backend.close()


def greeter() -> dtfx.App:
    app = dtfx.App()

    @app.orchestrator
    def greet(ctx: dtfx.OrchestrationContext, name: str) -> Any:
        return (yield ctx.call_activity("hello", input=name))

    @app.activity
    def hello(ctx: dtfx.ActivityContext, name: str) -> str:
        return f"Hello, {name}!"

    return app


async def greeting_from_another_process(workers: Backend, other: Backend, start_in: float | None = None) -> Any:
    """The output of a greeting that ``other`` (a backend object of its own, as another process
    has) queues, to start ``start_in`` seconds later, while a worker on ``workers`` waits for work.
    Both objects are closed afterwards."""
    try:
        async with dtfx.Worker(workers, app=greeter()):
            await asyncio.sleep(0.3)  # the dispatchers have found nothing, and wait
            start_at = None if start_in is None else datetime.now(UTC) + timedelta(seconds=start_in)
            instance_id = await dtfx.AsyncClient(other).schedule_new_orchestration(
                "greet", input="Ada", start_at=start_at
            )
            state = await dtfx.AsyncClient(workers).wait_for_orchestration_completion(instance_id, timeout=10)
        return None if state is None else state.get_output()
    finally:
        await other.close()
        await workers.close()


@pytest.mark.parametrize("start_in", [None, 0.3], ids=["now", "later"])
async def test_the_watch_wakes_idle_dispatchers_for_work_another_process_queues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_in: float | None
) -> None:
    # The dispatchers never poll here: only the watch can tell them of the other process's
    # instance, and of when its delayed start is due.
    monkeypatch.setattr(SqliteBackend, "poll_interval", 3600)
    url = f"sqlite:///{tmp_path}/hub.db"
    workers, other = SqliteBackend(url), SqliteBackend(url)  # two connections, as two processes have
    assert await greeting_from_another_process(workers, other, start_in) == "Hello, Ada!"


async def test_an_idle_worker_leaves_the_store_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transactions: list[bool] = []
    transact = SqliteBackend._transact_once

    def counted(self: SqliteBackend, program: Any, write: bool, durable: bool) -> Any:
        transactions.append(write)
        return transact(self, program, write, durable)

    monkeypatch.setattr(SqliteBackend, "_transact_once", counted)
    monkeypatch.setattr(SqliteBackend, "watch_interval", 0.01)
    backend = SqliteBackend(f"sqlite:///{tmp_path}/hub.db")
    try:
        async with dtfx.Worker(backend, app=greeter()):
            await asyncio.sleep(0.2)  # the dispatchers have looked for work once, and wait
            transactions.clear()
            await asyncio.sleep(0.4)  # about 40 watch rounds, with nothing changed (and no poll yet)
        assert transactions == []
    finally:
        await backend.close()


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


def _thread_running() -> Program[int]:
    """A program that tells which thread runs it."""
    yield Fetch("SELECT 1")
    return threading.get_ident()


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[SqliteBackend]:
    opened = SqliteBackend(f"sqlite:///{tmp_path}/hub.db")
    await opened.start()
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_brief_transaction_runs_on_the_callers_thread_while_the_database_thread_is_idle(
    backend: SqliteBackend,
) -> None:
    here = threading.get_ident()
    assert await backend._run(_thread_running, write=True) == here
    assert await backend._run(_thread_running, write=False) == here
    # One whose size has no bound (a query, a history) goes to the database thread.
    assert await backend._run(_thread_running, write=False, brief=False) != here


async def test_without_callers_transact_every_transaction_runs_on_the_database_thread(
    backend: SqliteBackend,
) -> None:
    backend.callers_transact = False
    here = threading.get_ident()
    assert await backend._run(_thread_running, write=True) != here
    assert await backend._run(_thread_running, write=False) != here
    # Requests coalesced into one transaction (creations, events) go there too.
    ran: list[int] = []
    transact = backend._transact

    def spied(*args: Any, **kwargs: Any) -> Any:
        ran.append(threading.get_ident())
        return transact(*args, **kwargs)

    backend._transact = spied  # type: ignore[method-assign]
    await backend.create_instance(start_event("i"))
    assert ran and here not in ran
    assert (await backend.get_instance("i")) is not None


async def test_a_transaction_waits_its_turn_on_the_database_thread_while_that_thread_is_busy(
    backend: SqliteBackend,
) -> None:
    gate = threading.Event()
    busy = backend._submit(gate.wait)
    running = asyncio.create_task(backend._run(_thread_running, write=True))
    await asyncio.sleep(0.05)
    assert not running.done()  # queued behind the busy thread, while this loop goes on
    gate.set()
    assert await running != threading.get_ident()
    busy.result(timeout=10)


async def test_the_loop_never_waits_for_another_process_holding_the_file(backend: SqliteBackend) -> None:
    other = sqlite3.connect(backend.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction
        running = asyncio.create_task(backend._run(_thread_running, write=True))
        await asyncio.sleep(0.1)  # the loop runs on: the database thread is the one waiting
        assert not running.done()
        other.execute("COMMIT")
        assert await running != threading.get_ident()
    finally:
        other.close()


async def test_requests_made_together_still_share_one_transaction(
    backend: SqliteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions: list[bool] = []
    transact = backend._transact

    def counted(*args: Any, **kwargs: Any) -> Any:
        transactions.append(True)
        return transact(*args, **kwargs)

    monkeypatch.setattr(backend, "_transact", counted)
    await asyncio.gather(*(backend.create_instance(start_event(f"i{n}")) for n in range(200)))
    states = await asyncio.gather(*(backend.get_instance(f"i{n}") for n in range(200)))
    assert all(state is not None and state.name == "orch" for state in states)
    assert len(transactions) == 2  # one for the creations, one for the reads


def test_loops_on_many_threads_share_one_backend(tmp_path: Path) -> None:
    backend = SqliteBackend(f"sqlite:///{tmp_path}/hub.db")
    asyncio.run(backend.start())

    async def work(thread: int) -> None:
        for n in range(40):
            instance_id = f"t{thread}-{n}"
            await backend.create_instance(start_event(instance_id))
            state = await backend.get_instance(instance_id)
            assert state is not None and state.instance_id == instance_id

    try:
        with ThreadPoolExecutor(max_workers=4) as threads:
            for done in [threads.submit(asyncio.run, work(thread)) for thread in range(4)]:
                done.result(timeout=60)
        page = asyncio.run(backend.query_instances(OrchestrationQuery(max_instance_count=1000)))
        assert len(page.items) == 160
    finally:
        asyncio.run(backend.close())


def _log_length(path: Path) -> int:
    log = Path(f"{path}-wal")
    return log.stat().st_size if log.exists() else 0


async def test_the_write_ahead_log_starts_as_long_as_it_grows_between_checkpoints_with_nothing_committed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hub.db"
    backend = SqliteBackend(f"sqlite:///{path}")
    try:
        await backend.start()
        assert _log_length(path) >= 1000 * (4096 + 24)  # SQLite's default: a checkpoint every 1000 pages
        await backend.create_instance(start_event("a"))
    finally:
        await backend.close()
    connection = sqlite3.connect(path)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "dtfx_log_filler" not in tables and "instances" in tables
        assert path.stat().st_size < 1000 * 4096  # the filler never reached the database
    finally:
        connection.close()

    relaxed = tmp_path / "relaxed.db"  # commits that do not flush gain nothing from it
    backend = SqliteBackend(f"sqlite:///{relaxed}?synchronous=normal")
    try:
        await backend.start()
        assert _log_length(relaxed) < 100 * 4096
    finally:
        await backend.close()


async def test_a_log_lengthened_then_cut_short_by_a_crash_holds_exactly_what_was_committed(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    script = f"""
import asyncio, os
from dtfx.backends.sqlite import SqliteBackend, _lengthen_log
from tests.backends.test_contract import start_event

async def main():
    backend = SqliteBackend("sqlite:///{path}")
    for number in range(20):
        await backend.create_instance(start_event(f"i{{number}}"))
    os._exit(0)  # no close, no checkpoint: the log keeps the commits and the filler after them

asyncio.run(main())
"""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=Path(__file__).parents[2])
    assert await process.wait() == 0
    assert _log_length(path) >= 1000 * (4096 + 24)
    backend = SqliteBackend(f"sqlite:///{path}")
    try:
        page = await backend.query_instances(OrchestrationQuery(max_instance_count=100))
        assert sorted(state.instance_id for state in page.items) == sorted(f"i{number}" for number in range(20))
    finally:
        await backend.close()
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        connection.close()


def test_the_log_of_a_file_another_process_is_writing_is_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    holder = sqlite3.connect(path, isolation_level=None)
    opener = sqlite3.connect(path, isolation_level=None, timeout=0.01)
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("CREATE TABLE other (x)")
        holder.execute("BEGIN IMMEDIATE")  # another process writes
        _lengthen_log(opener, Path(f"{path}-wal"))  # only an optimisation: no error, nothing done
        assert _log_length(path) < 100 * 4096
        assert opener.execute("PRAGMA cache_size").fetchone() == (-2000,)  # SQLite's default, restored
        holder.execute("ROLLBACK")
        _lengthen_log(opener, Path(f"{path}-wal"))
        assert _log_length(path) >= 1000 * (4096 + 24)
    finally:
        holder.close()
        opener.close()


async def test_work_held_back_by_a_full_disk_goes_on_once_there_is_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The file may not grow (SQLite's page limit stands for the disk). A full disk rolls
    # back what tried to write, which may go through once there is room: the worker gives
    # the work back as soon as it can, rather than when its lease (an hour here) ends.
    backend = SqliteBackend(f"sqlite:///{tmp_path}/hub.db")
    app = dtfx.App()

    @app.activity
    def bulky(ctx: dtfx.ActivityContext, n: int) -> str:
        return "x" * 3000

    @app.orchestrator
    def chain(ctx: dtfx.OrchestrationContext, length: int) -> Any:
        for n in range(length):
            yield ctx.call_activity(bulky, input=n)
        return length

    def limit_pages(pages: int | None) -> None:
        assert backend._connection is not None
        with backend._connection_lock:
            count = backend._connection.execute("PRAGMA page_count").fetchone()[0]
            backend._connection.execute(f"PRAGMA max_page_count={pages or count}")

    client = dtfx.AsyncClient(backend)
    options = dtfx.WorkerOptions(lease_duration=timedelta(hours=1))
    try:
        async with dtfx.Worker(backend, app=app, options=options):
            await backend.start()
            instance_id = await client.schedule_new_orchestration(chain, input=60)
            limit_pages(None)  # no more than it has now
            for _ in range(2000):
                if any("disk is full" in record.getMessage() for record in caplog.records):
                    break
                await asyncio.sleep(0.01)
            assert any("disk is full" in record.getMessage() for record in caplog.records)
            limit_pages(1_000_000)
            state = await client.wait_for_orchestration_completion(instance_id, timeout=30)
    finally:
        await backend.close()
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
