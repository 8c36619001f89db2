"""Leases taken by a transaction whose commit is in doubt (its connection dropped after the
``COMMIT`` went out) are given back once the store answers, instead of holding their work
back until they expire: nobody got the work items they lease."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import dtfx
from dtfx.backends import open_backend
from dtfx.backends.base import utc_now
from dtfx.backends.postgres import PostgresBackend
from dtfx.backends.postgres_pipeline import Pipeline
from dtfx.backends.sql import backend as sql_backend
from dtfx.backends.sql import operations
from dtfx.backends.sql.backend import SqlBackend
from dtfx.backends.sqlite import SqliteBackend
from dtfx.core.errors import BackendUnavailableError, CommitInDoubtError
from dtfx.core.history import TaskScheduled
from dtfx.core.workitems import ActivityTask, ActivityWorkItem, OrchestrationWorkItem
from tests.backends.test_contract import _Intake, checkpoint_for, lock_one, start_event
from tests.postgres import postgres_url
from tests.worker.test_chains import chain_app

HOUR = timedelta(hours=1)
LOCKS = (operations.lock_orchestration_work_items, operations.lock_activity_work_items)
GIVE_BACKS = (operations.give_back_instance_leases, operations.give_back_task_leases)


class Doubts:
    """Makes a backend's first lock fail with its commit in doubt: with ``committed``, the
    first that took something, after committing it; else the first, before it ran. Holds the
    give-back that follows until :attr:`gate` is set."""

    def __init__(self, backend: SqlBackend, monkeypatch: pytest.MonkeyPatch, *, committed: bool) -> None:
        self.backend = backend
        self.committed = committed
        self.gate = asyncio.Event()
        self.doubted = 0
        self.given_back = 0
        self.store_away = 0
        """How many attempts at giving back find the store unavailable."""
        self.attempts = 0
        self._run = backend._run
        monkeypatch.setattr(backend, "_run", self._in_doubt)

    async def _in_doubt(self, program: Any, **options: Any) -> Any:
        function = getattr(program, "func", None)
        if function in LOCKS and not self.doubted:
            taken = await self._run(program, **options) if self.committed else None
            if taken in ([], ([], {})):  # an activity lock's result, or an orchestration lock's: nothing taken
                return taken
            self.doubted += 1
            raise CommitInDoubtError("the connection dropped after the commit had gone out")
        if function in GIVE_BACKS:
            await self.gate.wait()
            self.attempts += 1
            if self.attempts <= self.store_away:
                raise BackendUnavailableError("the database is restarting")
            self.given_back += 1
        return await self._run(program, **options)

    async def given_back_all(self) -> None:
        """Let the give-backs run, and wait until they are done."""
        self.gate.set()
        await asyncio.wait_for(asyncio.gather(*self.backend._giving_back), 10)
        assert not self.backend._giving_back


async def _schedule_an_activity(backend: SqlBackend) -> TaskScheduled:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a")
    scheduled = TaskScheduled(event_id=1, timestamp=utc_now(), name="act", input='"x"')
    task = ActivityTask("a", item.state.execution_id, scheduled)
    await backend.complete_orchestration_work_items([checkpoint_for(item, activity_tasks=[task])])
    return scheduled


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not committed"])
@pytest.mark.parametrize("kind", ["orchestration", "activity"])
async def test_the_leases_of_a_lock_whose_commit_is_in_doubt_are_given_back_once_it_had_committed(
    sql_url: str, monkeypatch: pytest.MonkeyPatch, kind: str, committed: bool
) -> None:
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    lock: Callable[[], Awaitable[list[OrchestrationWorkItem] | list[ActivityWorkItem]]]
    if kind == "orchestration":
        lock = lambda: backend.lock_orchestration_work_items(10, HOUR)  # noqa: E731
    else:
        lock = lambda: backend.lock_activity_work_items(10, HOUR)  # noqa: E731
    try:
        if kind == "orchestration":
            await backend.create_instance(start_event("a"))
        else:
            scheduled = await _schedule_an_activity(backend)
        doubts = Doubts(backend, monkeypatch, committed=committed)
        with pytest.raises(CommitInDoubtError):
            await lock()
        taken = await lock()  # before the give-back
        if committed:
            assert taken == []  # leased for the hour to a lock whose items nobody got
        else:  # nothing was leased: the next lock takes it, and the give-back leaves that lease alone
            assert len(taken) == 1
        await doubts.given_back_all()
        assert doubts.given_back == 1
        again = await lock()
        assert len(again) == int(committed)
        if kind == "activity" and committed:
            [item] = again
            assert isinstance(item, ActivityWorkItem)
            assert (item.task.event, item.dequeue_count) == (scheduled, 1)  # the lost lock does not count
    finally:
        await backend.close()


@pytest.mark.parametrize("ending", ["the store answers", "the leases end", "the backend closes"])
async def test_a_give_back_is_tried_again_while_the_store_is_away_until(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    monkeypatch.setattr(sql_backend, "_GIVE_BACK_FIRST_DELAY", 0.01)
    backend = SqliteBackend(f"sqlite:///{tmp_path}/hub.db")
    lease = timedelta(milliseconds=300) if ending == "the leases end" else HOUR
    try:
        await backend.create_instance(start_event("a"))
        doubts = Doubts(backend, monkeypatch, committed=True)
        doubts.store_away = 3 if ending == "the store answers" else 1_000
        with pytest.raises(CommitInDoubtError):
            await backend.lock_orchestration_work_items(10, lease)
        if ending == "the backend closes":
            doubts.gate.set()
            for _ in range(500):
                if doubts.attempts >= 3:
                    break
                await asyncio.sleep(0.01)
            await backend.close()
        await doubts.given_back_all()  # the give-back has ended
        assert doubts.given_back == int(ending == "the store answers")
        assert doubts.attempts >= 3
        if ending == "the store answers":
            assert [item.instance_id for item in await backend.lock_orchestration_work_items(10, HOUR)] == ["a"]
        elif ending == "the leases end":  # stopped trying about when the lease ended
            assert doubts.attempts < 20
    finally:
        await backend.close()


class CreationInDoubt:
    """Makes a backend's first creation fail with its commit in doubt: after committing it,
    before, or before but with the commit ending just after the creation's look at the
    instance. Holds the give-backs until :attr:`gate` is set."""

    def __init__(self, backend: SqlBackend, monkeypatch: pytest.MonkeyPatch, outcome: str) -> None:
        self.outcome = outcome
        self.gate = asyncio.Event()
        self.doubted: list[Any] = []
        self._run_coalesced = backend._run_coalesced
        self._run = backend._run
        self._get_instance = backend.get_instance
        monkeypatch.setattr(backend, "_run_coalesced", self._in_doubt)
        monkeypatch.setattr(backend, "_run", self._held)
        monkeypatch.setattr(backend, "get_instance", self._look)

    async def _in_doubt(self, kind: Any, request: Any) -> Any:
        if kind is sql_backend.CREATE_INSTANCES and not self.doubted:
            self.doubted.append(request)
            if self.outcome == "committed":
                await self._run_coalesced(kind, request)  # created, leased to the intake
            raise CommitInDoubtError("the connection dropped after the commit had gone out")
        return await self._run_coalesced(kind, request)

    async def _look(self, instance_id: str, **options: Any) -> Any:
        state = await self._get_instance(instance_id, **options)
        if self.outcome == "committed after the look" and len(self.doubted) == 1:
            self.doubted.append("ended")
            await self._run_coalesced(sql_backend.CREATE_INSTANCES, self.doubted[0])  # it ends only now
        return state

    async def _held(self, program: Any, **options: Any) -> Any:
        if getattr(program, "func", None) in GIVE_BACKS:
            await self.gate.wait()
        return await self._run(program, **options)


@pytest.mark.parametrize("outcome", ["committed", "not committed", "committed after the look"])
async def test_a_creation_whose_commit_is_in_doubt_finds_out_and_gives_the_lease_for_its_worker_back(
    sql_url: str, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    doubt = CreationInDoubt(backend, monkeypatch, outcome)
    intake = _Intake(lease=HOUR)
    backend.attach_intake(intake)
    start = start_event("a")
    try:
        await backend.create_instance(start)  # no error: it committed, or it is made again
        assert (intake.accepted, intake.declined) == ([], 1)  # the worker's slot went back
        state = await backend.get_instance("a")
        assert state is not None and state.execution_id == start.instance.execution_id
        taken = await backend.lock_orchestration_work_items(10, HOUR)
        if outcome == "not committed":  # made again without a lease
            assert [item.instance_id for item in taken] == ["a"]
        else:  # leased for the hour to the worker, which never got it, until it is given back
            assert taken == []
            doubt.gate.set()
            await asyncio.wait_for(asyncio.gather(*backend._giving_back), 10)
            item = await lock_one(backend, "a")
            assert [message.event for message in item.messages] == [start]
    finally:
        await backend.close()


async def test_a_creation_in_doubt_knows_its_instance_after_a_continue_as_new(
    sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker may have run the instance into its next execution (another execution id)
    before the creating client looks: it was created all the same, and is not made again."""
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    run_coalesced = backend._run_coalesced
    start = start_event("a")

    async def committed_then_continued(kind: Any, request: Any) -> Any:
        if kind is sql_backend.CREATE_INSTANCES and request[0] is start:
            await run_coalesced(kind, request)
            item = await lock_one(backend, "a")
            await backend.complete_orchestration_work_items([checkpoint_for(item, execution_id="the next one")])
            raise CommitInDoubtError("the connection dropped after the commit had gone out")
        return await run_coalesced(kind, request)

    monkeypatch.setattr(backend, "_run_coalesced", committed_then_continued)
    try:
        await backend.create_instance(start)  # no OrchestrationAlreadyExistsError for its own instance
        state = await backend.get_instance("a")
        assert state is not None and state.execution_id == "the next one"  # not made again
        assert state.created_at == start.timestamp
    finally:
        await backend.close()


