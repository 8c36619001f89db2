"""What the SQL backends add to the contract: URLs, the default file, use from several event loops,
coalesced requests, the cost of their queries."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import closing
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

import dtfx
from dtfx.backends import Backend, open_backend
from dtfx.backends.base import WorkKind, utc_now
from dtfx.backends.postgres import PoolOptions, PostgresBackend, parse_postgres_url
from dtfx.backends.sql import backend as sql_backend
from dtfx.backends.sql import operations
from dtfx.backends.sql.backend import Coalesced, SqlBackend
from dtfx.backends.sql.program import AssumptionFailed, Execute, ExecuteMany, Fetch, InsertNew, Program, Stepper
from dtfx.backends.sqlite import SqliteBackend
from dtfx.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    OrchestrationAlreadyExistsError,
    UnstorableValueError,
)
from dtfx.core.history import EventRaised, ExecutionStarted, OrchestrationInstance, OrchestratorStarted, TaskScheduled
from dtfx.core.state import OrchestrationIdReusePolicy
from dtfx.core.workitems import ActivityTask, CommitResult, OrchestrationWorkItem
from tests.backends.test_contract import LEASE, checkpoint_for, lock_one, start_event
from tests.postgres import SERVER_URL, postgres_url


@pytest.mark.parametrize(
    ("url", "path", "synchronous"),
    [
        ("sqlite:///hub.db", "hub.db", "full"),
        ("sqlite:////var/hub.db", "/var/hub.db", "full"),
        ("sqlite://", "./.dtfx/taskhub.db", "full"),
        ("sqlite:///hub.db?synchronous=normal", "hub.db", "normal"),
    ],
)
def test_sqlite_urls(url: str, path: str, synchronous: str) -> None:
    backend = open_backend(url)
    assert isinstance(backend, SqliteBackend)
    assert (backend.path, backend._synchronous) == (path, synchronous)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/hub.db",
        "sqlite:///hub.db?synchronous=sometimes",
        "sqlite:///hub.db?journal=off",
        "postgresql://postgres@localhost/db?schema=Not-A-Name",
        "postgresql://postgres@localhost/db?pool_max_size=many",
    ],
)
def test_bad_urls_are_refused_clearly(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_backend(url)


def test_postgres_url_options() -> None:
    conninfo, schema, pool = parse_postgres_url(
        "postgresql+psycopg://u:p@db:5433/app?schema=hub&pool_max_size=4&pool_timeout=2.5"
    )
    assert (schema, pool) == ("hub", PoolOptions(min_size=2, max_size=4, timeout=2.5))
    assert conninfo == (
        "postgresql://u:p@db:5433/app?application_name=dtfx%3Ahub&keepalives_idle=30&keepalives_interval=10"
        "&keepalives_count=3&tcp_user_timeout=60000"
    )


@pytest.mark.parametrize("timeout", ["0", "-1", "soon", "inf", "nan"])
def test_a_postgres_pool_timeout_is_a_positive_number_of_seconds(timeout: str) -> None:
    expected = f"pool_timeout must be a positive number of seconds \\(got '{timeout}'"
    with pytest.raises(ConfigurationError, match=expected):
        parse_postgres_url(f"postgresql://db/app?pool_timeout={timeout}")


@pytest.mark.parametrize("schema", ["1abc", "Hub", "a-b", "x" * 49])
def test_a_postgres_schema_name_is_refused_with_the_rule_it_breaks(schema: str) -> None:
    with pytest.raises(ConfigurationError, match="underscores, not starting with a digit, at most 48"):
        parse_postgres_url(f"postgresql://db/app?schema={schema}")


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("pool_min_size=-1", "pool_min_size must be at least 0 \\(got -1\\)"),
        ("pool_max_size=0", "pool_max_size must be at least 1 \\(got 0\\)"),
        ("pool_min_size=5&pool_max_size=2", "pool_max_size must be at least pool_min_size \\(got 2 and 5\\)"),
    ],
)
def test_postgres_pool_sizes_that_no_pool_can_have_are_refused(query: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        parse_postgres_url(f"postgresql://db/app?{query}")
    assert parse_postgres_url("postgresql://db/app?pool_min_size=0&pool_max_size=1")[2].max_size == 1


def test_a_postgres_url_passes_its_libpq_settings_percent_encoded() -> None:
    # libpq reads a ``+`` in a URL as a plus sign, not as a space, and ``%20`` as a space.
    conninfo, _, _ = parse_postgres_url("postgresql://db/app?options=-c%20statement_timeout%3D5s&application_name=a+b")
    assert conninfo.startswith("postgresql://db/app?options=-c%20statement_timeout%3D5s&application_name=a%2Bb&")


def test_a_postgres_url_keeps_the_libpq_settings_it_gives() -> None:
    conninfo, _, _ = parse_postgres_url(
        "postgresql://db/app?tcp_user_timeout=0&application_name=mine&keepalives_idle=5"
    )
    assert conninfo == (
        "postgresql://db/app?tcp_user_timeout=0&application_name=mine&keepalives_idle=5"
        "&keepalives_interval=10&keepalives_count=3"
    )


async def test_the_default_sqlite_hub_is_created_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DTFX_BACKEND", raising=False)
    backend = open_backend()
    try:
        assert await backend.get_instance("nobody") is None  # works without an explicit start()
    finally:
        await backend.close()
    assert (tmp_path / ".dtfx" / "taskhub.db").is_file()


async def test_starting_a_started_backend_returns_at_once(sql_url: str) -> None:
    """A client's first calls each start the backend (a thousand at once, in the sequence
    benchmark): once it has started, that costs no trip to another thread."""
    backend = open_backend(sql_url)
    try:
        await backend.start()
        starting = backend.start()
        try:
            with pytest.raises(StopIteration):
                starting.send(None)  # done without waiting for anything
        finally:
            starting.close()
    finally:
        await backend.close()
    with pytest.raises(BackendUnavailableError):
        await backend.start()


async def test_a_sync_client_and_an_async_worker_share_one_backend_object(sql_url: str) -> None:
    app = dtfx.App()

    @app.activity
    def double(ctx: dtfx.ActivityContext, value: int) -> int:
        return 2 * value

    @app.orchestrator
    def doubled(ctx: dtfx.OrchestrationContext, value: int) -> Any:
        return (yield ctx.call_activity(double, input=value))

    backend = open_backend(sql_url)
    try:
        async with dtfx.Worker(backend, app=app):  # on this test's event loop

            def use_sync_client() -> Any:  # on the client's own loop, in another thread
                with dtfx.Client(backend) as client:
                    instance_id = client.schedule_new_orchestration(doubled, input=21)
                    return client.wait_for_orchestration_completion(instance_id, timeout=30)

            state = await asyncio.to_thread(use_sync_client)
    finally:
        await backend.close()
    assert state is not None and state.get_output() == 42


def _query(backend: Any, sql: str) -> list[tuple[Any, ...]]:
    """Run ``sql`` (committed) on the backend's task hub; return its rows."""
    if isinstance(backend, SqliteBackend):
        with closing(sqlite3.connect(backend.path)) as connection, connection:
            return connection.execute(sql).fetchall()
    with psycopg.connect(SERVER_URL, options=f"-c search_path={backend.schema}") as connection:
        cursor = connection.execute(sql)
        return cursor.fetchall() if cursor.description else []


