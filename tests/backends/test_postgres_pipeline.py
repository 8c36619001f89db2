"""The PostgreSQL backend's pipeline: programs' statements sent through libpq's pipeline mode,
waiting on an event loop (an async connection) or blocking a thread (a sync one)."""

from __future__ import annotations

import asyncio
import gc
import select
import socket
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from dtfx.backends.sql.program import (
    AssumptionFailed,
    Execute,
    ExecuteMany,
    Fetch,
    FetchEach,
    InsertNew,
    Program,
    Stepper,
)
from tests.polling import wait_until
from tests.postgres import SERVER_URL, require_server

psycopg = pytest.importorskip("psycopg")
postgres_pipeline = pytest.importorskip("dtfx.backends.postgres_pipeline")
Pipeline = postgres_pipeline.Pipeline


@pytest.fixture
async def table() -> AsyncIterator[str]:
    """A fresh table ``(id INTEGER PRIMARY KEY, payload TEXT)``, dropped afterwards."""
    require_server()
    name = f"pipeline_test_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(SERVER_URL, autocommit=True) as connection:
        await connection.execute(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, payload TEXT)")
    try:
        yield name
    finally:
        async with await psycopg.AsyncConnection.connect(SERVER_URL, autocommit=True) as connection:
            await connection.execute(f"DROP TABLE IF EXISTS {name}")


@dataclass(frozen=True)
class Driver:
    """How a test's pipelines run: on an async connection, waiting on the event loop; or on a
    sync one, blocking a thread, sending the statements together or, ``alone`` (as the only
    transaction under way), each as it is queued."""

    blocking: bool
    alone: bool = False

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        if not self.blocking:
            async with await psycopg.AsyncConnection.connect(SERVER_URL, autocommit=True) as opened:
                yield opened
        else:
            with psycopg.Connection.connect(SERVER_URL, autocommit=True) as opened:
                yield opened

    async def run(self, connection: Any, program: Callable[[], Program[Any]], *, transaction: bool = True) -> Any:
        pipeline = Pipeline(connection, transaction=transaction, alone=self.alone)
        if not self.blocking:
            return await pipeline.run(Stepper(program()))
        return await asyncio.to_thread(pipeline.run_blocking, Stepper(program()))


@pytest.fixture(
    params=[Driver(blocking=False), Driver(blocking=True), Driver(blocking=True, alone=True)],
    ids=["async", "blocking", "alone"],
)
def driver(request: pytest.FixtureRequest) -> Driver:
    """Each test runs with every driver."""
    driver: Driver = request.param
    return driver


async def execute(connection: Any, sql: str) -> None:
    result = connection.execute(sql)
    if isinstance(connection, psycopg.AsyncConnection):
        await result