async def test_a_creation_whose_commit_is_in_doubt_says_so_while_the_store_cannot_tell(
    sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    CreationInDoubt(backend, monkeypatch, "committed")

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailableError("the database is restarting")

    monkeypatch.setattr(backend, "get_instance", unavailable)
    try:
        with pytest.raises(CommitInDoubtError):
            await backend.create_instance(start_event("a"))
    finally:
        await backend.close()


def lose_the_next_commits_answer(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Have the server commit the next transaction and its connection drop before the answer
    arrives (once: the list it returns then holds True)."""
    receive = Pipeline._receive
    lost: list[bool] = []

    def lose_the_commits_answer(self: Pipeline) -> Any:
        yield from receive(self)
        if self.committing and not lost:
            lost.append(True)
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(Pipeline, "_receive", lose_the_commits_answer)
    return lost


async def test_a_postgres_lock_whose_answer_was_lost_after_its_commit_gives_its_leases_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = PostgresBackend(postgres_url())
    try:
        await backend.create_instance(start_event("a"))
        lose_the_next_commits_answer(monkeypatch)
        with pytest.raises(CommitInDoubtError, match="may or may not have committed"):
            await backend.lock_orchestration_work_items(10, HOUR)
        monkeypatch.undo()
        for _ in range(100):  # given back within moments, not the hour
            if items := await backend.lock_orchestration_work_items(10, HOUR):
                break
            await asyncio.sleep(0.05)
        assert [item.instance_id for item in items] == ["a"]
    finally:
        await backend.close()


async def test_a_postgres_creation_whose_answer_was_lost_after_its_commit_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = PostgresBackend(postgres_url())
    client = dtfx.AsyncClient(backend)
    try:
        await backend.start()
        lost = lose_the_next_commits_answer(monkeypatch)
        instance_id = await client.schedule_new_orchestration("orch", instance_id="a")
        assert lost and instance_id == "a"
        [item] = await backend.lock_orchestration_work_items(10, HOUR)
        assert (item.instance_id, item.history_size, len(item.messages)) == ("a", 0, 1)
    finally:
        await backend.close()


async def test_a_worker_whose_activity_lock_was_in_doubt_goes_on_at_once(
    sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []
    app = chain_app(runs)
    backend = open_backend(sql_url)
    assert isinstance(backend, SqlBackend)
    doubts = Doubts(backend, monkeypatch, committed=True)
    doubts.gate.set()
    options = dtfx.WorkerOptions(lease_duration=HOUR, eager_activities=False)
    try:
        client = dtfx.AsyncClient(backend)
        async with dtfx.Worker(backend, app=app, options=options):
            instance_id = await client.schedule_new_orchestration("chain", input=3)
            state = await client.wait_for_orchestration_completion(instance_id, timeout=20)
    finally:
        await backend.close()
    assert state is not None and state.get_output() == 3
    assert (doubts.doubted, doubts.given_back) == (1, 1)
    assert runs == [0, 1, 2]
