"""Many rows written by one transaction: every table, every kind of value, exactly as given.

PostgreSQL writes them with one statement per table (the rows travel as one JSON
parameter), SQLite with one prepared statement run per row: the contract tests run one
row at a time, mostly; these run many.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dtfx.backends import open_backend
from dtfx.backends.base import Backend, utc_now
from dtfx.backends.sql.backend import SqlBackend
from dtfx.backends.sql.program import Execute, ExecuteMany, Fetch, Program
from dtfx.backends.sql.rows import to_micros
from dtfx.backends.sqlite import SqliteBackend
from dtfx.core.errors import UnstorableValueError
from dtfx.core.history import (
    EventRaised,
    ExecutionStarted,
    OrchestrationInstance,
    OrchestrationStatus,
    OrchestratorCompleted,
    OrchestratorStarted,
    ParentInstance,
    TaskScheduled,
)
from dtfx.core.workitems import ActivityTask, CommitResult, OrchestrationCheckpoint, OutboundMessage
from dtfx.worker.commit import GroupCommitter
from tests.backends.test_contract import LEASE, checkpoint_for, lock_one, run_to, start_event
from tests.postgres import postgres_url

Status = OrchestrationStatus

TEXTS = [
    "plain",
    "accents é ü, CJK 中文, an emoji 😀",
    'quotes " and a backslash \\',
    "a JSON escape written out: \\u0000",
    "",
    "tab\tand newline\n",
    '{"nested": ["json", 1, null]}',
]
"""Values that a JSON encoding of rows must carry through unchanged."""

FAR = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
"""A moment whose microseconds need more than the 53 bits of a JSON double."""


@pytest.fixture(params=["sqlite", "postgres"])
async def sql_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlBackend]:
    backend = open_backend(f"sqlite:///{tmp_path}/hub.db" if request.param == "sqlite" else postgres_url())
    assert isinstance(backend, SqlBackend)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def test_a_group_commit_writes_many_rows_to_every_table_exactly(backend: Backend) -> None:
    for name in ("idle-1", "idle-2"):
        await run_to(backend, name, Status.RUNNING)
    for name in ("first", "second"):
        await backend.create_instance(start_event(name))
    items = {item.instance_id: item for item in await backend.lock_orchestration_work_items(10, LEASE)}
    assert sorted(items) == ["first", "second"]
    now = utc_now()
    checkpoints: list[OrchestrationCheckpoint] = []
    histories: dict[str, list[Any]] = {}
    tasks: list[tuple[str, TaskScheduled]] = []
    sent: dict[str, list[EventRaised]] = {"idle-1": [], "idle-2": []}
    for name in ("first", "second"):
        item = items[name]
        scheduled = [
            TaskScheduled(event_id=number, timestamp=now, name=f"act-{number}", input=text)
            for number, text in enumerate(TEXTS)
        ]
        history = [
            OrchestratorStarted(timestamp=now),
            *(message.event for message in item.messages),
            *scheduled,
            EventRaised(timestamp=FAR, name="far"),
            OrchestratorCompleted(timestamp=now),
        ]
        messages = []
        for number, text in enumerate(TEXTS):
            target = f"idle-{number % 2 + 1}"
            event = EventRaised(timestamp=now, name=f"{name}-{number}", input=text)
            messages.append(OutboundMessage(target, event))
            sent[target].append(event)
            messages.append(OutboundMessage(target, EventRaised(timestamp=now, name="much later"), visible_at=FAR))
        histories[name] = history
        tasks += [(name, event) for event in scheduled]
        checkpoints.append(
            checkpoint_for(
                item,
                history=history,
                custom_status=TEXTS[1] if name == "first" else None,
                activity_tasks=[ActivityTask(name, item.state.execution_id, event) for event in scheduled],
                messages=messages,
            )
        )

    assert await backend.complete_orchestration_work_items(checkpoints) == [CommitResult.COMMITTED] * 2

    for name in ("first", "second"):
        assert await backend.get_history(name) == histories[name]
    first, second = await backend.get_instance("first"), await backend.get_instance("second")
    assert first is not None and first.serialized_custom_status == TEXTS[1]
    assert second is not None and second.serialized_custom_status is None
    locked_tasks = await backend.lock_activity_work_items(100, LEASE)
    assert [(task.task.instance_id, task.task.event) for task in locked_tasks] == tasks
    ready = {item.instance_id: item for item in await backend.lock_orchestration_work_items(10, LEASE)}
    assert sorted(ready) == ["idle-1", "idle-2"]  # the messages for later stay behind
    for name, events in sent.items():
        assert [message.event for message in ready[name].messages] == events  # in the order sent


async def test_one_transaction_creates_and_replaces_many_instances_exactly(backend: Backend) -> None:
    for name in ("old-1", "old-2"):
        await run_to(backend, name, Status.COMPLETED)
    await backend.create_instance(start_event("parent"))
    item = await lock_one(backend, "parent")
    parent = ParentInstance(instance_id="parent", task_scheduled_id=1)
    starts = {
        "new-bare": start_event("new-bare", input=None),
        "new-full": start_event("new-full", "名前", input=TEXTS[2], parent=parent, tags={"é": "😀"}, version="1.0"),
        "new-later": start_event("new-later", input=TEXTS[3]),
        "old-1": start_event("old-1", "again", input=TEXTS[1]),
        "old-2": start_event("old-2", "again", input=None, tags={"k": ""}),
    }
    messages = [
        OutboundMessage(name, start, visible_at=FAR if name == "new-later" else None) for name, start in starts.items()
    ]
    assert await backend.complete_orchestration_work_items([checkpoint_for(item, messages=messages)]) == [True]

    for name, start in starts.items():
        state = await backend.get_instance(name)
        assert state is not None
        assert (state.name, state.serialized_input, state.tags, state.version) == (
            start.name,
            start.input,
            start.tags,
            start.version,
        )
        assert state.runtime_status == Status.PENDING
        assert state.execution_id == start.instance.execution_id
        assert state.parent_instance_id == ("parent" if name == "new-full" else None)
        assert state.scheduled_start_at == (FAR if name == "new-later" else None)
        assert state.completed_at is None and state.failure_details is None
    assert await backend.get_history("old-1") == await backend.get_history("old-2") == []
    ready = {item.instance_id: item for item in await backend.lock_orchestration_work_items(10, LEASE)}
    assert sorted(ready) == ["new-bare", "new-full", "old-1", "old-2"]  # the replaced ones' leases are gone
    for name, ready_item in ready.items():
        assert [message.event for message in ready_item.messages] == [starts[name]]


@pytest.mark.parametrize(
    ("sql_backend", "unstorable"),
    [  # SQLite text holds a NUL
        ("sqlite", "a lone \ud800 surrogate"),
        ("postgres", "a lone \ud800 surrogate"),
        ("postgres", "a NUL \x00 in text"),
    ],
    indirect=["sql_backend"],
)
async def test_a_value_the_store_cannot_hold_fails_only_its_own_checkpoint_of_a_group(
    sql_backend: SqlBackend, unstorable: str
) -> None:
    for name in ("a", "b", "c"):
        await sql_backend.create_instance(start_event(name))
    items = {item.instance_id: item for item in await sql_backend.lock_orchestration_work_items(10, LEASE)}
    checkpoints = {
        name: checkpoint_for(item, custom_status=unstorable if name == "b" else TEXTS[1])
        for name, item in items.items()
    }
    calls: list[list[str]] = []

    async def commit_many(batch: Sequence[OrchestrationCheckpoint]) -> list[CommitResult]:
        calls.append([checkpoint.instance_id for checkpoint in batch])
        return await sql_backend.complete_orchestration_work_items(batch)

    committer = GroupCommitter(commit_many)
    outcomes = await asyncio.gather(
        *(committer.commit(checkpoints[name]) for name in ("a", "b", "c")), return_exceptions=True
    )

    assert calls == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert outcomes[0] == outcomes[2] == CommitResult.COMMITTED
    assert isinstance(outcomes[1], UnstorableValueError)
    for name in ("a", "c"):
        assert await sql_backend.get_history(name) == checkpoints[name].new_history
        state = await sql_backend.get_instance(name)
        assert state is not None and state.serialized_custom_status == TEXTS[1]
    assert await sql_backend.get_history("b") == []  # nothing of it was written; its lease holds
    assert await sql_backend.lock_orchestration_work_items(10, LEASE) == []
    fixed = checkpoint_for(items["b"], custom_status="fine")
    assert await sql_backend.complete_orchestration_work_items([fixed]) == [CommitResult.COMMITTED]
    assert await sql_backend.get_history("b") == fixed.new_history


async def test_the_dialect_writes_and_updates_many_rows_in_the_hubs_own_tables(sql_backend: SqlBackend) -> None:
    dialect = sql_backend._dialect
    postgres = not isinstance(sql_backend, SqliteBackend)
    history = [("many", sequence, text) for sequence, text in enumerate(TEXTS * 3)]
    insert = dialect.insert_rows("history", ("instance_id", "sequence", "event"), history)
    single = dialect.insert_rows("history", ("instance_id", "sequence", "event"), [("one", 0, "x")])
    few = [("few", sequence, text) for sequence, text in enumerate(TEXTS[:4])]
    insert_few = dialect.insert_rows("history", ("instance_id", "sequence", "event"), few)
    # A few rows, in order, through the identity column that numbers inbox messages.
    inbox = [("few", None, to_micros(FAR), text) for text in reversed(TEXTS[:3])]
    insert_inbox = dialect.insert_rows("inbox", ("instance_id", "execution_id", "visible_at", "event"), inbox)
    # PostgreSQL: one statement for many rows, and for a few; one row (and SQLite's executemany) as before.
    assert isinstance(insert, Execute if postgres else ExecuteMany)
    assert isinstance(insert_few, Execute if postgres else ExecuteMany)
    assert isinstance(single, ExecuteMany)
    if postgres:  # many rows as a JSON document, a few as a list of values
        assert "json_populate_recordset" in insert.sql and "json" not in insert_few.sql

    starts = [
        ExecutionStarted(
            timestamp=utc_now(),
            name="n",
            instance=OrchestrationInstance(instance_id=f"i-{n}", execution_id="e"),
            input=text,
        )
        for n, text in enumerate(TEXTS)
    ]
    for start in starts:
        await sql_backend.create_instance(start)
    # (custom_status, completed_at, locked_until) then the key: NULLs, big numbers, every text.
    changes = [
        (text, to_micros(FAR) if n % 2 else None, None if n % 2 else -(2**62), f"i-{n}") for n, text in enumerate(TEXTS)
    ]
    update = dialect.update_rows("instances", ("custom_status", "completed_at", "locked_until"), "instance_id", changes)
    assert isinstance(update, Execute if postgres else ExecuteMany)

    def program() -> Program[tuple[list[Any], list[Any], list[Any]]]:
        ids = dialect.list_param([f"i-{n}" for n in range(len(TEXTS))])
        yield Fetch(
            f"SELECT instance_id FROM instances WHERE {dialect.in_list('instance_id')}"
            f" ORDER BY instance_id{dialect.for_update}",
            (ids,),
        )
        yield insert
        yield single
        yield insert_few
        yield insert_inbox
        yield update
        written = yield Fetch("SELECT instance_id, sequence, event FROM history ORDER BY instance_id DESC, sequence")
        queued = yield Fetch(
            "SELECT instance_id, execution_id, visible_at, event FROM inbox WHERE instance_id = 'few' ORDER BY id"
        )
        updated = yield Fetch(
            "SELECT custom_status, completed_at, locked_until, instance_id, input FROM instances"
            f" WHERE {dialect.in_list('instance_id')} ORDER BY instance_id",
            (ids,),
        )
        return written, queued, updated

    written, queued, updated = await sql_backend._run(program, write=True)
    assert [tuple(row) for row in written] == [("one", 0, "x"), *history, *few]
    assert [tuple(row) for row in queued] == inbox
    assert [tuple(row) for row in updated] == [(*change, text) for change, text in zip(changes, TEXTS, strict=True)]