async def rows_of(table: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(SERVER_URL, autocommit=True) as connection:
        cursor = await connection.execute(f"SELECT id, payload FROM {table} ORDER BY id")
        return await cursor.fetchall()


async def test_a_transaction_runs_its_statements_and_returns_what_it_fetched(table: str, driver: Driver) -> None:
    def program() -> Program[Any]:
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "one"))
        yield ExecuteMany(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", [(2, "two"), (3, None)])
        counted = yield Fetch(f"SELECT count(*) FROM {table} WHERE id = ANY(?)", ([1, 2, 3, 4],))
        both = yield FetchEach(
            (
                Fetch(f"UPDATE {table} SET payload = ? WHERE id = ? RETURNING payload", ("uno", 1)),
                Fetch(f"SELECT id, payload FROM {table} WHERE payload IS NULL"),
            )
        )
        return counted, both

    async with driver.connect() as connection:
        for _ in range(2):  # the second time, on the statements prepared the first time
            counted, both = await driver.run(connection, program)
            assert counted == [(3,)]
            assert both == [[("uno",)], [(3, None)]]
            assert await rows_of(table) == [(1, "uno"), (2, "two"), (3, None)]
            await execute(connection, f"DELETE FROM {table}")


async def test_reads_run_outside_a_transaction(table: str, driver: Driver) -> None:
    def program() -> Program[Any]:
        first = yield Fetch("SELECT ?::int + 1", (41,))
        second = yield Fetch(f"SELECT count(*) FROM {table}")
        return first, second

    async with driver.connect() as connection:
        assert await driver.run(connection, program, transaction=False) == ([(42,)], [(0,)])
        assert connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


async def test_a_refused_statement_rolls_the_transaction_back_and_the_connection_stays_usable(
    table: str, driver: Driver
) -> None:
    def failing() -> Program[None]:
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "kept?"))
        yield Execute("SELECT 1 / ?", (0,))
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (2, "skipped"))

    def fetching_after_a_failure() -> Program[None]:
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "kept?"))
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "duplicate"))
        yield Fetch(f"SELECT count(*) FROM {table}")
        raise AssertionError("the fetch must raise")

    def unsendable() -> Program[None]:
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (2, "kept?"))
        yield Fetch(f"SELECT count(*) FROM {table}")  # the insert has reached the server
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (3, "NUL \x00 cannot be sent"))

    def unsendable_read() -> Program[None]:
        yield Fetch("SELECT ?::text", ("NUL \x00",))

    async with driver.connect() as connection:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await driver.run(connection, failing)
        with pytest.raises(psycopg.errors.UniqueViolation):
            await driver.run(connection, fetching_after_a_failure)
        # Parameters psycopg cannot send (a NUL in text) end the transaction as cleanly.
        with pytest.raises(psycopg.DataError, match="NUL"):
            await driver.run(connection, unsendable)
        with pytest.raises(psycopg.DataError, match="NUL"):
            await driver.run(connection, unsendable_read, transaction=False)
        assert not connection.closed
        assert connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert await rows_of(table) == []

        def working() -> Program[Any]:
            yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "kept"))
            return (yield Fetch(f"SELECT payload FROM {table}"))

        assert await driver.run(connection, working) == [("kept",)]
    assert await rows_of(table) == [(1, "kept")]


async def test_a_taken_key_of_rows_assumed_new_fails_as_an_assumption(table: str, driver: Driver) -> None:
    def insert_new(*rows: tuple[Any, ...]) -> Callable[[], Program[None]]:
        def program() -> Program[None]:
            yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (10, "first"))
            yield InsertNew(ExecuteMany(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", rows))

        return program

    async with driver.connect() as connection:
        await execute(connection, f"INSERT INTO {table} (id, payload) VALUES (1, 'there')")
        with pytest.raises(AssumptionFailed):
            await driver.run(connection, insert_new((2, "two"), (1, "taken")))
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):  # any other refusal is an error
            await driver.run(connection, insert_new(("three", "not a number")))
        assert connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert await rows_of(table) == [(1, "there")]
        await driver.run(connection, insert_new((2, "two")))
    assert await rows_of(table) == [(1, "there"), (2, "two"), (10, "first")]


async def test_anything_else_that_interrupts_a_transaction_closes_the_connection(table: str, driver: Driver) -> None:
    def broken_program() -> Program[None]:
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "sent"))
        yield Fetch(f"SELECT count(*) FROM {table}")  # the insert has reached the server
        raise RuntimeError("a bug in the program")

    async with driver.connect() as connection:
        with pytest.raises(RuntimeError):
            await driver.run(connection, broken_program)
        assert connection.closed  # the server rolls back what it was sent
    assert await rows_of(table) == []


def a_read() -> Program[Any]:
    return (yield Fetch("SELECT 1"))


async def test_a_connection_the_server_ended_while_idle_fails_as_stale_before_anything_is_sent(
    table: str, driver: Driver
) -> None:
    def insert() -> Program[None]:
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "not sent"))

    async with driver.connect() as connection:
        await driver.run(connection, a_read)
        async with await psycopg.AsyncConnection.connect(SERVER_URL, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (connection.info.backend_pid,))
        assert select.select([connection.pgconn.socket], [], [], 5)[0]  # its farewell has come, its end may not have
        with pytest.raises(postgres_pipeline.StaleConnection, match="administrator command"):
            await driver.run(connection, insert)
        assert connection.closed
    assert await rows_of(table) == []


