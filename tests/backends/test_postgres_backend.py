"""What only the PostgreSQL backend has to get right: row lock order, its pools' lifecycle, commits
that block a worker's thread."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

import dtfx
from dtfx.backends import postgres
from dtfx.backends.base import utc_now
from dtfx.backends.postgres import PostgresBackend
from dtfx.backends.sql.program import Fetch, Program
from dtfx.core.errors import BackendUnavailableError, CommitInDoubtError, UnstorableValueError
from dtfx.core.history import TaskCompleted, TaskScheduled
from dtfx.core.workitems import ActivityResult, ActivityTask, CommitResult, OrchestrationWorkItem
from tests.backends.test_contract import LEASE, checkpoint_for, start_event
from tests.backends.test_lease_commits import doubling_chain
from tests.backends.test_sqlite_backend import greeter, greeting_from_another_process
from tests.durability.processes import wait_until
from tests.postgres import SERVER_URL, postgres_url, require_server, terminate_connections


async def _until_waiting_for_a_lock(schema: str) -> None:
    """Return once a connection of the task hub ``schema`` waits for a row lock."""
    async with await psycopg.AsyncConnection.connect(SERVER_URL, autocommit=True) as watcher:
        for _ in range(1000):
            cursor = await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
                (f"dtfx:{schema}",),
            )
            row = await cursor.fetchone()
            if row is not None and row[0]:
                return
            await asyncio.sleep(0.01)
    pytest.fail("No connection of the task hub waited for a lock")


async def test_an_activity_completion_locks_its_instance_before_its_task() -> None:
    # A checkpoint locks its instance, then deletes the tasks it finished (an eager activity's):
    # a completion of such a task that locked the task first, then the instance, could deadlock with it.
    backend = PostgresBackend(postgres_url())
    try:
        await backend.create_instance(start_event("a"))
        [item] = await backend.lock_orchestration_work_items(1, LEASE)
        scheduled = TaskScheduled(event_id=1, timestamp=utc_now(), name="act")
        task = ActivityTask("a", item.state.execution_id, scheduled)
        assert await backend.complete_orchestration_work_items([checkpoint_for(item, activity_tasks=[task])])
        [work] = await backend.lock_activity_work_items(1, LEASE)
        result = ActivityResult(work, TaskCompleted(timestamp=utc_now(), task_scheduled_id=1))
        options = f"-c search_path={backend.schema}"
        async with await psycopg.AsyncConnection.connect(SERVER_URL, options=options) as other:
            await other.execute("SELECT 1 FROM instances WHERE instance_id = 'a' FOR UPDATE")
            completion = asyncio.create_task(backend.complete_activity_work_items([result]))
            await _until_waiting_for_a_lock(backend.schema)
            # The completion waits for the instance and holds nothing yet: the task is free.
            await other.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE NOWAIT", (work.id,))
            await other.rollback()
            assert await completion == [True]
    finally:
        await backend.close()


async def test_a_transaction_streams_its_statements_when_it_runs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    streaming: list[bool] = []

    class Spy(postgres.Pipeline):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            streaming.append(kwargs.get("alone", False))

    async def look_nowhere(self: PostgresBackend) -> None:
        pass

    monkeypatch.setattr(postgres, "Pipeline", Spy)
    # No watch round, and no look for listeners (which the listener makes once it is up): no
    # transaction of the backend's own meanwhile.
    monkeypatch.setattr(PostgresBackend, "watch_interval", 3600)
    monkeypatch.setattr(PostgresBackend, "_look_for_listeners", look_nowhere)
    backend = PostgresBackend(postgres_url())
    try:
        await backend.create_instance(start_event("a"))
        await backend.start()
        streaming.clear()
        await backend.get_instance("a")
        assert streaming == [True]  # nothing else under way
        streaming.clear()
        options = f"-c search_path={backend.schema}"
        async with await psycopg.AsyncConnection.connect(SERVER_URL, options=options) as other:
            await other.execute("SELECT 1 FROM instances WHERE instance_id = 'a' FOR UPDATE")
            waiting = asyncio.create_task(
                backend.send_event("a", TaskCompleted(timestamp=utc_now(), task_scheduled_id=1))
            )
            await _until_waiting_for_a_lock(backend.schema)
            await backend.get_instance("a")  # while the event waits for the row: together
            await other.rollback()
            await waiting
        assert streaming == [True, False]
    finally:
        await backend.close()


async def test_a_start_another_process_delays_is_announced_and_run_when_due(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's dispatchers never poll: only the other object's announcement tells them
    # when the delayed start is due (it is written for later, so it wakes no queue at once).
    monkeypatch.setattr(PostgresBackend, "poll_interval", 3600)
    monkeypatch.setattr(PostgresBackend, "watch_interval", 0.05)
    url = postgres_url()
    workers, other = PostgresBackend(url), PostgresBackend(url)
    assert await greeting_from_another_process(workers, other, start_in=0.3) == "Hello, Ada!"


async def test_a_backend_that_starts_listening_says_so_and_the_others_announce_their_commits_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nobody polls, looks for listeners after starting, or looks for work a moment after
    # starting to listen: only the worker's hello can make the other object announce.
    monkeypatch.setattr(PostgresBackend, "poll_interval", 3600)
    monkeypatch.setattr(PostgresBackend, "listeners_interval", 3600)
    monkeypatch.setattr(postgres, "_CATCH_UP_DELAY", 3600)
    url = postgres_url()
    workers, other = PostgresBackend(url), PostgresBackend(url)
    await other.start()
    assert not other._postgres_dialect.others_listening  # started alone
    assert await greeting_from_another_process(workers, other) == "Hello, Ada!"


async def test_a_backend_looks_for_other_listeners_once_it_knows_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its look at start may come after its own listener has taken its lock, before it knows
    # that connection's server process: it would count itself, and announce for nothing.
    monkeypatch.setattr(PostgresBackend, "listeners_interval", 3600)
    backend = PostgresBackend(postgres_url())
    looked_knowing_itself = asyncio.Event()
    look = backend._look_for_listeners

    async def noted_look() -> None:
        await look()
        if backend._listener_pid:
            looked_knowing_itself.set()

    monkeypatch.setattr(backend, "_look_for_listeners", noted_look)
    try:
        await backend.start()
        await asyncio.wait_for(looked_knowing_itself.wait(), 10)
        assert not backend._postgres_dialect.others_listening
    finally:
        await backend.close()


async def test_a_hello_heard_while_looking_for_listeners_outweighs_the_look(monkeypatch: pytest.MonkeyPatch) -> None:
    # The look may have read the locks before the new listener took its own, then said hello.
    backend = PostgresBackend(postgres_url())
    hello = postgres._Announcement("someone else", "", [], hello=True)

    async def nobody_but_a_hello_meanwhile(program: Any, write: bool) -> int:
        backend._announced(hello.payload())
        return 0

    monkeypatch.setattr(backend, "_transact", nobody_but_a_hello_meanwhile)
    await backend._look_for_listeners()
    assert backend._postgres_dialect.others_listening


async def test_commits_stop_announcing_themselves_once_the_last_other_listener_has_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(PostgresBackend, "watch_interval", 0.01)
    monkeypatch.setattr(PostgresBackend, "listeners_interval", 0.05)
    url = postgres_url()
    first, second = PostgresBackend(url), PostgresBackend(url)

    async def until_others_listening(expected: bool) -> bool:
        for _ in range(500):
            if first._postgres_dialect.others_listening == expected:
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        await first.start()
        await second.start()
        assert await until_others_listening(True)
        await second.close()
        assert await until_others_listening(False)
    finally:
        await first.close()
        await second.close()


async def test_announcements_carry_on_once_every_connection_was_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nobody polls or looks for listeners after starting: once their connections are cut (as
    # by a database restart), the other object's creation runs again on a new connection,
    # both objects listen again, and the creation's announcement still wakes the worker.
    monkeypatch.setattr(PostgresBackend, "poll_interval", 3600)
    monkeypatch.setattr(PostgresBackend, "listeners_interval", 3600)
    url = postgres_url()
    workers, other = PostgresBackend(url), PostgresBackend(url)
    try:
        async with dtfx.Worker(workers, app=greeter()):
            await other.start()
            assert await asyncio.to_thread(terminate_connections, workers.schema) >= 4  # two listeners, two pools
            await asyncio.sleep(2)  # both listen again, and the worker has looked for what it missed
            instance_id = await dtfx.AsyncClient(other).schedule_new_orchestration("greet", input="Ada")
            state = await dtfx.AsyncClient(workers).wait_for_orchestration_completion(instance_id, timeout=10)
        assert state is not None and state.get_output() == "Hello, Ada!"
    finally:
        await other.close()
        await workers.close()


async def test_a_new_listener_looks_for_work_that_was_not_announced_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PostgresBackend, "poll_interval", 3600)
    url = postgres_url()
    workers, other = PostgresBackend(url), PostgresBackend(url)

    async def never_sees_the_worker_listen() -> None:
        other._postgres_dialect.others_listening = False

    async def does_not_listen() -> None:  # so hears no hello, as while its connection is down
        pass

    monkeypatch.setattr(other, "_look_for_listeners", never_sees_the_worker_listen)
    monkeypatch.setattr(other, "_listen", does_not_listen)
    # Announced to nobody: the worker finds it when it looks, a moment after it started listening.
    assert await greeting_from_another_process(workers, other) == "Hello, Ada!"


@pytest.mark.parametrize("given", [None, "-c idle_in_transaction_session_timeout=0"])
def test_the_server_ends_a_session_left_in_an_open_transaction(
    monkeypatch: pytest.MonkeyPatch, given: str | None
) -> None:
    """Its client vanished, say: its row locks must not keep other workers out for hours.
    The URL's options may say otherwise."""
    monkeypatch.setattr(postgres, "_IDLE_IN_TRANSACTION", "300ms")
    url = postgres_url() + (f"&options={given.replace(' ', '%20')}" if given else "")
    backend = PostgresBackend(url)
    connection = psycopg.connect(backend._conninfo, **backend._connection_options())
    try:
        connection.execute("BEGIN")
        connection.execute("SELECT 1")
        time.sleep(0.6)
        if given is None:
            with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
                connection.execute("SELECT 1")
        else:
            connection.execute("COMMIT")
    finally:
        connection.close()