def _stored_and_actual_next_visible_at(backend: Any) -> list[tuple[Any, ...]]:
    """Each instance's stored ``next_visible_at`` and the earliest visible-at time of its inbox."""
    return _query(
        backend,
        "SELECT instance_id, next_visible_at,"
        " (SELECT min(visible_at) FROM inbox WHERE inbox.instance_id = instances.instance_id) FROM instances",
    )


async def test_a_wrong_next_visible_at_is_put_right_instead_of_handing_out_an_empty_work_item(sql_url: str) -> None:
    backend = open_backend(sql_url)
    try:
        await backend.create_instance(ExecutionStarted(timestamp=utc_now(), name="n", instance=_instance("a")))
        await backend.create_instance(ExecutionStarted(timestamp=utc_now(), name="n", instance=_instance("b")))
        _query(backend, "DELETE FROM inbox WHERE instance_id = 'a'")  # behind the backend's back
        items = await backend.lock_orchestration_work_items(10, timedelta(minutes=1))
        assert [item.instance_id for item in items] == ["b"]
        assert _query(backend, "SELECT lock_token, next_visible_at FROM instances WHERE instance_id = 'a'") == [
            (None, None)
        ]
    finally:
        await backend.close()


async def test_work_items_go_out_though_the_release_of_empty_ones_locked_with_them_failed(
    sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    run = backend._run

    async def failing_release(program: Any, **options: Any) -> Any:
        if getattr(program, "func", None) is operations.release_empty_work_items:
            raise BackendUnavailableError("the database went away")
        return await run(program, **options)

    try:
        await backend.create_instance(ExecutionStarted(timestamp=utc_now(), name="n", instance=_instance("a")))
        await backend.create_instance(ExecutionStarted(timestamp=utc_now(), name="n", instance=_instance("b")))
        _query(backend, "DELETE FROM inbox WHERE instance_id = 'a'")  # behind the backend's back
        monkeypatch.setattr(backend, "_run", failing_release)
        items = await backend.lock_orchestration_work_items(10, timedelta(minutes=1))
        assert [item.instance_id for item in items] == ["b"]  # leased: had it not gone out, for the minute
    finally:
        await backend.close()


async def test_next_visible_at_stays_the_earliest_inbox_time_through_every_kind_of_write(sql_url: str) -> None:
    # Transactions work each instance's next_visible_at out in memory; whatever the mix of
    # writes (creations, checkpoints kept and released, timers, events, sub-orchestrations,
    # entities, continue-as-new, termination), it must match the inbox.
    app = dtfx.App()
    counter = dtfx.EntityInstanceId("tally", "shared")

    @app.activity
    def double(ctx: dtfx.ActivityContext, value: int) -> int:
        return 2 * value

    @app.entity
    def tally(ctx: dtfx.EntityContext, amount: int) -> int:
        ctx.set_state(ctx.get_state(int, 0) + amount)
        return int(ctx.get_state(int, 0))

    @app.orchestrator
    def child(ctx: dtfx.OrchestrationContext, value: int) -> Any:
        yield ctx.create_timer(timedelta(milliseconds=20))
        return (yield ctx.call_activity(double, input=value))

    @app.orchestrator
    def parent(ctx: dtfx.OrchestrationContext, rounds: int) -> Any:
        doubled = yield dtfx.when_all([ctx.call_sub_orchestrator(child, input=n) for n in range(3)])
        ctx.signal_entity(counter, "add", 1)
        total = yield ctx.call_entity(counter, "add", 1)
        approval = yield ctx.wait_for_external_event("approve")
        if rounds > 1:
            ctx.continue_as_new(rounds - 1)
            return None
        return [doubled, total, approval]

    @app.orchestrator
    def waiter(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(timedelta(hours=1))

    backend = open_backend(sql_url)
    try:
        async with dtfx.Worker(backend, app=app):
            client = dtfx.AsyncClient(backend)
            sleeper = await client.schedule_new_orchestration(waiter)
            await client.raise_orchestration_event(sleeper, "early")  # waits in the inbox behind the timer
            parents = [await client.schedule_new_orchestration(parent, input=2) for _ in range(3)]
            for instance_id in parents:
                await client.raise_orchestration_event(instance_id, "approve", data="early")
            for instance_id in parents:
                await client.wait_for_orchestration_start(instance_id, timeout=30)
            await asyncio.sleep(0.3)
            for instance_id in parents:
                await client.raise_orchestration_event(instance_id, "approve", data="late")
            states = [await client.wait_for_orchestration_completion(i, timeout=30) for i in parents]
            await client.terminate_orchestration(sleeper)
            await client.wait_for_orchestration_completion(sleeper, timeout=30)
            await client.signal_entity(counter, "add", 100, signal_time=utc_now() + timedelta(hours=1))
        assert all(state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED for state in states)
        rows = _stored_and_actual_next_visible_at(backend)
    finally:
        await backend.close()
    assert len(rows) > 10
    assert [row for row in rows if row[1] != row[2]] == []
    assert any(row[1] is not None for row in rows)  # the entity's signal for later


async def test_a_value_the_store_cannot_hold_fails_its_own_request_not_those_run_with_it(sql_url: str) -> None:
    # Concurrent creations run together as one transaction; the one at fault must fail alone.
    unstorable = {"surrogate": "a lone \ud800 surrogate"}  # neither store encodes it
    if sql_url.startswith("postgresql"):
        unstorable["nul"] = "a NUL \x00 in text"
    backend = open_backend(sql_url)
    await backend.start()
    gate = threading.Event()
    if isinstance(backend, SqliteBackend):  # its database thread takes the requests once they are all queued
        backend._thread.submit(gate.wait)

    async def open_gate() -> None:  # runs after each creation before it has queued its request
        gate.set()

    names = ["good-1", *unstorable, "good-2"]
    try:
        *outcomes, _ = await asyncio.gather(
            *(
                backend.create_instance(
                    ExecutionStarted(
                        timestamp=utc_now(), name="n", instance=_instance(name), input=unstorable.get(name)
                    )
                )
                for name in names
            ),
            open_gate(),
            return_exceptions=True,
        )
        states = {name: await backend.get_instance(name) for name in names}
    finally:
        await backend.close()
    refused = [name for name, outcome in zip(names, outcomes, strict=True) if outcome is not None]
    assert refused == list(unstorable), outcomes
    assert all(isinstance(outcomes[names.index(name)], UnstorableValueError) for name in unstorable)
    assert [name for name, state in states.items() if state is not None] == ["good-1", "good-2"]


def _work_of_next_visible_at(backend: Any) -> int:
    """How much the store does to answer ``next_visible_at``: SQLite's virtual machine steps,
    or the rows PostgreSQL's plan reads (with the generic plan the backend uses)."""
    fetch = Stepper(operations.next_visible_at(backend._dialect, WorkKind.ORCHESTRATION)).advance()
    assert isinstance(fetch, Fetch)
    if isinstance(backend, SqliteBackend):
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        with closing(sqlite3.connect(backend.path)) as connection:
            connection.set_progress_handler(count, 1)
            connection.execute(fetch.sql, fetch.params).fetchall()
        return steps
    parts = fetch.sql.split("?")
    numbered = parts[0] + "".join(f"${number}{part}" for number, part in enumerate(parts[1:], 1))
    options = f"-c search_path={backend.schema} -c plan_cache_mode=force_generic_plan"
    with psycopg.connect(SERVER_URL, options=options) as connection:
        connection.execute("ANALYZE instances")
        connection.execute(f"PREPARE next_due AS {numbered}")
        values = ", ".join(str(value) for value in fetch.params)
        [[[plan]]] = connection.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE next_due({values})").fetchall()

    def rows_read(node: dict[str, Any]) -> int:
        read = node["Actual Rows"] * node["Actual Loops"] + node.get("Rows Removed by Filter", 0)
        return int(read) + sum(rows_read(child) for child in node.get("Plans", ()))

    return rows_read(plan["Plan"])


async def test_the_next_due_time_is_found_without_reading_every_waiting_instance(sql_url: str) -> None:
    backend = open_backend(sql_url)
    try:
        later = utc_now() + timedelta(hours=1)

        async def schedule(first: int, count: int) -> None:
            await asyncio.gather(
                *(
                    backend.create_instance(
                        ExecutionStarted(timestamp=utc_now(), name="n", instance=_instance(f"i{index}")),
                        scheduled_start_at=later + timedelta(seconds=index),
                    )
                    for index in range(first, first + count)
                )
            )

        await schedule(0, 2)
        few = _work_of_next_visible_at(backend)
        await schedule(2, 2000)
        many = _work_of_next_visible_at(backend)
        assert await backend.next_visible_at(WorkKind.ORCHESTRATION) == later
    finally:
        await backend.close()
    assert many <= 2 * few + 10, (few, many)


async def test_postgres_commits_announce_themselves_only_while_another_backend_listens() -> None:
    url = postgres_url()
    first = open_backend(url)
    await first.start()
    assert isinstance(first, PostgresBackend)
    second: Backend | None = None
    # A bare LISTEN: it hears the announcements without showing itself as a listener.
    async with await psycopg.AsyncConnection.connect(SERVER_URL, autocommit=True) as ear:
        await ear.execute(f"LISTEN dtfx_{first.schema}")
        try:
            await first.create_instance(ExecutionStarted(timestamp=utc_now(), name="n", instance=_instance("alone")))
            second = open_backend(url)
            await second.start()
            for _ in range(200):  # until the second backend's notification connection is up
                await first._look_for_listeners()
                if first._postgres_dialect.others_listening:
                    break
                await asyncio.sleep(0.02)
            await first.create_instance(ExecutionStarted(timestamp=utc_now(), name="n", instance=_instance("heard")))
            heard = [notification.payload async for notification in ear.notifies(timeout=10, stop_after=2)]
        finally:
            await first.close()
            if second is not None:
                await second.close()
    # Notifications arrive in commit order: the first creation announced nothing; the
    # second backend said hello when it started listening.
    assert len(heard) == 2 and not any('"alone"' in payload for payload in heard), heard
    assert sorted('"hello":true' in payload for payload in heard) == [False, True], heard
    assert any('"heard"' in payload for payload in heard), heard


def _instance(instance_id: str) -> OrchestrationInstance:
    return OrchestrationInstance(instance_id=instance_id, execution_id="e1")


def _eager_step(
    item: Any, event_id: int, finished: str | None, *, consumed: list[Any] | None = None
) -> tuple[Any, str]:
    """A step of an eager chain: its checkpoint (keeping the lease, queueing task ``event_id``
    leased) and that task's lock token."""
    scheduled = TaskScheduled(event_id=event_id, timestamp=utc_now(), name="act")
    token = f"eager-{event_id}"
    task = ActivityTask("a", item.state.execution_id, scheduled, lock_token=token, locked_until=utc_now() + LEASE)
    history = [OrchestratorStarted(timestamp=utc_now()), scheduled]
    step = checkpoint_for(item, history=history, consumed=consumed, activity_tasks=[task], keep_lease_for=LEASE)
    if finished is not None:
        step.finished_tasks.append(finished)
    return step, token


@pytest.fixture
def assumed(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each commit program run from now on assumed its instance's row (was given a kept row)."""
    runs: list[bool] = []
    program = operations.complete_orchestration_work_items

    def spy(dialect: Any, checkpoints: Any, kept: Any = None) -> Any:
        runs.append(kept is not None)
        return program(dialect, checkpoints, kept)

    monkeypatch.setattr(operations, "complete_orchestration_work_items", spy)
    return runs


async def test_a_commit_under_a_kept_lease_assumes_the_row_its_commit_before_left(
    sql_url: str, assumed: list[bool]
) -> None:
    backend = open_backend(sql_url)
    try:
        await backend.create_instance(start_event("a"))
        item = await lock_one(backend, "a")
        first, token = _eager_step(item, 1, None)
        assert await backend.complete_orchestration_work_items([first]) == [CommitResult.LEASE_KEPT]
        second, token = _eager_step(item, 2, token, consumed=[])
        assert await backend.complete_orchestration_work_items([second]) == [CommitResult.LEASE_KEPT]
        assert assumed == [False, True]  # the first consumed the start message: it read the inbox

        # Another writer changes the row: an event for later moves next_visible_at.
        later = utc_now() + timedelta(hours=1)
        await backend.send_event("a", EventRaised(timestamp=utc_now(), name="later"), visible_at=later)
        third, token = _eager_step(item, 3, token, consumed=[])
        assert await backend.complete_orchestration_work_items([third]) == [CommitResult.LEASE_KEPT]
        assert assumed[2:] == [True, False]  # assumed, found changed, read

        # An event that is due now ends the kept lease, assumed row or not.
        await backend.send_event("a", EventRaised(timestamp=utc_now(), name="now"))
        fourth, token = _eager_step(item, 4, token, consumed=[])
        assert await backend.complete_orchestration_work_items([fourth]) == [CommitResult.COMMITTED]
        assert assumed[4:] == [True, False]
        history = await backend.get_history("a")
        assert [e.event_id for e in history if isinstance(e, TaskScheduled)] == [1, 2, 3, 4]
        item = await lock_one(backend, "a")
        assert [type(m.event).__name__ for m in item.messages] == ["EventRaised"]
    finally:
        await backend.close()


async def test_a_creation_assumes_its_instance_is_new_and_reads_only_when_it_is_not(
    sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assumed: list[bool] = []
    program = operations.create_instances

    def spy(dialect: Any, requests: Any, *, assume_new: bool = False) -> Any:
        assumed.append(assume_new)
        return program(dialect, requests, assume_new=assume_new)

    monkeypatch.setattr(
        sql_backend, "CREATE_INSTANCES", Coalesced(spy, write=True, hopeful=partial(spy, assume_new=True))
    )
    backend = open_backend(sql_url)
    try:
        await backend.create_instance(start_event("a"))
        assert assumed == [True]
        with pytest.raises(OrchestrationAlreadyExistsError):
            await backend.create_instance(start_event("a"))
        assert assumed[1:] == [True, False]  # assumed, found it there, read it
        # A creation that replaces an ended instance, coalesced with one of a new instance.
        await backend.complete_orchestration_work_items(
            [checkpoint_for(await lock_one(backend, "a"), status=dtfx.OrchestrationStatus.COMPLETED)]
        )
        replace_ended = OrchestrationIdReusePolicy.of(dtfx.OrchestrationStatus.COMPLETED)
        await asyncio.gather(
            backend.create_instance(start_event("a", input='"again"'), reuse_policy=replace_ended),
            backend.create_instance(start_event("b")),
        )
        states = [await backend.get_instance(instance_id) for instance_id in ("a", "b")]
        assert [(s.runtime_status, s.serialized_input) for s in states if s is not None] == [
            (dtfx.OrchestrationStatus.PENDING, '"again"'),
            (dtfx.OrchestrationStatus.PENDING, '"in"'),
        ]
        assert len(await backend.lock_orchestration_work_items(10, LEASE)) == 2
    finally:
        await backend.close()


async def test_coalesced_creations_of_which_one_is_taken_create_the_others(sql_url: str) -> None:
    backend = open_backend(sql_url)
    try:
        await backend.create_instance(start_event("k7", input='"first"'))
        ids = [f"k{index}" for index in range(20)]  # many rows: PostgreSQL inserts them as one JSON document
        outcomes = await asyncio.gather(
            *(backend.create_instance(start_event(instance_id, input='"second"')) for instance_id in ids),
            return_exceptions=True,
        )
        assert [isinstance(outcome, OrchestrationAlreadyExistsError) for outcome in outcomes] == [
            instance_id == "k7" for instance_id in ids
        ]
        states = [await backend.get_instance(instance_id) for instance_id in ids]
        assert [state.serialized_input if state else None for state in states] == [
            '"first"' if instance_id == "k7" else '"second"' for instance_id in ids
        ]
    finally:
        await backend.close()


async def test_an_insert_of_rows_assumed_new_fails_as_an_assumption_when_a_key_is_taken(sql_url: str) -> None:
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    table = f"assumed_{uuid.uuid4().hex[:8]}"

    def insert_new(*rows: tuple[Any, ...]) -> Callable[[], Program[None]]:
        def program() -> Program[None]:
            yield InsertNew(ExecuteMany(f"INSERT INTO {table} (id, payload) VALUES (?, ?)", rows))

        return program

    def count() -> Program[int]:
        return (yield Fetch(f"SELECT count(*) FROM {table}"))[0][0]

    def create() -> Program[None]:
        yield Execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")

    try:
        await backend.start()
        await backend._run(create, write=True)
        await backend._run(insert_new((1, "one")), write=True)
        with pytest.raises(AssumptionFailed):  # rolled back: the new row is not kept either
            await backend._run(insert_new((2, "two"), (1, "again")), write=True)
        with pytest.raises(BackendError):  # any other refusal is an error
            await backend._run(insert_new((3, None)), write=True)
        assert await backend._run(count, write=False) == 1
    finally:
        await backend.close()


async def test_the_postgres_creation_of_one_instance_in_two_processes_at_once_lets_one_win() -> None:
    url = postgres_url()
    first, second = open_backend(url), open_backend(url)
    try:
        await asyncio.gather(first.start(), second.start())
        outcomes = await asyncio.gather(
            *(backend.create_instance(start_event("same")) for backend in (first, second) for _ in range(3)),
            return_exceptions=True,
        )
        assert sum(outcome is None for outcome in outcomes) == 1
        assert all(isinstance(o, OrchestrationAlreadyExistsError) for o in outcomes if o is not None)
        item = await lock_one(first, "same")
        assert len(item.messages) == 1
    finally:
        await first.close()
        await second.close()


async def test_the_first_commit_of_an_instance_created_leased_assumes_the_row_its_creation_left(
    sql_url: str, assumed: list[bool]
) -> None:
    backend = open_backend(sql_url)
    intake = _TakeAll()
    backend.attach_intake(intake)
    try:
        await backend.create_instance(start_event("a"))
        first, _ = _eager_step(intake.accepted[0], 1, None)  # consumes the start
        assert await backend.complete_orchestration_work_items([first]) == [CommitResult.LEASE_KEPT]
        assert assumed == [True]

        # An event joins the start in the inbox before the first commit: the row is read.
        await backend.create_instance(start_event("b"))
        await backend.send_event("b", EventRaised(timestamp=utc_now(), name="meanwhile"))
        first, _ = _eager_step(intake.accepted[1], 1, None)
        assert await backend.complete_orchestration_work_items([first]) == [CommitResult.COMMITTED]
        assert assumed[1:] == [True, False]
        item = await lock_one(backend, "b")
        assert [type(m.event) for m in item.messages] == [EventRaised]
    finally:
        backend.detach_intake(intake)
        await backend.close()


class _TakeAll:
    """An intake that takes every instance created."""

    def __init__(self) -> None:
        self.accepted: list[OrchestrationWorkItem] = []

    def offer(self, start: ExecutionStarted) -> timedelta | None:
        return LEASE

    def accept(self, item: OrchestrationWorkItem) -> bool:
        self.accepted.append(item)
        return True

    def decline(self) -> None:
        raise AssertionError("nothing is declined here")


async def test_each_instance_row_is_written_once_per_transaction(tmp_path: Path) -> None:
    backend = SqliteBackend(f"sqlite:///{tmp_path}/hub.db")
    await backend.start()
    statements: list[str] = []
    assert backend._connection is not None
    backend._connection.set_trace_callback(statements.append)
    try:
        await backend.create_instance(start_event("a"))
        item = await lock_one(backend, "a")
        statements.clear()
        step, _ = _eager_step(item, 1, None)
        assert await backend.complete_orchestration_work_items([step]) == [CommitResult.LEASE_KEPT]
        done = checkpoint_for(item, status=dtfx.OrchestrationStatus.COMPLETED, consumed=[])
        assert await backend.complete_orchestration_work_items([done]) == [CommitResult.COMMITTED]
        await backend.create_instance(start_event("b"))
    finally:
        await backend.close()
    written = [
        statement for statement in statements if statement.startswith(("UPDATE instances", "INSERT INTO instances"))
    ]
    assert len(written) == 3  # two checkpoints and one creation


def test_a_missing_postgres_driver_names_the_extra_once() -> None:
    script = (
        "import sys; sys.modules['psycopg'] = None\n"  # as if psycopg were not installed
        "from dtfx.backends import open_backend\n"
        "try:\n    open_backend('postgresql://db/app')\n"
        "except Exception as error:\n    print(type(error).__name__, error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.startswith("ConfigurationError PostgreSQL support needs `pip install 'dtfx[postgres]'`")
    assert result.stdout.count("dtfx[postgres]") == 1


async def test_an_inbox_message_no_worker_can_read_holds_back_only_its_instance(
    sql_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Written by a newer dtfx, say, in a rolling deploy: it waits for a worker that reads it.
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    try:
        for instance_id in ("garbled", "fine"):
            await backend.create_instance(start_event(instance_id))

        def garble() -> Program[None]:
            event = '{"type":"FromTheFuture","timestamp":"2026-12-07T17:22:01Z"}'
            yield Execute("UPDATE inbox SET event = ? WHERE instance_id = ?", (event, "garbled"))

        await backend._run(garble, write=True)
        items = await backend.lock_orchestration_work_items(10, LEASE)
        assert [item.instance_id for item in items] == ["fine"]
        assert "Instance garbled: an inbox message cannot be read" in caplog.text
        assert await backend.lock_orchestration_work_items(10, LEASE) == []  # put off: not offered at once again

        def inbox() -> Program[list[str]]:
            rows = yield Fetch("SELECT instance_id FROM inbox ORDER BY instance_id")
            return [row[0] for row in rows]

        assert await backend._run(inbox, write=False) == ["fine", "garbled"]  # nothing was dropped
    finally:
        await backend.close()