async def test_what_a_pipeline_keeps_on_a_connection_goes_with_the_connection(driver: Driver) -> None:
    require_server()
    async with driver.connect() as connection:
        await driver.run(connection, a_read)
        gone = weakref.ref(connection)
    del connection

    def freed() -> bool:
        gc.collect()
        return gone() is None

    # The pool thread that ran a blocking pipeline lets go of it just after it hands back the result.
    wait_until(freed, timeout=2)


async def test_a_statement_whose_preparation_failed_is_prepared_again(table: str, driver: Driver) -> None:
    missing = f"{table}_later"

    def program() -> Program[Any]:
        yield Execute(f"INSERT INTO {missing} (id) VALUES (?)", (1,))
        return (yield Fetch(f"SELECT id FROM {missing}"))

    async with driver.connect() as connection:
        with pytest.raises(psycopg.errors.UndefinedTable):
            await driver.run(connection, program)
        await execute(connection, f"CREATE TABLE {missing} (id INTEGER)")
        try:
            assert await driver.run(connection, program) == [(1,)]
        finally:
            await execute(connection, f"DROP TABLE {missing}")


async def test_large_pipelines_flow_both_ways_at_once(table: str, driver: Driver) -> None:
    # Several megabytes each way: the server blocks on sending results unless they are
    # read while the statements are still being sent.
    payload = "x" * 8000

    def program() -> Program[Any]:
        yield ExecuteMany(
            f"INSERT INTO {table} (id, payload) VALUES (?, ?) RETURNING payload",
            [(index, payload) for index in range(1000)],
        )
        return (yield Fetch(f"SELECT count(*), sum(length(payload)) FROM {table}"))

    async with driver.connect() as connection:
        assert await driver.run(connection, program) == [(1000, 8_000_000)]


def test_placeholders_are_numbered() -> None:
    numbered = postgres_pipeline._numbered
    assert numbered("SELECT 1") == b"SELECT 1"
    assert (
        numbered("UPDATE t SET a = ? WHERE b = ANY(?) AND c <= ?")
        == b"UPDATE t SET a = $1 WHERE b = ANY($2) AND c <= $3"
    )


async def test_a_last_fetch_comes_back_committed(table: str, driver: Driver) -> None:
    def well_behaved() -> Program[Any]:
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "one"))
        return (yield Fetch(f"UPDATE {table} SET payload = ? RETURNING payload", ("uno",), last=True))

    def breaking_its_promise() -> Program[Any]:
        yield Fetch(f"UPDATE {table} SET payload = ? RETURNING payload", ("dos",), last=True)
        yield Execute(f"DELETE FROM {table}")

    async with driver.connect() as connection:
        assert await driver.run(connection, well_behaved) == [("uno",)]
        assert await rows_of(table) == [(1, "uno")]
        with pytest.raises(RuntimeError, match="after the last"):
            await driver.run(connection, breaking_its_promise)
    assert await rows_of(table) == [(1, "dos")]  # committed with the last fetch; the rest never ran