async def test_a_value_too_large_for_an_index_row_is_refused_at_once() -> None:
    """Not taken for the server being away and tried again for the pool's timeout: an id of
    1,000 characters is short enough, but of four bytes each, too long for an index row."""
    backend = PostgresBackend(postgres_url())
    long_id = "".join(chr(0x1F300 + n % 700) for n in range(1000))
    try:
        with pytest.raises(UnstorableValueError, match="index row"):
            await asyncio.wait_for(backend.create_instance(start_event(long_id)), 5)
        await backend.create_instance(start_event("after"))  # and the hub goes on
    finally:
        await backend.close()


async def test_a_start_whose_check_of_the_hub_is_in_doubt_checks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating or migrating the hub, or finding it ready, changes nothing the second time."""
    backend = PostgresBackend(postgres_url())
    transact = backend._transact
    doubted: list[object] = []

    async def in_doubt_once(program: Any, *args: Any, **options: Any) -> Any:
        result = await transact(program, *args, **options)
        if program == backend._migration and not doubted:
            doubted.append(program)
            raise CommitInDoubtError("the connection dropped after the commit had gone out")
        return result

    monkeypatch.setattr(backend, "_transact", in_doubt_once)
    try:
        await backend.start()
        assert doubted
        await backend.create_instance(start_event("a"))
        assert await backend.get_instance("a") is not None
    finally:
        await backend.close()


@pytest.mark.parametrize("unknown_database", [False, True], ids=["refused", "unknown database"])
async def test_a_server_that_cannot_be_reached_is_reported_with_its_reason(unknown_database: bool) -> None:
    if unknown_database:
        require_server()
        url, reason = urlunsplit(urlsplit(SERVER_URL)._replace(path="/dtfx_no_such_database")), "does not exist"
    else:
        url, reason = "postgresql://postgres@127.0.0.1:1/postgres", "Connection refused"
    backend = PostgresBackend(url + ("&" if "?" in url else "?") + "pool_timeout=0.5")  # how long a start keeps trying
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailableError, match=f"Cannot connect to PostgreSQL: .*{reason}"):
            await backend.start()
    finally:
        await backend.close()
    assert time.monotonic() - started < 5  # the URL's pool_timeout, not a fixed 10 s


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"path": "/dtfx_no_such_database"}, "does not exist"), ({"user": "dtfx_no_such_role"}, "does not exist")],
    ids=["unknown database", "unknown role"],
)
async def test_a_refusal_that_waiting_cannot_end_ends_the_start_without_waiting(
    change: dict[str, str], reason: str
) -> None:
    """Not after pool_timeout (here 600 s), which is for a server that is starting, say."""
    require_server()
    parts = urlsplit(SERVER_URL)
    if "user" in change:
        parts = parts._replace(netloc=f"{change['user']}@{parts.hostname}:{parts.port or 5432}")
    else:
        parts = parts._replace(**change)
    url = urlunsplit(parts)
    backend = PostgresBackend(url + ("&" if "?" in url else "?") + "pool_timeout=600")
    try:
        with pytest.raises(BackendUnavailableError, match=f"Cannot connect to PostgreSQL: .*{reason}"):
            await asyncio.wait_for(backend.start(), timeout=60)
    finally:
        await backend.close()


def tcp_settings(fileno: int) -> tuple[int, int, int, int, int]:
    """A connection's socket's keepalive (on, idle, interval, count) and user timeout (ms)."""
    with socket.socket(fileno=os.dup(fileno)) as connected:
        if connected.family == socket.AF_UNIX:
            pytest.skip("the test server is reached through a Unix socket, where TCP settings do not apply")
        return (
            connected.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            connected.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            connected.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            connected.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            connected.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )


async def test_every_connection_gives_up_on_a_silent_server_within_about_a_minute() -> None:
    backend = PostgresBackend(postgres_url())
    try:
        await backend.start()
        assert backend._home_pool is not None
        async with backend._home_pool.connection() as connection:
            on_the_loop = tcp_settings(connection.pgconn.socket)
        with backend._open_blocking_pool().connection() as blocking:
            on_a_thread = tcp_settings(blocking.pgconn.socket)
    finally:
        await backend.close()
    assert on_the_loop == on_a_thread == (1, 30, 10, 3, 60_000)


def _scans(plan: dict[str, Any]) -> list[str]:
    """The node types of a plan (EXPLAIN's JSON), depth first."""
    return [plan["Node Type"], *(node for child in plan.get("Plans", ()) for node in _scans(child))]


async def test_statements_prepared_on_an_empty_hub_read_rows_through_their_indexes_once_it_has_grown() -> None:
    # A connection plans each statement once, when it first runs (generic plans). The planner
    # would read a near-empty table whole, and that plan stayed while the table grew: every
    # read of an instance by id became a scan of them all until the table was next analysed.
    backend = PostgresBackend(postgres_url())
    try:
        await backend.start()
        assert backend._home_pool is not None
        async with backend._home_pool.connection() as connection:
            await connection.execute("ALTER TABLE instances SET (autovacuum_enabled = false)")  # no replanning
            await connection.execute("PREPARE by_id(text[]) AS SELECT name FROM instances WHERE instance_id = ANY($1)")
            await connection.execute("EXECUTE by_id(ARRAY['none'])")  # planned here, on an empty table
            await connection.execute(
                "INSERT INTO instances (instance_id, name, status, created_at, last_updated_at, is_entity)"
                " SELECT 'i' || n, 'grown', 0, n, n, 0 FROM generate_series(1, 20000) AS n"
            )
            cursor = await connection.execute("EXPLAIN (FORMAT JSON) EXECUTE by_id(ARRAY['i7'])")
            row = await cursor.fetchone()
            assert row is not None
            [explained] = row[0]
            cursor = await connection.execute("EXECUTE by_id(ARRAY['i7'])")
            assert await cursor.fetchall() == [("grown",)]
    finally:
        await backend.close()
    scans = _scans(explained["Plan"])
    assert "Seq Scan" not in scans, scans


async def test_a_closed_pool_is_reported_at_once_as_the_backend_being_closed(caplog: pytest.LogCaptureFixture) -> None:
    backend = PostgresBackend(postgres_url())
    try:
        await backend.start()
        pool = backend._home_pool
        assert pool is not None
        await pool.close()  # as close() does under a call that is under way
        caplog.set_level(logging.WARNING)
        with pytest.raises(BackendUnavailableError, match="has been closed"):
            await backend.get_history("a")
    finally:
        await backend.close()
    assert [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()] == []


class FakeClock:
    """``time.monotonic`` for :class:`postgres._Retries`, moved on by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(postgres.time, "monotonic", lambda: self.now)


def test_a_transaction_the_server_cannot_carry_out_is_tried_again_until_its_pool_timeout_is_spent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock(monkeypatch)
    retries = postgres._Retries(timeout=15.0)
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert retries.connection_wait() == 15.0  # the first attempt may wait for a connection that long
    pauses = []
    with pytest.raises(BackendUnavailableError, match="PostgreSQL connection failed"):
        while True:
            clock.now += 0.5  # the attempt
            pauses.append(retries.after(lost, None))
            clock.now += pauses[-1]
            assert retries.connection_wait() == max(1000.0 + 15.0 - clock.now, postgres._LAST_WAIT)
    assert pauses == sorted(pauses) and max(pauses) == 2.0  # backing off, up to 2 s
    assert 1000.0 + 15.0 - 2.0 <= clock.now < 1000.0 + 15.0 + 0.5  # given up once a pause would end too late
    with pytest.raises(BackendUnavailableError, match="all in use \\(see pool_max_size\\)"):
        retries.after(PoolTimeout("couldn't get a connection after 0.50 sec"), None)
    assert not retries.after(psycopg.errors.SerializationFailure("conflict"), None)  # conflicts do not count time
    clock.now += 60.0
    assert retries.connection_wait() == postgres._LAST_WAIT
    retries = postgres._Retries(timeout=15.0)
    clock.now += 20.0  # a transaction that ran past its pool_timeout before its connection was lost
    assert retries.after(lost, None) > 0  # is tried once more
    with pytest.raises(BackendUnavailableError, match="PostgreSQL connection failed"):
        retries.after(lost, None)


async def test_a_call_that_gets_no_connection_from_a_full_pool_says_that_the_pool_is_too_small() -> None:
    backend = PostgresBackend(postgres_url() + "&pool_min_size=1&pool_max_size=1&pool_timeout=0.5")
    try:
        await backend.start()
        assert backend._home_pool is not None
        async with backend._home_pool.connection():  # the pool's only connection, taken
            with pytest.raises(BackendUnavailableError, match=r"though one opens now: its connections are all in use"):
                await backend.get_instance("any")
        assert await backend.get_instance("any") is None
    finally:
        await backend.close()


def test_a_pool_that_gave_no_connection_holding_fewer_than_it_may_could_not_open_more() -> None:
    # As after a restart: the pool was opening its connections again when the time was up.
    require_server()
    with ConnectionPool(SERVER_URL, min_size=1, max_size=2) as pool:
        pool.wait()
        assert "could not open connections in that time: the server was away" in postgres._why_no_connection(pool)
        with pool.connection(), pool.connection():
            assert postgres._why_no_connection(pool) == "its connections are all in use (see pool_max_size)"


def test_a_transaction_replaces_a_few_connections_closed_while_idle_at_once_then_backs_off() -> None:
    retries = postgres._Retries(timeout=postgres._POOL_TIMEOUT)
    stale = postgres.StaleConnection("server closed the connection unexpectedly")
    for _ in range(postgres._MAX_STALE_CONNECTIONS):
        assert retries.after(stale, None) == 0
        assert retries.check_pool  # the pool's other idle connections may be closed too
    assert retries.after(stale, None) > 0  # a server that closes every connection: as if unreachable
    assert not retries.after(psycopg.errors.SerializationFailure("conflict"), None)
    assert not retries.check_pool


@pytest.mark.parametrize(
    ("error", "in_doubt"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),  # libpq's: no SQLSTATE
        (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), True),
        (psycopg.errors.DiskFull('could not extend file "base/1/2": No space left on device'), False),
    ],
    ids=["connection lost", "terminated", "disk full"],
)
def test_only_a_lost_connection_leaves_a_commit_that_had_gone_out_in_doubt(
    error: psycopg.OperationalError, in_doubt: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's own refusal aborts the transaction, COMMIT and all (the pipeline skips what
    # follows an error): it is run again after a pause, like one whose connection was lost before.
    committing = SimpleNamespace(committing=True)
    clock = FakeClock(monkeypatch)
    retries = postgres._Retries(timeout=postgres._POOL_TIMEOUT)
    if in_doubt:
        with pytest.raises(CommitInDoubtError, match="may or may not have committed"):
            retries.after(error, committing)  # type: ignore[arg-type]
    else:
        assert retries.after(error, committing) > 0  # type: ignore[arg-type]
        clock.now += postgres._POOL_TIMEOUT
        with pytest.raises(BackendUnavailableError, match=r"^PostgreSQL: could not extend file") as raised:
            retries.after(error, committing)  # type: ignore[arg-type]
        assert not isinstance(raised.value, CommitInDoubtError)


def _slow_watch_rounds(monkeypatch: pytest.MonkeyPatch, seconds: float) -> tuple[threading.Event, list[str]]:
    """Watch rounds every 10 ms that each take ``seconds`` on the server: the event is set when
    one is under way; the list says which rounds ended."""
    under_way = threading.Event()
    ended: list[str] = []

    def slow_round(self: PostgresBackend) -> tuple[list[str], Any]:
        def program() -> Program[dict[str, tuple[int, int]]]:
            under_way.set()
            yield Fetch("SELECT pg_sleep(?)", (seconds,))
            ended.append("round")
            return {}

        return [], program

    monkeypatch.setattr(PostgresBackend, "watch_interval", 0.01)
    monkeypatch.setattr(PostgresBackend, "_watch_round", slow_round)
    return under_way, ended


def _discarded_connections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "discarding closed connection" in record.getMessage()]


async def test_a_cancelled_call_stops_its_statement_and_gives_its_connection_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = PostgresBackend(postgres_url())
    caplog.set_level(logging.WARNING)

    def slow() -> Program[None]:
        yield Fetch("SELECT pg_sleep(30)")

    try:
        await backend.start()
        with pytest.raises(TimeoutError):  # a caller's deadline, say
            await asyncio.wait_for(backend._run(slow, write=False, brief=False), 0.2)
        assert _discarded_connections(caplog) == []
        assert await backend.get_history("nothing") == []
    finally:
        await backend.close()


async def test_close_stops_a_watch_round_under_way_without_cutting_its_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Cut off, the round's pipeline would close its connection, and the pool warn as it discards it.
    under_way, ended = _slow_watch_rounds(monkeypatch, 20)
    caplog.set_level(logging.WARNING)
    backend = PostgresBackend(postgres_url())
    try:
        await backend.start()
        assert await asyncio.to_thread(under_way.wait, 10)
    finally:
        await asyncio.wait_for(backend.close(), 10)  # not the round's 20 s
    assert _discarded_connections(caplog) == []
    assert ended == []


async def _hub_connections(schema: str) -> int:
    """How many server connections of the task hub ``schema`` remain, once those closed have gone."""
    async with await psycopg.AsyncConnection.connect(SERVER_URL, autocommit=True) as watcher:
        for _ in range(100):  # a closed connection's server process takes a moment to leave
            cursor = await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (f"dtfx:{schema}",)
            )
            row = await cursor.fetchone()
            assert row is not None
            if row[0] == 0:
                return 0
            await asyncio.sleep(0.05)
        return int(row[0])


async def test_close_closes_the_connections_of_a_loop_that_has_ended() -> None:
    # The loop that starts the backend runs its transactions on a pool of its own, which
    # belongs to that loop: here it ends (asyncio.run in a thread) before close() runs.
    backend = PostgresBackend(postgres_url())

    async def read_on_a_loop_of_its_own() -> None:
        assert await backend.get_instance("absent") is None
        assert backend._home_pool is not None

    try:
        await asyncio.to_thread(asyncio.run, read_on_a_loop_of_its_own())
        assert await backend.get_instance("absent") is None  # through the backend's own thread
    finally:
        await backend.close()
    assert await _hub_connections(backend.schema) == 0


async def test_close_from_another_loop_does_not_wait_forever_for_a_home_loop_that_is_blocked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # This test's loop starts the backend, then blocks until a close() on another thread
    # returns: that close() cannot have this loop close its pool.
    monkeypatch.setattr(postgres, "_HOME_POOL_GRACE", 0.2)
    caplog.set_level(logging.WARNING)
    backend = PostgresBackend(postgres_url())
    await backend.start()
    pool = backend._home_pool
    assert pool is not None
    closing = threading.Thread(target=asyncio.run, args=(backend.close(),))
    closing.start()
    closing.join(10)  # blocks this loop
    assert not closing.is_alive()
    assert await _hub_connections(backend.schema) == 0
    assert any("did not close its pool" in record.getMessage() for record in caplog.records)
    await asyncio.sleep(0.1)  # the pool's own close(), left to this loop, runs now
    assert pool.closed


async def test_a_failed_start_closes_both_pools_and_the_next_start_begins_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = PostgresBackend(postgres_url())
    pools: list[AsyncConnectionPool] = []
    new_pool = backend._new_pool

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise psycopg.OperationalError("connection refused")

    def pool_of_a_start_that_fails(**options: Any) -> AsyncConnectionPool:
        pool = new_pool(**options)
        pools.append(pool)
        if len(pools) == 2:  # the pool of the loop that starts the backend, after the driver's
            monkeypatch.setattr(pool, "open", refuse)
        return pool

    monkeypatch.setattr(backend, "_new_pool", pool_of_a_start_that_fails)
    try:
        with pytest.raises(BackendUnavailableError, match="connection refused"):
            await backend.start()
        assert len(pools) == 2
        assert [pool.closed for pool in pools] == [True, True]
        monkeypatch.undo()
        await backend.start()
        assert await backend.get_instance("a") is None
    finally:
        await backend.close()


async def test_a_chain_commits_its_steps_on_its_activity_thread_through_a_pool_of_sync_connections() -> None:
    app = doubling_chain(6)
    backend = PostgresBackend(postgres_url())
    threads: list[str] = []
    run_blocking = backend._run_blocking

    def spy(program: Any) -> Any:
        threads.append(threading.current_thread().name)
        return run_blocking(program)

    backend._run_blocking = spy  # type: ignore[method-assign]
    try:
        async with dtfx.Worker(backend, app=app):
            # Its first connection, which a chain's first step would otherwise open in the
            # background, committing through the loop until it is there.
            await asyncio.to_thread(backend._open_blocking_pool().wait)
            client = dtfx.AsyncClient(backend)
            instance_id = await client.schedule_new_orchestration("chain", input=1)
            state = await client.wait_for_orchestration_completion(instance_id, timeout=30)
        pool = backend._blocking_pool
    finally:
        await backend.close()
    assert state is not None and state.get_output() == 64
    assert len(threads) >= 5 and all(name.startswith("dtfx-activity") for name in threads), threads
    assert pool is not None and pool.closed and backend._blocking_pool is None


async def _work_item_on_both_pools(backend: PostgresBackend) -> OrchestrationWorkItem:
    """An instance's work item, locked on the loop's pool and kept with a commit on the sync pool."""
    await backend.create_instance(start_event("a"))
    [item] = await backend.lock_orchestration_work_items(1, LEASE)
    commit = backend.complete_orchestration_work_items_blocking
    assert await asyncio.to_thread(commit, [checkpoint_for(item, keep_lease_for=LEASE)]) == [CommitResult.LEASE_KEPT]
    return item


async def test_connections_the_server_closed_while_idle_are_replaced_without_a_doubt_about_commits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # After a restart every pooled connection is closed: a transaction that found one so
    # had sent nothing, and runs again on a new one, rather than failing as if its commit
    # might have gone through. The pool's other idle connections are checked then, rather
    # than found closed one by one.
    backend = PostgresBackend(postgres_url() + "&pool_min_size=6")
    try:
        item = await _work_item_on_both_pools(backend)
        commit = backend.complete_orchestration_work_items_blocking
        blocking, home = backend._blocking_pool, backend._home_pool
        assert blocking is not None and home is not None
        # Six idle in each pool, held until each one's socket has the server's farewell.
        held = [blocking.getconn() for _ in range(6)]
        held_by_loop = [await home.getconn() for _ in range(6)]
        caplog.set_level(logging.DEBUG, logger=postgres.logger.name)
        assert await asyncio.to_thread(terminate_connections, backend.schema) >= 12
        for connection in held + held_by_loop:
            assert select.select([connection.pgconn.socket], [], [], 5)[0], "no farewell"
        for connection in held:
            blocking.putconn(connection)
        for connection in held_by_loop:
            await home.putconn(connection)
        await backend.create_instance(start_event("b"))  # on the loop's pool
        assert await asyncio.to_thread(commit, [checkpoint_for(item)]) == [CommitResult.COMMITTED]  # on the sync pool
        # At once, on another connection: nothing had failed but an idle connection. (The
        # background thread's pool, whose connections no one waited for here, is left out.)
        driver = f"dtfx-postgres-{backend.schema}"
        messages = [record.getMessage() for record in caplog.records if record.threadName != driver]
        assert sum("Replacing a pooled connection that the server closed" in message for message in messages) >= 2
        assert not any("retrying" in message for message in messages), messages
        assert await backend.get_instance("b") is not None
    finally:
        await backend.close()


async def test_a_server_that_ends_idle_sessions_costs_new_connections_and_no_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server's idle_session_timeout (from the URL's libpq options, here) closes pooled
    # connections between transactions: they are replaced without a back-off; the listening
    # connection, whose session idles by design, is kept.
    backend = PostgresBackend(postgres_url() + "&options=-c%20idle_session_timeout%3D200")
    try:
        item = await _work_item_on_both_pools(backend)
        commit = backend.complete_orchestration_work_items_blocking
        listener = backend._listener_pid
        caplog.set_level(logging.DEBUG, logger=postgres.logger.name)
        await asyncio.sleep(0.6)
        await backend.create_instance(start_event("b"))
        assert await asyncio.to_thread(commit, [checkpoint_for(item)]) == [CommitResult.COMMITTED]
        messages = [record.getMessage() for record in caplog.records]
        assert any("Replacing a pooled connection that the server closed" in message for message in messages)
        warnings = [
            record for record in caplog.records if record.name.startswith("dtfx") and record.levelno >= logging.WARNING
        ]
        assert not warnings, messages  # (psycopg_pool says that it discarded them)
        assert backend._listener_pid == listener
        assert await backend.get_instance("b") is not None
    finally:
        await backend.close()


async def test_a_url_passes_libpq_options_with_spaces_to_every_session(monkeypatch: pytest.MonkeyPatch) -> None:
    def program() -> Program[list[str]]:
        rows = yield Fetch(
            "SELECT current_setting('statement_timeout'), current_setting('work_mem'), current_schema()", ()
        )
        return list(rows[0])

    url = postgres_url()
    schema = url.rpartition("schema=")[2]
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=4321 -c work_mem=5MB")  # when the URL gives none
    given = "&options=-c%20statement_timeout%3D1234%20-c%20work_mem%3D6MB"
    for options, expected in ((given, ["1234ms", "6MB", schema]), ("", ["4321ms", "5MB", schema])):
        backend = PostgresBackend(url + options)
        try:
            await backend.start()  # the listener too
            settings = await backend._transact(program, write=False)
            assert settings == expected
            assert await asyncio.to_thread(backend._run_blocking, program) == settings  # the sync pool's sessions
            assert backend._listener_pid  # it could connect
        finally:
            await backend.close()


async def test_a_blocking_commit_rides_out_a_lost_connection_and_refuses_once_the_backend_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = PostgresBackend(postgres_url())
    try:
        for instance_id in ("a", "b"):
            await backend.create_instance(start_event(instance_id))
        items = {item.instance_id: item for item in await backend.lock_orchestration_work_items(2, LEASE)}
        commit = backend.complete_orchestration_work_items_blocking
        assert await asyncio.to_thread(commit, [checkpoint_for(items["a"])]) == [CommitResult.COMMITTED]
        caplog.set_level(logging.DEBUG, logger=postgres.logger.name)
        assert await asyncio.to_thread(terminate_connections, backend.schema) >= 1
        assert await asyncio.to_thread(commit, [checkpoint_for(items["b"])]) == [CommitResult.COMMITTED]
        messages = [record.getMessage() for record in caplog.records]
        # The connection was found closed before it was used (at once), or while (after a back-off).
        assert any("Replacing a pooled connection" in message or "retrying" in message for message in messages)
        state = await backend.get_instance("b")
        assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.RUNNING
    finally:
        await backend.close()
    with pytest.raises(BackendUnavailableError, match="has been closed"):
        await asyncio.to_thread(commit, [checkpoint_for(items["b"])])


async def test_a_blocking_commit_is_offered_once_a_sync_connection_is_idle() -> None:
    # A worker's chain asks before each step's commit on its thread: the first asking opens
    # the pool of sync connections, which connects in the background, and the steps commit
    # through the event loop until it has a connection idle.
    backend = PostgresBackend(postgres_url())
    try:
        await backend.create_instance(start_event("a"))
        [item] = await backend.lock_orchestration_work_items(1, LEASE)
        assert not backend.can_commit_blocking()
        await wait_until(backend.can_commit_blocking, 10, "the pool of sync connections to connect")
        commit = backend.complete_orchestration_work_items_blocking
        assert await asyncio.to_thread(commit, [checkpoint_for(item)]) == [CommitResult.COMMITTED]
    finally:
        await backend.close()


async def test_connections_to_a_server_that_cannot_write_are_replaced(caplog: pytest.LogCaptureFixture) -> None:
    # After a failover the old primary serves as a standby: its sessions refuse to write.
    # The pool's connections to it are closed as they refuse, and a new one is made.
    backend = PostgresBackend(postgres_url())
    try:
        await backend.start()
        pool = backend._home_pool
        assert pool is not None
        idle = [await pool.getconn() for _ in range(pool.get_stats()["pool_available"])]
        assert idle
        for connection in idle:
            await connection.execute("SET default_transaction_read_only = on")
            await pool.putconn(connection)
        caplog.set_level(logging.WARNING)
        await backend.create_instance(start_event("a"))
        assert await backend.get_instance("a") is not None
        refusals = [record for record in caplog.records if "read-only transaction" in record.getMessage()]
        assert 1 <= len(refusals) <= len(idle)
        assert all(connection.closed for connection in idle)

        # The sync connections that commit a chain's steps on its activity thread, likewise.
        [item] = await backend.lock_orchestration_work_items(1, LEASE)
        blocking_pool = backend._open_blocking_pool()
        blocking_pool.wait()  # its first connection, opened in the background
        blocking_idle = [blocking_pool.getconn() for _ in range(blocking_pool.get_stats()["pool_available"])]
        assert blocking_idle
        for blocking in blocking_idle:
            blocking.execute("SET default_transaction_read_only = on")
            blocking_pool.putconn(blocking)
        commit = backend.complete_orchestration_work_items_blocking
        assert await asyncio.to_thread(commit, [checkpoint_for(item)]) == [CommitResult.COMMITTED]
        assert all(blocking.closed for blocking in blocking_idle)
    finally:
        await backend.close()