async def test_a_pipeline_alone_sends_each_statement_as_it_is_queued(table: str, driver: Driver) -> None:
    key = uuid.uuid4().int % 2**31  # an advisory lock, taken by the transaction's first statement

    def lock_held(wait: float) -> bool:
        """Whether another session sees the lock held, within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        with psycopg.Connection.connect(SERVER_URL, autocommit=True) as other:
            while True:
                cursor = other.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = %s", (key,)
                )
                row = cursor.fetchone()
                if (row is not None and row[0] > 0) or time.monotonic() >= deadline:
                    return row is not None and row[0] > 0
                time.sleep(0.01)

    held_while_building: list[bool] = []

    def program() -> Program[None]:
        yield Execute("SELECT pg_advisory_xact_lock(?)", (key,))
        # Queued only, the statement cannot have reached the server; streamed, it gets there.
        held_while_building.append(lock_held(10.0 if driver.alone else 0.0))
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "after the lock"))

    async with driver.connect() as connection:
        await driver.run(connection, program)
    assert held_while_building == [driver.alone]
    assert await rows_of(table) == [(1, "after the lock")]
    assert not await asyncio.to_thread(lock_held, 0.0)  # the commit released it


async def test_a_blocking_pipeline_alone_polls_for_the_servers_answer_before_it_sleeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_server()
    spins: list[bool] = []
    wait_here = postgres_pipeline._wait_here

    def recording(fileno: int, *, write: bool, spin: bool = False) -> None:
        spins.append(spin)
        wait_here(fileno, write=write, spin=spin)

    monkeypatch.setattr(postgres_pipeline, "_wait_here", recording)
    for alone in (False, True):
        driver = Driver(blocking=True, alone=alone)
        async with driver.connect() as connection:
            assert await driver.run(connection, a_read) == [(1,)]
        assert spins and set(spins) == {alone}
        spins.clear()


def test_a_wait_that_polls_sleeps_once_its_polling_time_is_over() -> None:
    reader, writer = socket.socketpair()
    with reader, writer:
        writer.send(b"x")
        postgres_pipeline._wait_here(reader.fileno(), write=False, spin=True)  # readable already
        assert reader.recv(1) == b"x"
        answer = threading.Timer(0.3, writer.send, (b"y",))
        answer.start()
        used = time.thread_time()
        postgres_pipeline._wait_here(reader.fileno(), write=False, spin=True)
        used = time.thread_time() - used
        answer.join()
        assert reader.recv(1) == b"y"
    # It polled for _SPIN (milliseconds), then slept until the answer came.
    assert postgres_pipeline._SPIN < 0.01
    assert used < 0.1


async def _query_of(backend_pid: int) -> tuple[str, str]:
    """The state and query of the server process ``backend_pid``, as ``pg_stat_activity`` shows them."""
    async with await psycopg.AsyncConnection.connect(SERVER_URL, autocommit=True) as watcher:
        cursor = await watcher.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s", (backend_pid,))
        row = await cursor.fetchone()
        assert row is not None
        return row[0], row[1]


async def _until_running(backend_pid: int, fragment: str) -> None:
    for _ in range(500):
        state, query = await _query_of(backend_pid)
        if state == "active" and fragment in query:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"The server never ran {fragment!r}")


async def _cancel_while_sleeping(driver: Driver, connection: Any, program: Callable[[], Program[Any]]) -> None:
    """Run ``program`` and cancel it once the server runs its ``pg_sleep``."""
    running = asyncio.ensure_future(driver.run(connection, program))
    await _until_running(connection.info.backend_pid, "pg_sleep")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


@pytest.mark.parametrize("alone", [False, True], ids=["together", "alone"])
async def test_a_cancelled_pipeline_stops_the_servers_statement_and_keeps_its_connection(
    table: str, alone: bool
) -> None:
    driver = Driver(blocking=False, alone=alone)

    def slow() -> Program[None]:
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "rolled back"))
        yield Fetch("SELECT pg_sleep(30)")

    def one() -> Program[Any]:
        return (yield Fetch("SELECT 1"))

    async with driver.connect() as connection:
        backend_pid = connection.info.backend_pid
        await _cancel_while_sleeping(driver, connection, slow)
        assert not connection.closed
        assert connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert (await _query_of(backend_pid))[0] == "idle"  # not sleeping on
        assert await driver.run(connection, one) == [(1,)]
    assert await rows_of(table) == []


async def test_a_cancelled_transaction_sends_nothing_more_even_when_the_server_had_finished(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def too_late(self: Any, timeout: float = 30.0) -> None:
        """The cancel reaches the server after its statement has ended: it does nothing."""

    monkeypatch.setattr(psycopg.AsyncConnection, "cancel_safe", too_late)
    driver = Driver(blocking=False, alone=True)

    def program() -> Program[None]:
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (1, "rolled back"))
        yield Fetch("SELECT pg_sleep(0.3)")
        yield Execute(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", (2, "never sent"))

    async with driver.connect() as connection:
        await _cancel_while_sleeping(driver, connection, program)
        assert not connection.closed
        assert connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert await rows_of(table) == []


async def test_a_cancelled_pipeline_that_cannot_stop_in_time_closes_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_server()
    monkeypatch.setattr(postgres_pipeline, "_STOP_GRACE", 0.0)
    driver = Driver(blocking=False)

    def slow() -> Program[None]:
        yield Fetch("SELECT pg_sleep(2)")  # the server sleeps on: it sees the close only when it answers

    async with driver.connect() as connection:
        await _cancel_while_sleeping(driver, connection, slow)
        assert connection.closed
