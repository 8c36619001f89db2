"""The storage contract, run unchanged against every backend (see ``tests/conftest.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from dtfx.backends import signals
from dtfx.backends.base import Backend, WorkKind, utc_now
from dtfx.core.errors import ConfigurationError, OrchestrationAlreadyExistsError, OrchestrationNotFoundError
from dtfx.core.history import (
    EntityOperationSignaled,
    EventRaised,
    ExecutionCompleted,
    ExecutionRewound,
    ExecutionStarted,
    FailureDetails,
    OrchestrationInstance,
    OrchestrationStatus,
    OrchestratorCompleted,
    OrchestratorStarted,
    ParentInstance,
    SubOrchestrationInstanceFailed,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TimerFired,
)
from dtfx.core.state import OrchestrationIdReusePolicy, OrchestrationQuery, OrchestrationState
from dtfx.core.workitems import (
    ActivityResult,
    ActivityTask,
    ActivityWorkItem,
    CommitResult,
    OrchestrationCheckpoint,
    OrchestrationWorkItem,
    OutboundMessage,
)

LEASE = timedelta(seconds=30)
Status = OrchestrationStatus


def start_event(
    instance_id: str,
    name: str = "orch",
    *,
    input: str | None = '"in"',
    parent: ParentInstance | None = None,
    tags: dict[str, str] | None = None,
    version: str | None = None,
) -> ExecutionStarted:
    return ExecutionStarted(
        timestamp=utc_now(),
        name=name,
        instance=OrchestrationInstance(instance_id=instance_id, execution_id=uuid.uuid4().hex),
        input=input,
        parent=parent,
        tags=tags,
        version=version,
    )


def checkpoint_for(
    item: OrchestrationWorkItem,
    *,
    status: OrchestrationStatus = Status.RUNNING,
    history: list | None = None,
    consumed: list | None = None,
    **changes: object,
) -> OrchestrationCheckpoint:
    now = utc_now()
    fields: dict[str, object] = dict(
        instance_id=item.instance_id,
        lock_token=item.lock_token,
        consumed=[m.id for m in item.messages] if consumed is None else consumed,
        new_history=[OrchestratorStarted(timestamp=now), *[m.event for m in item.messages]]
        if history is None
        else history,
        status=status,
        execution_id=item.state.execution_id,
        input=item.state.serialized_input,
        output=None,
        custom_status=None,
        failure_details=None,
        version=item.state.version,
        completed_at=now if status.is_terminal else None,
        updated_at=now,
    )
    fields.update(changes)
    return OrchestrationCheckpoint(**fields)  # type: ignore[arg-type]


async def lock_one(backend: Backend, instance_id: str, *, lock_for: timedelta = LEASE) -> OrchestrationWorkItem:
    items = await backend.lock_orchestration_work_items(100, lock_for)
    matching = [item for item in items if item.instance_id == instance_id]
    assert matching, f"{instance_id} was not locked (got {[i.instance_id for i in items]})"
    return matching[0]


async def run_to(backend: Backend, instance_id: str, status: OrchestrationStatus, **changes: object) -> None:
    """Create an instance and commit one episode that leaves it in ``status``."""
    await backend.create_instance(start_event(instance_id))
    item = await lock_one(backend, instance_id)
    assert await backend.complete_orchestration_work_items([checkpoint_for(item, status=status, **changes)]) == [True]


# -- creating instances ---------------------------------------------------------------------------


async def test_create_instance_is_pending_with_its_start_in_the_inbox(backend: Backend) -> None:
    start = start_event("a", tags={"team": "x"}, version="1.2")
    await backend.create_instance(start)

    state = await backend.get_instance("a")
    assert state is not None
    assert state.runtime_status == Status.PENDING
    assert (state.name, state.serialized_input, state.version, state.tags) == ("orch", '"in"', "1.2", {"team": "x"})
    assert state.execution_id == start.instance.execution_id
    assert state.created_at <= utc_now()

    item = await lock_one(backend, "a")
    assert item.history_size == 0
    assert [m.event for m in item.messages] == [start]
    assert item.state.runtime_status == Status.PENDING


async def test_create_refuses_an_existing_id_without_a_matching_reuse_policy(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    with pytest.raises(OrchestrationAlreadyExistsError) as raised:
        await backend.create_instance(start_event("a"))
    assert raised.value.instance_id == "a"
    with pytest.raises(OrchestrationAlreadyExistsError):
        await backend.create_instance(start_event("a"), reuse_policy=OrchestrationIdReusePolicy.of(Status.COMPLETED))


async def test_create_replaces_an_instance_whose_status_the_policy_lists(backend: Backend) -> None:
    await run_to(backend, "a", Status.COMPLETED, output='"old"')
    replacement = start_event("a", input='"new"')
    await backend.create_instance(replacement, reuse_policy=OrchestrationIdReusePolicy.of(Status.COMPLETED))

    state = await backend.get_instance("a")
    assert state is not None
    assert state.runtime_status == Status.PENDING
    assert state.serialized_input == '"new"'
    assert state.serialized_output is None
    assert state.execution_id == replacement.instance.execution_id
    assert await backend.get_history("a") == []
    item = await lock_one(backend, "a")
    assert [m.event for m in item.messages] == [replacement]


async def test_scheduled_start_is_invisible_until_due(backend: Backend) -> None:
    due = utc_now() + timedelta(milliseconds=400)
    await backend.create_instance(start_event("later"), scheduled_start_at=due)
    state = await backend.get_instance("later")
    assert state is not None and state.scheduled_start_at is not None
    assert abs((state.scheduled_start_at - due).total_seconds()) < 0.01
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    next_due = await backend.next_visible_at(WorkKind.ORCHESTRATION)
    assert next_due is not None and abs((next_due - due).total_seconds()) < 0.01
    await asyncio.sleep(0.45)
    assert [i.instance_id for i in await backend.lock_orchestration_work_items(10, LEASE)] == ["later"]


class _Intake:
    """An :class:`~dtfx.backends.base.Intake` that takes what ``takes`` says, and records the rest;
    with ``gone``, its worker goes away between the offer and the work item."""

    def __init__(
        self,
        takes: Callable[[ExecutionStarted], bool] = lambda start: True,
        lease: timedelta = LEASE,
        *,
        gone: bool = False,
    ) -> None:
        self.takes = takes
        self.lease = lease
        self.gone = gone
        self.offered: list[str] = []
        self.accepted: list[OrchestrationWorkItem] = []
        self.declined = 0

    def offer(self, start: ExecutionStarted) -> timedelta | None:
        self.offered.append(start.instance.instance_id)
        return self.lease if self.takes(start) else None

    def accept(self, item: OrchestrationWorkItem) -> bool:
        self.accepted.append(item)
        return not self.gone

    def decline(self) -> None:
        self.declined += 1


async def test_an_intake_takes_what_it_offers_to_take_created_leased_to_it(backend: Backend) -> None:
    intake = _Intake(lambda start: start.name == "orch")
    assert backend.attach_intake(intake) is True
    assert backend.attach_intake(_Intake()) is False  # one at a time
    with backend.subscribe(WorkKind.ORCHESTRATION) as dispatchers:
        dispatchers.clear()
        start = start_event("a")
        await backend.create_instance(start)
        assert await dispatchers.wait(0.1) is False  # nobody has to look for it
    [item] = intake.accepted
    assert (item.instance_id, [m.event for m in item.messages], item.history_size) == ("a", [start], 0)
    assert item.state.runtime_status == Status.PENDING and item.state.serialized_input == '"in"'
    assert await backend.lock_orchestration_work_items(10, LEASE) == []  # leased to the intake
    assert await backend.complete_orchestration_work_items([checkpoint_for(item)]) == [CommitResult.COMMITTED]
    state = await backend.get_instance("a")
    assert state is not None and state.runtime_status == Status.RUNNING
    assert len(await backend.get_history("a")) == len(checkpoint_for(item).new_history)

    await backend.create_instance(start_event("other", name="unknown"))  # not taken: for whoever looks
    await backend.create_instance(start_event("later"), scheduled_start_at=utc_now() + timedelta(hours=1))
    assert intake.offered == ["a", "other"]  # a start that is not due is never offered
    assert [i.instance_id for i in await backend.lock_orchestration_work_items(10, LEASE)] == ["other"]

    with pytest.raises(OrchestrationAlreadyExistsError):  # taken, then refused: the slot goes back
        await backend.create_instance(start_event("a"))
    assert (len(intake.accepted), intake.declined) == (1, 1)

    backend.detach_intake(intake)
    await backend.create_instance(start_event("b"))
    assert intake.offered[-1] == "a" and await lock_one(backend, "b")


async def test_an_instance_taken_by_an_intake_that_went_away_is_leased_again_when_its_lease_ends(
    backend: Backend,
) -> None:
    intake = _Intake(lease=timedelta(milliseconds=200))
    backend.attach_intake(intake)
    await backend.create_instance(start_event("a"))
    backend.detach_intake(intake)
    [taken] = intake.accepted
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    await asyncio.sleep(0.25)
    item = await lock_one(backend, "a")
    assert [m.event for m in item.messages] == [m.event for m in taken.messages]
    assert await backend.complete_orchestration_work_items([checkpoint_for(taken)]) == [CommitResult.LOST]


async def test_an_instance_whose_intake_can_no_longer_take_it_is_given_back_at_once(backend: Backend) -> None:
    intake = _Intake(lease=timedelta(hours=1), gone=True)
    backend.attach_intake(intake)
    await backend.create_instance(start_event("a"))
    backend.detach_intake(intake)
    [offered] = intake.accepted
    item = await lock_one(backend, "a")  # not after the hour's lease
    assert [m.event for m in item.messages] == [m.event for m in offered.messages]


@pytest.mark.parametrize("keep_lease", [False, True], ids=["released", "kept"])
async def test_an_event_sent_before_the_first_commit_of_an_instance_taken_by_an_intake_waits_for_the_next(
    backend: Backend, keep_lease: bool
) -> None:
    intake = _Intake()
    backend.attach_intake(intake)
    await backend.create_instance(start_event("a"))
    backend.detach_intake(intake)
    [item] = intake.accepted
    await backend.send_event("a", EventRaised(timestamp=utc_now(), name="meanwhile"))
    checkpoint = checkpoint_for(item, keep_lease_for=LEASE if keep_lease else None)
    # A lease is not kept while a message is due: the queue takes the instance over.
    assert await backend.complete_orchestration_work_items([checkpoint]) == [CommitResult.COMMITTED]
    following = await lock_one(backend, "a")
    assert [type(m.event) for m in following.messages] == [EventRaised]


# -- events -------------------------------------------------------------------------------------------


async def test_send_event_to_unknown_instance_raises(backend: Backend) -> None:
    with pytest.raises(OrchestrationNotFoundError):
        await backend.send_event("nobody", EventRaised(timestamp=utc_now(), name="x"))


async def test_events_to_an_ended_instance_are_dropped_except_rewind_of_a_failure(backend: Backend) -> None:
    await run_to(backend, "done", Status.COMPLETED)
    await backend.send_event("done", EventRaised(timestamp=utc_now(), name="late"))
    assert await backend.lock_orchestration_work_items(10, LEASE) == []

    details = FailureDetails(error_type="ValueError", message="boom")
    await run_to(backend, "failed", Status.FAILED, failure_details=details)
    await backend.send_event("failed", EventRaised(timestamp=utc_now(), name="late"))
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    rewind = ExecutionRewound(timestamp=utc_now(), reason="retry")
    await backend.send_event("failed", rewind)
    rewound = await backend.get_instance("failed")
    assert rewound is not None and rewound.runtime_status == Status.RUNNING  # delivery.status_on_delivery
    item = await lock_one(backend, "failed")
    assert [m.event for m in item.messages] == [rewind]
    assert item.state.failure_details == details


async def test_entities_take_requests_whatever_their_status(backend: Backend) -> None:
    signal = EntityOperationSignaled(
        timestamp=utc_now(), request_id="r1", operation="add", target_instance_id="@counter@a", input="1"
    )
    await backend.send_event("@counter@a", signal)
    [item] = await backend.lock_orchestration_work_items(10, LEASE, entities=True)
    # An empty entity is stored as COMPLETED; a new request makes it RUNNING again.
    assert await backend.complete_orchestration_work_items([checkpoint_for(item, status=Status.COMPLETED, history=[])])
    assert (await backend.get_instance("@counter@a")).runtime_status == Status.COMPLETED  # type: ignore[union-attr]
    await backend.send_event("@counter@a", signal)
    assert (await backend.get_instance("@counter@a")).runtime_status == Status.RUNNING  # type: ignore[union-attr]
    assert await backend.purge_instances(["@counter@a"]) == 0
    [item] = await backend.lock_orchestration_work_items(10, LEASE, entities=True)
    assert [m.event for m in item.messages] == [signal]


async def test_an_entity_request_to_an_ended_orchestration_is_dropped_like_any_late_event(backend: Backend) -> None:
    await run_to(backend, "done", Status.COMPLETED)
    stray = EntityOperationSignaled(
        timestamp=utc_now(), request_id="r1", operation="add", target_instance_id="done", input="1"
    )
    await backend.send_event("done", stray)
    state = await backend.get_instance("done")
    assert state is not None and state.runtime_status == Status.COMPLETED
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    assert await backend.purge_instances(["done"]) == 1


async def test_an_entity_left_empty_with_requests_waiting_stays_running(backend: Backend) -> None:
    def signal(request_id: str) -> EntityOperationSignaled:
        return EntityOperationSignaled(
            timestamp=utc_now(), request_id=request_id, operation="add", target_instance_id="@counter@a", input="1"
        )

    await backend.send_event("@counter@a", signal("r1"))
    [item] = await backend.lock_orchestration_work_items(10, LEASE, entities=True)
    late = signal("r2")
    await backend.send_event("@counter@a", late)  # arrives while the batch of r1 runs
    # The batch of r1 leaves the entity empty, which alone would store it as COMPLETED.
    assert await backend.complete_orchestration_work_items([checkpoint_for(item, status=Status.COMPLETED, history=[])])
    state = await backend.get_instance("@counter@a")
    assert state is not None and state.runtime_status == Status.RUNNING and state.completed_at is None
    assert await backend.purge_instances(["@counter@a"]) == 0  # clean_entity_storage would lose r2 otherwise
    [item] = await backend.lock_orchestration_work_items(10, LEASE, entities=True)
    assert [m.event for m in item.messages] == [late]
    assert await backend.complete_orchestration_work_items([checkpoint_for(item, status=Status.COMPLETED, history=[])])
    assert (await backend.get_instance("@counter@a")).runtime_status == Status.COMPLETED  # type: ignore[union-attr]
    assert await backend.purge_instances(["@counter@a"]) == 1


async def test_events_to_an_entity_create_it(backend: Backend) -> None:
    signal = EntityOperationSignaled(
        timestamp=utc_now(), request_id="r1", operation="add", target_instance_id="@counter@a", input="1"
    )
    await backend.send_event("@counter@a", signal)
    state = await backend.get_instance("@counter@a")
    assert state is not None and state.name == "counter"
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    items = await backend.lock_orchestration_work_items(10, LEASE, entities=True)
    assert [(i.instance_id, [m.event for m in i.messages]) for i in items] == [("@counter@a", [signal])]


async def test_messages_arriving_during_a_lease_stay_for_the_next_work_item(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a")
    late = EventRaised(timestamp=utc_now(), name="late", input="1")
    await backend.send_event("a", late)
    assert await backend.lock_orchestration_work_items(10, LEASE) == []  # still leased
    assert await backend.complete_orchestration_work_items([checkpoint_for(item)]) == [True]
    item = await lock_one(backend, "a")
    assert [m.event for m in item.messages] == [late]
    assert item.history_size == 2


# -- leases ---------------------------------------------------------------------------------------------


async def test_a_leased_instance_is_not_handed_out_twice(backend: Backend) -> None:
    for index in range(5):
        await backend.create_instance(start_event(f"i{index}"))
    first, second = await asyncio.gather(
        backend.lock_orchestration_work_items(3, LEASE), backend.lock_orchestration_work_items(3, LEASE)
    )
    ids = [i.instance_id for i in first + second]
    assert sorted(ids) == [f"i{index}" for index in range(5)]
    assert len(first) <= 3 and len(second) <= 3


async def test_an_expired_lease_is_taken_over_and_the_old_holder_cannot_commit(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    stale = await lock_one(backend, "a", lock_for=timedelta(milliseconds=100))
    await asyncio.sleep(0.2)
    fresh = await lock_one(backend, "a")
    assert fresh.lock_token != stale.lock_token

    results = await backend.complete_orchestration_work_items(
        [checkpoint_for(stale, status=Status.COMPLETED, output='"stale"')]
    )
    assert results == [False]
    state = await backend.get_instance("a")
    assert state is not None and state.runtime_status == Status.PENDING
    assert await backend.get_history("a") == []
    assert await backend.renew_orchestration_lease(stale, LEASE) is False
    assert await backend.complete_orchestration_work_items([checkpoint_for(fresh)]) == [True]


async def test_group_commit_skips_only_the_checkpoints_that_lost_their_lease(backend: Backend) -> None:
    for name in ("a", "b", "c"):
        await backend.create_instance(start_event(name))
    items = {i.instance_id: i for i in await backend.lock_orchestration_work_items(10, LEASE)}
    items["b"].lock_token = "not-the-token"
    results = await backend.complete_orchestration_work_items(
        [checkpoint_for(items[name], status=Status.COMPLETED) for name in ("a", "b", "c")]
    )
    assert results == [True, False, True]
    statuses = {name: (await backend.get_instance(name)).runtime_status for name in "abc"}  # type: ignore[union-attr]
    assert statuses == {"a": Status.COMPLETED, "b": Status.PENDING, "c": Status.COMPLETED}


async def test_renewing_a_lease_keeps_the_instance(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a", lock_for=timedelta(milliseconds=300))
    await asyncio.sleep(0.15)
    assert await backend.renew_orchestration_lease(item, timedelta(seconds=5)) is True
    await asyncio.sleep(0.25)
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    assert await backend.complete_orchestration_work_items([checkpoint_for(item)]) == [True]


async def test_abandon_releases_now_or_at_retry_time(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a")
    await backend.abandon_orchestration_work_item(item)
    again = await lock_one(backend, "a")
    assert [m.id for m in again.messages] == [m.id for m in item.messages]

    retry_at = utc_now() + timedelta(milliseconds=300)
    await backend.abandon_orchestration_work_item(again, retry_at=retry_at)
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    assert await backend.next_visible_at(WorkKind.ORCHESTRATION) == retry_at  # its messages wait for the lease
    await asyncio.sleep(0.35)
    await lock_one(backend, "a")


async def test_lock_returns_at_most_max_count(backend: Backend) -> None:
    for index in range(7):
        await backend.create_instance(start_event(f"i{index}"))
    assert len(await backend.lock_orchestration_work_items(4, LEASE)) == 4
    assert len(await backend.lock_orchestration_work_items(4, LEASE)) == 3


async def test_work_items_locked_together_each_have_a_token_of_their_own(backend: Backend) -> None:
    # A work item is known by its token (the sidecar assigns each to a worker by it).
    for index in range(3):
        await backend.create_instance(start_event(f"i{index}"))
    items = await backend.lock_orchestration_work_items(10, LEASE)
    assert len({item.lock_token for item in items}) == len(items) == 3
    tasks = [
        ActivityTask("i0", items[0].state.execution_id, TaskScheduled(event_id=n, timestamp=utc_now(), name="act"))
        for n in range(3)
    ]
    assert await backend.complete_orchestration_work_items([checkpoint_for(items[0], activity_tasks=tasks)]) == [True]
    locked = await backend.lock_activity_work_items(10, LEASE)
    assert len({task.lock_token for task in locked}) == len(locked) == 3


async def test_locks_can_be_restricted_to_names(backend: Backend) -> None:
    await backend.create_instance(start_event("a", name="alpha"))
    await backend.create_instance(start_event("b", name="beta"))
    assert await backend.lock_orchestration_work_items(10, LEASE, names=["gamma"]) == []
    items = await backend.lock_orchestration_work_items(10, LEASE, names=["beta", "gamma"])
    assert [i.instance_id for i in items] == ["b"]
    item = await lock_one(backend, "a")
    tasks = [
        ActivityTask("a", item.state.execution_id, TaskScheduled(event_id=n, timestamp=utc_now(), name=name))
        for n, name in ((1, "one"), (2, "two"))
    ]
    assert await backend.complete_orchestration_work_items([checkpoint_for(item, activity_tasks=tasks)]) == [True]
    assert await backend.lock_activity_work_items(10, LEASE, names=["three"]) == []
    [task] = await backend.lock_activity_work_items(10, LEASE, names=["two"])
    assert task.task.event.name == "two"


# -- checkpoints ---------------------------------------------------------------------------------------


async def test_checkpoint_writes_history_state_tasks_and_timers(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a")
    now = utc_now()
    scheduled = TaskScheduled(event_id=1, timestamp=now, name="act", input='"x"', tags={"k": "v"})
    fire_at = now + timedelta(milliseconds=300)
    timer = TimerFired(timestamp=fire_at, timer_id=2, fire_at=fire_at)
    history = [
        OrchestratorStarted(timestamp=now),
        item.messages[0].event,
        scheduled,
        OrchestratorCompleted(timestamp=now),
    ]
    checkpoint = checkpoint_for(
        item,
        history=history,
        custom_status='{"step":1}',
        activity_tasks=[ActivityTask("a", item.state.execution_id, scheduled)],
        messages=[OutboundMessage("a", timer, item.state.execution_id, visible_at=fire_at)],
    )
    assert await backend.complete_orchestration_work_items([checkpoint]) == [True]

    assert await backend.get_history("a") == history
    state = await backend.get_instance("a")
    assert state is not None
    assert state.runtime_status == Status.RUNNING
    assert state.serialized_custom_status == '{"step":1}'
    state = await backend.get_instance("a", fetch_payloads=False)
    assert state is not None and state.serialized_custom_status is None and state.serialized_input is None

    tasks = await backend.lock_activity_work_items(10, LEASE)
    assert [(t.task.instance_id, t.task.execution_id, t.task.event) for t in tasks] == [
        ("a", item.state.execution_id, scheduled)
    ]
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    assert await backend.next_visible_at(WorkKind.ORCHESTRATION) is not None
    await asyncio.sleep(0.35)
    item = await lock_one(backend, "a")
    assert [(m.event, m.execution_id) for m in item.messages] == [(timer, item.state.execution_id)]
    assert item.history_size == 4


async def test_completing_an_instance_stores_output_and_failure(backend: Backend) -> None:
    details = FailureDetails(
        error_type="ValueError",
        message="bad",
        stack_trace="trace",
        inner_failure=FailureDetails(error_type="KeyError", message="k"),
        is_non_retriable=True,
    )
    await run_to(backend, "a", Status.FAILED, failure_details=details)
    state = await backend.get_instance("a")
    assert state is not None
    assert state.runtime_status == Status.FAILED
    assert state.failure_details == details
    assert state.completed_at is not None

    await run_to(backend, "b", Status.COMPLETED, output='{"ok":true}')
    state = await backend.get_instance("b")
    assert state is not None and state.serialized_output == '{"ok":true}' and state.failure_details is None


async def test_replace_history_resets_the_execution(backend: Backend) -> None:
    await run_to(backend, "a", Status.RUNNING)
    assert len(await backend.get_history("a")) == 2
    await backend.send_event("a", EventRaised(timestamp=utc_now(), name="go"))
    item = await lock_one(backend, "a")
    restart = start_event("a", input='"gen2"')
    checkpoint = checkpoint_for(
        item,
        history=[],
        replace_history=True,
        execution_id=restart.instance.execution_id,
        input='"gen2"',
        messages=[OutboundMessage("a", restart, restart.instance.execution_id)],
    )
    assert await backend.complete_orchestration_work_items([checkpoint]) == [True]
    assert await backend.get_history("a") == []
    item = await lock_one(backend, "a")
    assert item.history_size == 0
    assert [m.event for m in item.messages] == [restart]
    assert item.state.execution_id == restart.instance.execution_id
    assert item.state.serialized_input == '"gen2"'


async def test_a_rewritten_history_that_counts_on_only_grows_in_size(backend: Backend) -> None:
    # A rewind rewrites an execution's history shorter: were its size to fall back to one a worker
    # cached before the failure, that worker would take its cached orchestration for the rewound one.
    await run_to(backend, "a", Status.RUNNING)
    await backend.send_event("a", EventRaised(timestamp=utc_now(), name="go"))
    item = await lock_one(backend, "a")
    assert item.history_size == 2
    kept = (await backend.get_history("a"))[:1]
    rewound = EventRaised(timestamp=utc_now(), name="rewound")
    checkpoint = checkpoint_for(item, history=[*kept, rewound], replace_history=True, counts_on=True)
    assert await backend.complete_orchestration_work_items([checkpoint]) == [True]
    assert await backend.get_history("a") == [*kept, rewound]
    await backend.send_event("a", EventRaised(timestamp=utc_now(), name="next"))
    item = await lock_one(backend, "a")
    assert item.history_size == 4  # 2, then 2 more: never 2 again
    assert item.state.execution_id == checkpoint.execution_id
    appended = EventRaised(timestamp=utc_now(), name="next")
    assert await backend.complete_orchestration_work_items([checkpoint_for(item, history=[appended])]) == [True]
    assert await backend.get_history("a") == [*kept, rewound, appended]


async def test_a_message_says_when_it_became_visible(backend: Backend) -> None:
    await run_to(backend, "a", Status.RUNNING)
    before = backend.now()
    await backend.send_event("a", EventRaised(timestamp=before - timedelta(hours=1), name="go"))
    item = await lock_one(backend, "a")
    (message,) = item.messages
    assert message.visible_at is not None
    assert abs((message.visible_at - before).total_seconds()) < 5  # when written, not its event's moment


async def test_messages_to_other_instances_follow_the_delivery_rules(backend: Backend) -> None:
    await run_to(backend, "target", Status.RUNNING)
    await run_to(backend, "ended", Status.COMPLETED)
    await backend.create_instance(start_event("parent"))
    item = await lock_one(backend, "parent")
    now = utc_now()
    raised = EventRaised(timestamp=now, name="hello", input='"hi"')
    child = start_event("child", name="sub", parent=ParentInstance(instance_id="parent", task_scheduled_id=3))
    duplicate = start_event("target", name="sub", parent=ParentInstance(instance_id="parent", task_scheduled_id=4))
    checkpoint = checkpoint_for(
        item,
        messages=[
            OutboundMessage("target", raised),
            OutboundMessage("missing", raised),
            OutboundMessage("ended", raised),
            OutboundMessage("child", child),
            OutboundMessage("target", duplicate),
        ],
    )
    assert await backend.complete_orchestration_work_items([checkpoint]) == [True]

    assert await backend.get_instance("missing") is None
    items = {i.instance_id: i for i in await backend.lock_orchestration_work_items(10, LEASE)}
    assert set(items) == {"target", "child", "parent"}
    assert [m.event for m in items["target"].messages] == [raised]
    assert [m.event for m in items["child"].messages] == [child]
    assert items["child"].state.runtime_status == Status.PENDING
    assert items["child"].state.parent_instance_id == "parent"
    assert items["child"].state.name == "sub"
    refusal = items["parent"].messages[0].event
    assert isinstance(refusal, SubOrchestrationInstanceFailed)
    assert refusal.task_scheduled_id == 4
    assert "already exists" in refusal.failure_details.message


async def test_a_start_message_replaces_an_ended_child(backend: Backend) -> None:
    await run_to(backend, "child", Status.FAILED)
    await backend.create_instance(start_event("parent"))
    item = await lock_one(backend, "parent")
    child = start_event("child", name="sub", parent=ParentInstance(instance_id="parent", task_scheduled_id=1))
    assert await backend.complete_orchestration_work_items(
        [checkpoint_for(item, messages=[OutboundMessage("child", child)])]
    )
    state = await backend.get_instance("child")
    assert state is not None
    assert state.runtime_status == Status.PENDING and state.execution_id == child.instance.execution_id
    assert await backend.get_history("child") == []


# -- eager activities: leased tasks and kept leases ------------------------------------------------------------


async def test_a_checkpoint_can_keep_its_lease_and_queue_a_leased_task(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a")
    scheduled = TaskScheduled(event_id=1, timestamp=utc_now(), name="act")
    task = ActivityTask("a", item.state.execution_id, scheduled, lock_token="eager-1", locked_until=utc_now() + LEASE)
    checkpoint = checkpoint_for(item, activity_tasks=[task], keep_lease_for=LEASE)
    assert await backend.complete_orchestration_work_items([checkpoint]) == [CommitResult.LEASE_KEPT]
    assert await backend.lock_activity_work_items(10, LEASE) == []  # the task is leased already
    await backend.send_event("a", EventRaised(timestamp=utc_now(), name="meanwhile"))
    assert await backend.lock_orchestration_work_items(10, LEASE) == []  # the instance too

    # The eager task's result goes into the history directly; its task is deleted.
    eager = ActivityWorkItem(None, "eager-1", utc_now() + LEASE, task)
    assert await backend.renew_activity_lease(eager, LEASE)
    done = TaskCompleted(timestamp=utc_now(), task_scheduled_id=1, result='"r"')
    follow_up = checkpoint_for(
        item, history=[OrchestratorStarted(timestamp=utc_now()), done], consumed=[], keep_lease_for=LEASE
    )
    follow_up.finished_tasks.append("eager-1")
    # A message is waiting, so the lease is released rather than kept.
    assert await backend.complete_orchestration_work_items([follow_up]) == [CommitResult.COMMITTED]
    assert (await backend.get_history("a"))[-1] == done
    assert await backend.complete_activity_work_items([ActivityResult(eager, done)]) == [False]  # task gone
    item = await lock_one(backend, "a")
    assert [type(m.event).__name__ for m in item.messages] == ["EventRaised"]


@pytest.mark.parametrize("taken_meanwhile", [False, True], ids=["still leased", "taken by another worker"])
async def test_a_step_that_finishes_an_eager_task_and_queues_the_next_stores_that_one_once(
    backend: Backend, taken_meanwhile: bool
) -> None:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a")
    first = ActivityTask(
        "a",
        item.state.execution_id,
        TaskScheduled(event_id=1, timestamp=utc_now(), name="first"),
        lock_token="eager-1",
        locked_until=utc_now() + (timedelta(milliseconds=100) if taken_meanwhile else LEASE),
    )
    assert await backend.complete_orchestration_work_items(
        [checkpoint_for(item, activity_tasks=[first], keep_lease_for=LEASE)]
    ) == [CommitResult.LEASE_KEPT]
    if taken_meanwhile:  # its lease expired, and another worker took the task
        await asyncio.sleep(0.15)
        [taken] = await backend.lock_activity_work_items(10, LEASE)
        assert taken.lock_token != "eager-1"

    second = ActivityTask(
        "a",
        item.state.execution_id,
        TaskScheduled(event_id=2, timestamp=utc_now(), name="second"),
        lock_token="eager-2",
        locked_until=utc_now() + LEASE,
    )
    done = TaskCompleted(timestamp=utc_now(), task_scheduled_id=1, result='"r"')
    step = checkpoint_for(
        item,
        history=[OrchestratorStarted(timestamp=utc_now()), done, second.event],
        consumed=[],
        activity_tasks=[second],
        keep_lease_for=LEASE,
    )
    step.finished_tasks.append("eager-1")
    assert await backend.complete_orchestration_work_items([step]) == [CommitResult.LEASE_KEPT]

    finished = ActivityWorkItem(None, "eager-1", utc_now() + LEASE, first)
    assert await backend.complete_activity_work_items([ActivityResult(finished, done)]) == [False]  # gone
    queued = ActivityWorkItem(None, "eager-2", utc_now() + LEASE, second)
    assert await backend.renew_activity_lease(queued, LEASE)
    await backend.abandon_activity_work_item(queued)
    assert [task.task.event.name for task in await backend.lock_activity_work_items(10, LEASE)] == ["second"]


async def test_an_eager_task_falls_back_on_the_queue(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a")
    scheduled = TaskScheduled(event_id=1, timestamp=utc_now(), name="act")
    task = ActivityTask(
        "a", item.state.execution_id, scheduled, lock_token="eager-2", locked_until=utc_now() + timedelta(seconds=5)
    )
    checkpoint = checkpoint_for(item, activity_tasks=[task], keep_lease_for=LEASE)
    assert await backend.complete_orchestration_work_items([checkpoint]) == [CommitResult.LEASE_KEPT]
    eager = ActivityWorkItem(None, "eager-2", utc_now(), task)
    failure = FailureDetails(error_type="E", message="m")
    result = TaskFailed(timestamp=utc_now(), task_scheduled_id=1, failure_details=failure)
    assert await backend.complete_activity_work_items([ActivityResult(eager, result)]) == [True]
    # The orchestration lease was kept: the result waits in the inbox until it ends.
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    await backend.abandon_orchestration_work_item(item)
    item = await lock_one(backend, "a")
    assert [m.event for m in item.messages] == [result]


async def test_an_eager_task_whose_lease_expires_goes_to_another_worker(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a")
    scheduled = TaskScheduled(event_id=1, timestamp=utc_now(), name="act")
    short = utc_now() + timedelta(milliseconds=100)
    task = ActivityTask("a", item.state.execution_id, scheduled, lock_token="eager-3", locked_until=short)
    assert await backend.complete_orchestration_work_items([checkpoint_for(item, activity_tasks=[task])]) == [
        CommitResult.COMMITTED
    ]
    assert await backend.lock_activity_work_items(10, LEASE) == []
    await asyncio.sleep(0.15)
    [taken] = await backend.lock_activity_work_items(10, LEASE)
    assert taken.task.event == scheduled and taken.lock_token != "eager-3" and taken.dequeue_count == 2
    stale = ActivityWorkItem(None, "eager-3", short, task)
    assert await backend.renew_activity_lease(stale, LEASE) is False
    done = TaskCompleted(timestamp=utc_now(), task_scheduled_id=1)
    assert await backend.complete_activity_work_items([ActivityResult(stale, done)]) == [False]
    assert await backend.complete_activity_work_items([ActivityResult(taken, done)]) == [True]


async def test_a_kept_lease_stays_while_only_later_messages_wait(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    item = await lock_one(backend, "a")
    due = utc_now() + timedelta(milliseconds=300)
    timer = OutboundMessage("a", TimerFired(timestamp=due, timer_id=1, fire_at=due), visible_at=due)
    checkpoint = checkpoint_for(item, messages=[timer], keep_lease_for=LEASE)
    assert await backend.complete_orchestration_work_items([checkpoint]) == [CommitResult.LEASE_KEPT]
    follow_up = checkpoint_for(item, history=[], consumed=[], keep_lease_for=LEASE)
    assert await backend.complete_orchestration_work_items([follow_up]) == [CommitResult.LEASE_KEPT]
    await asyncio.sleep(0.35)
    # The timer is due now: keeping the lease would hide it, so the lease goes.
    assert await backend.complete_orchestration_work_items([follow_up]) == [CommitResult.COMMITTED]
    item = await lock_one(backend, "a")
    assert [m.event for m in item.messages] == [timer.event]


async def test_a_lost_checkpoint_consumes_nothing_even_if_its_batch_writes_to_its_instance(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    stale = await lock_one(backend, "a", lock_for=timedelta(milliseconds=100))
    await asyncio.sleep(0.15)
    current = await lock_one(backend, "a")
    await backend.create_instance(start_event("b"))
    sender = await lock_one(backend, "b")
    later = OutboundMessage("a", EventRaised(timestamp=utc_now(), name="later"), visible_at=utc_now() + LEASE)
    results = await backend.complete_orchestration_work_items(
        [checkpoint_for(stale), checkpoint_for(sender, messages=[later])]
    )
    assert results == [CommitResult.LOST, CommitResult.COMMITTED]
    # The start message is still there and still visible: once the lease is given back,
    # the instance is ready at once, not when the later message is due.
    await backend.abandon_orchestration_work_item(current)
    item = await lock_one(backend, "a")
    assert [type(m.event).__name__ for m in item.messages] == ["ExecutionStarted"]


async def test_messages_to_an_instance_keep_it_ready_from_the_earliest_one(backend: Backend) -> None:
    await run_to(backend, "a", Status.RUNNING)
    now = utc_now()
    await backend.send_event("a", EventRaised(timestamp=now, name="later"), visible_at=now + LEASE)
    await backend.send_event("a", EventRaised(timestamp=now, name="soon"), visible_at=now + timedelta(milliseconds=200))
    await backend.send_event("a", EventRaised(timestamp=now, name="latest"), visible_at=now + 2 * LEASE)
    next_due = await backend.next_visible_at(WorkKind.ORCHESTRATION)
    assert next_due is not None and abs((next_due - (now + timedelta(milliseconds=200))).total_seconds()) < 0.01
    await asyncio.sleep(0.25)
    item = await lock_one(backend, "a")
    assert [m.event.name for m in item.messages] == ["soon"]  # type: ignore[attr-defined]
    assert await backend.complete_orchestration_work_items([checkpoint_for(item)]) == [CommitResult.COMMITTED]
    next_due = await backend.next_visible_at(WorkKind.ORCHESTRATION)
    assert next_due is not None and abs((next_due - (now + LEASE)).total_seconds()) < 0.01


# -- activities -----------------------------------------------------------------------------------------


async def _with_activity(backend: Backend, instance_id: str = "a") -> tuple[OrchestrationWorkItem, TaskScheduled]:
    await backend.create_instance(start_event(instance_id))
    item = await lock_one(backend, instance_id)
    scheduled = TaskScheduled(event_id=5, timestamp=utc_now(), name="act", input='"x"')
    checkpoint = checkpoint_for(item, activity_tasks=[ActivityTask(instance_id, item.state.execution_id, scheduled)])
    assert await backend.complete_orchestration_work_items([checkpoint]) == [True]
    return item, scheduled


async def test_activity_completion_delivers_the_result_to_its_execution(backend: Backend) -> None:
    item, scheduled = await _with_activity(backend)
    [task] = await backend.lock_activity_work_items(10, LEASE)
    assert task.dequeue_count == 1
    assert task.task.event == scheduled
    assert await backend.lock_activity_work_items(10, LEASE) == []
    result = TaskCompleted(timestamp=utc_now(), task_scheduled_id=5, result='"done"')
    assert await backend.complete_activity_work_items([ActivityResult(task, result)]) == [True]
    assert await backend.lock_activity_work_items(10, LEASE) == []

    orchestration = await lock_one(backend, "a")
    assert [(m.event, m.execution_id) for m in orchestration.messages] == [(result, item.state.execution_id)]


async def test_activity_lease_loss_and_abandon(backend: Backend) -> None:
    await _with_activity(backend)
    [stale] = await backend.lock_activity_work_items(10, timedelta(milliseconds=100))
    await asyncio.sleep(0.2)
    [fresh] = await backend.lock_activity_work_items(10, LEASE)
    assert fresh.dequeue_count == 2
    failure = TaskFailed(
        timestamp=utc_now(), task_scheduled_id=5, failure_details=FailureDetails(error_type="E", message="m")
    )
    assert await backend.complete_activity_work_items([ActivityResult(stale, failure)]) == [False]
    assert await backend.renew_activity_lease(stale, LEASE) is False
    assert await backend.renew_activity_lease(fresh, LEASE) is True

    await backend.abandon_activity_work_item(fresh, retry_at=utc_now() + timedelta(milliseconds=300))
    assert await backend.lock_activity_work_items(10, LEASE) == []
    assert await backend.next_visible_at(WorkKind.ACTIVITY) is not None
    await asyncio.sleep(0.35)
    [again] = await backend.lock_activity_work_items(10, LEASE)
    assert again.dequeue_count == 3
    assert await backend.complete_activity_work_items([ActivityResult(again, failure)]) == [True]
    orchestration = await lock_one(backend, "a")
    assert [m.event for m in orchestration.messages] == [failure]


async def test_activity_results_for_a_replaced_instance_are_not_delivered_to_the_new_one(backend: Backend) -> None:
    await _with_activity(backend)
    [task] = await backend.lock_activity_work_items(10, LEASE)
    await backend.create_instance(start_event("a"), reuse_policy=OrchestrationIdReusePolicy.of(Status.RUNNING))
    result = TaskCompleted(timestamp=utc_now(), task_scheduled_id=5, result='"late"')
    # The task was removed with the old execution, so its completion finds no lease.
    assert await backend.complete_activity_work_items([ActivityResult(task, result)]) == [False]
    item = await lock_one(backend, "a")
    assert [type(m.event).__name__ for m in item.messages] == ["ExecutionStarted"]


# -- queries and purge -----------------------------------------------------------------------------------


async def test_query_filters_and_pages(backend: Backend) -> None:
    await run_to(backend, "done-1", Status.COMPLETED)
    await run_to(backend, "done-2", Status.COMPLETED)
    await run_to(backend, "run-1", Status.RUNNING)
    before = utc_now()
    await asyncio.sleep(0.01)
    await backend.create_instance(start_event("new-1"))
    await backend.send_event("@counter@x", EventRaised(timestamp=utc_now(), name="op"))

    everything = await backend.query_instances(OrchestrationQuery(max_instance_count=100))
    assert [s.instance_id for s in everything.items] == ["done-1", "done-2", "run-1", "new-1"]
    assert everything.continuation_token is None
    assert everything.items[0].serialized_input is None
    for huge in (sys.maxsize, 2**100):  # any page size larger than every match
        assert await backend.query_instances(OrchestrationQuery(max_instance_count=huge)) == everything

    completed = await backend.query_instances(OrchestrationQuery(runtime_status=[Status.COMPLETED]))
    assert [s.instance_id for s in completed.items] == ["done-1", "done-2"]
    prefixed = await backend.query_instances(
        OrchestrationQuery(instance_id_prefix="run-", fetch_inputs_and_outputs=True)
    )
    assert [(s.instance_id, s.serialized_input) for s in prefixed.items] == [("run-1", '"in"')]
    recent = await backend.query_instances(OrchestrationQuery(created_time_from=before))
    assert [s.instance_id for s in recent.items] == ["new-1"]
    older = await backend.query_instances(OrchestrationQuery(created_time_to=before))
    assert [s.instance_id for s in older.items] == ["done-1", "done-2", "run-1"]
    ended = await backend.query_instances(OrchestrationQuery(completed_time_from=before - timedelta(minutes=1)))
    assert [s.instance_id for s in ended.items] == ["done-1", "done-2"]

    pages: list[list[str]] = []
    token = None
    while True:
        page = await backend.query_instances(OrchestrationQuery(max_instance_count=3), token)
        pages.append([s.instance_id for s in page.items])
        token = page.continuation_token
        if token is None:
            break
    assert pages == [["done-1", "done-2", "run-1"], ["new-1"]]

    entities = await backend.query_instances(OrchestrationQuery(), entities=True)
    assert [s.instance_id for s in entities.items] == ["@counter@x"]

    touched_after = utc_now()
    await asyncio.sleep(0.01)
    await backend.send_event("run-1", EventRaised(timestamp=utc_now(), name="poke"))
    running = await lock_one(backend, "run-1")
    assert await backend.complete_orchestration_work_items([checkpoint_for(running)]) == [True]
    updated = await backend.query_instances(OrchestrationQuery(last_updated_time_from=touched_after))
    assert [s.instance_id for s in updated.items] == ["run-1"]
    not_updated = await backend.query_instances(OrchestrationQuery(last_updated_time_to=touched_after))
    assert [s.instance_id for s in not_updated.items] == ["done-1", "done-2", "new-1"]


@pytest.mark.parametrize("token", ["nope", "yesterday|run-1", "2026-12-07T10:00:00|run-1", "|"])
async def test_a_continuation_token_no_page_gave_is_refused(backend: Backend, token: str) -> None:
    await run_to(backend, "run-1", Status.RUNNING)
    with pytest.raises(ConfigurationError, match="Invalid continuation token"):
        await backend.query_instances(OrchestrationQuery(), token)
    assert [s.instance_id for s in (await backend.query_instances(OrchestrationQuery())).items] == ["run-1"]


async def test_purge_removes_only_ended_instances(backend: Backend) -> None:
    await run_to(backend, "done", Status.COMPLETED)
    await run_to(backend, "running", Status.RUNNING)
    assert await backend.purge_instances(["done", "running", "missing"]) == 1
    assert await backend.get_instance("done") is None
    assert await backend.get_history("done") == []
    assert await backend.get_instance("running") is not None


async def test_history_of_unknown_instance_is_empty(backend: Backend) -> None:
    assert await backend.get_history("nobody") == []
    assert await backend.get_instance("nobody") is None


# -- waiting -------------------------------------------------------------------------------------------------


async def test_wait_for_instance_wakes_on_commit_and_times_out(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    assert await backend.wait_for_instance("nobody", lambda s: True, 1) is None
    with pytest.raises(TimeoutError):
        await backend.wait_for_instance("a", lambda s: s.runtime_status.is_terminal, 0.2)

    async def finish() -> None:
        await asyncio.sleep(0.05)
        item = await lock_one(backend, "a")
        history = [*checkpoint_for(item).new_history, ExecutionCompleted(timestamp=utc_now(), status=Status.COMPLETED)]
        await backend.complete_orchestration_work_items(
            [checkpoint_for(item, status=Status.COMPLETED, history=history)]
        )

    finisher = asyncio.create_task(finish())
    state = await backend.wait_for_instance("a", lambda s: s.runtime_status.is_terminal, 5)
    await finisher
    assert state is not None and state.runtime_status == Status.COMPLETED


async def test_a_waiter_reads_only_when_a_commit_may_have_ended_its_wait_and_is_handed_the_ended_state(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.create_instance(start_event("a"))
    reads: list[Status] = []
    get_instance = backend.get_instance

    async def counted(instance_id: str, *, fetch_payloads: bool = True) -> OrchestrationState | None:
        state = await get_instance(instance_id, fetch_payloads=fetch_payloads)
        reads.append(state.runtime_status if state is not None else Status.PENDING)
        return state

    monkeypatch.setattr(backend, "get_instance", counted)
    if hasattr(backend, "_watch_round"):  # the SQL backends' watch for other processes' commits reads too
        monkeypatch.setattr(backend, "_watch_round", lambda: None)
    waiting = asyncio.create_task(
        backend.wait_for_instance(
            "a", lambda s: s.runtime_status.is_terminal, 5, may_satisfy=lambda status: status.is_terminal
        )
    )
    without_payloads = asyncio.create_task(
        backend.wait_for_instance("a", lambda s: s.runtime_status.is_terminal, 5, fetch_payloads=False)
    )
    await asyncio.sleep(0.05)
    assert reads == [Status.PENDING]  # the one told what may end its wait took the creation's PENDING as read
    item = await lock_one(backend, "a")
    wake_ups: list[object] = []
    resolve = signals._resolve

    def counted_resolve(future: asyncio.Future[None]) -> None:
        wake_ups.append(future)
        resolve(future)

    monkeypatch.setattr(signals, "_resolve", counted_resolve)
    await backend.complete_orchestration_work_items([checkpoint_for(item, keep_lease_for=LEASE)])  # now RUNNING
    await asyncio.sleep(0.1)
    assert len(reads) == 2  # the waiter that may be satisfied by any status read; the other did not
    assert len(wake_ups) == 1  # nor was it woken: RUNNING cannot end its wait
    history = [ExecutionCompleted(timestamp=utc_now(), status=Status.COMPLETED)]
    done = checkpoint_for(item, status=Status.COMPLETED, history=history, consumed=[])
    done.output = '"out"'
    await backend.complete_orchestration_work_items([done])
    state = await waiting
    assert state is not None and state.runtime_status == Status.COMPLETED
    assert len(reads) == 2  # the commit that ended it handed the waiters the state it wrote
    assert state == await get_instance("a")  # the same as a read
    bare = await without_payloads
    assert bare == await get_instance("a", fetch_payloads=False) and bare is not None
    assert bare.serialized_output is None and state.serialized_output == '"out"'


async def test_a_wait_reads_what_this_object_changed_only_just_before_it_began(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    get_instance = backend.get_instance

    async def counted(instance_id: str, *, fetch_payloads: bool = True) -> OrchestrationState | None:
        reads.append(instance_id)
        return await get_instance(instance_id, fetch_payloads=fetch_payloads)

    async def reads_on_waiting(instance_id: str) -> list[str]:
        waiting = asyncio.create_task(
            backend.wait_for_instance(
                instance_id, lambda s: s.runtime_status.is_terminal, 5, may_satisfy=lambda status: status.is_terminal
            )
        )
        await asyncio.sleep(0.05)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        return reads

    clock = _Clock()
    monkeypatch.setattr(signals, "time", clock)
    monkeypatch.setattr(backend, "get_instance", counted)
    if hasattr(backend, "_watch_round"):  # the SQL backends' watch for other processes' commits reads too
        monkeypatch.setattr(backend, "_watch_round", lambda: None)
    await backend.create_instance(start_event("a"))
    assert await reads_on_waiting("a") == []  # PENDING, as the creation just left it, cannot end the wait
    clock.now += signals.RECENT_HINT_SECONDS
    assert await reads_on_waiting("a") == ["a"]  # too old to go by: another process may have changed it since

    await run_to(backend, "b", Status.COMPLETED)
    state = await backend.wait_for_instance(
        "b", lambda s: s.runtime_status.is_terminal, 1, may_satisfy=lambda status: status.is_terminal
    )
    assert reads == ["a", "b"]  # what may end the wait is read, never taken from memory
    assert state is not None and state.runtime_status == Status.COMPLETED


class _Clock:
    """A stand-in for the ``time`` module whose monotonic clock moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def test_an_event_that_changes_the_status_wakes_the_waiters_of_that_status(backend: Backend) -> None:
    await run_to(backend, "failed", Status.FAILED)
    waiting = asyncio.create_task(backend.wait_for_instance("failed", lambda s: s.runtime_status == Status.RUNNING, 10))
    await asyncio.sleep(0.05)
    await backend.send_event("failed", ExecutionRewound(timestamp=utc_now(), reason="retry"))
    state = await asyncio.wait_for(waiting, 0.5)  # woken, not found by a poll (every second or more)
    assert state is not None and state.runtime_status == Status.RUNNING


async def test_a_wait_is_not_ended_by_the_late_news_of_a_commit_older_than_the_wait(backend: Backend) -> None:
    """A commit's waiters are woken after the commit, on its thread: a rewind can come in between."""
    await run_to(backend, "failed", Status.FAILED)
    failed = await backend.get_instance("failed")
    await backend.send_event("failed", ExecutionRewound(timestamp=utc_now(), reason="retry"))
    waiting = asyncio.create_task(
        backend.wait_for_instance(
            "failed", lambda s: s.runtime_status.is_terminal, 0.3, may_satisfy=lambda status: status.is_terminal
        )
    )
    await asyncio.sleep(0.05)
    backend._notify_instance("failed", failed)  # the failing commit's news, late
    with pytest.raises(TimeoutError):  # it reads the instance instead: RUNNING since the rewind
        await waiting


async def test_subscribers_are_woken_by_new_work(backend: Backend) -> None:
    with (
        backend.subscribe(WorkKind.ORCHESTRATION) as orchestrations,
        backend.subscribe(WorkKind.ACTIVITY) as activities,
    ):
        orchestrations.clear()
        activities.clear()
        await backend.create_instance(start_event("a"))
        assert await orchestrations.wait(2) is True
        item = await lock_one(backend, "a")
        scheduled = TaskScheduled(event_id=1, timestamp=utc_now(), name="act")
        await backend.complete_orchestration_work_items(
            [checkpoint_for(item, activity_tasks=[ActivityTask("a", item.state.execution_id, scheduled)])]
        )
        assert await activities.wait(2) is True


async def test_timestamps_are_timezone_aware(backend: Backend) -> None:
    await run_to(backend, "a", Status.COMPLETED)
    state = await backend.get_instance("a")
    assert state is not None
    for moment in (state.created_at, state.last_updated_at, state.completed_at):
        assert isinstance(moment, datetime) and moment.tzinfo is not None
    for event in await backend.get_history("a"):
        assert event.timestamp.tzinfo is not None


# -- ordering, replacement and clean-up (added with the SQL backends) -------------------------------------


async def test_history_grows_episode_by_episode_in_order(backend: Backend) -> None:
    await backend.create_instance(start_event("a"))
    expected = []
    for episode in range(3):
        if episode:
            await backend.send_event("a", EventRaised(timestamp=utc_now(), name=f"e{episode}"))
        item = await lock_one(backend, "a")
        assert item.history_size == len(expected)
        checkpoint = checkpoint_for(item)
        expected += checkpoint.new_history
        assert await backend.complete_orchestration_work_items([checkpoint]) == [True]
    assert await backend.get_history("a") == expected


async def test_a_group_commit_applies_its_checkpoints_in_order(backend: Backend) -> None:
    await backend.create_instance(start_event("ending"))
    await backend.create_instance(start_event("sender"))
    items = {i.instance_id: i for i in await backend.lock_orchestration_work_items(10, LEASE)}
    late = OutboundMessage("ending", EventRaised(timestamp=utc_now(), name="too-late"))
    results = await backend.complete_orchestration_work_items(
        [
            checkpoint_for(items["ending"], status=Status.COMPLETED),
            checkpoint_for(items["sender"], messages=[late]),
        ]
    )
    assert results == [True, True]
    assert await backend.lock_orchestration_work_items(10, LEASE) == []  # "ending" had ended: dropped


async def test_replacing_or_purging_an_instance_removes_its_tasks_and_messages(backend: Backend) -> None:
    await backend.create_instance(start_event("purged"))
    item = await lock_one(backend, "purged")
    scheduled = TaskScheduled(event_id=1, timestamp=utc_now(), name="act")
    timer = OutboundMessage("purged", EventRaised(timestamp=utc_now(), name="later"), visible_at=utc_now())
    checkpoint = checkpoint_for(
        item,
        status=Status.COMPLETED,
        activity_tasks=[ActivityTask("purged", item.state.execution_id, scheduled)],
        messages=[timer],
    )
    assert await backend.complete_orchestration_work_items([checkpoint]) == [True]
    assert await backend.purge_instances(["purged"]) == 1
    assert await backend.lock_activity_work_items(10, LEASE) == []
    assert await backend.lock_orchestration_work_items(10, LEASE) == []

    await _with_activity(backend, "replaced")
    await backend.create_instance(start_event("replaced"), reuse_policy=OrchestrationIdReusePolicy.of(Status.RUNNING))
    assert await backend.lock_activity_work_items(10, LEASE) == []
    [item] = await backend.lock_orchestration_work_items(10, LEASE)
    assert [type(m.event).__name__ for m in item.messages] == ["ExecutionStarted"]


async def test_terminating_drops_the_tasks_no_worker_holds_and_leaves_a_held_one(backend: Backend) -> None:
    """Queued, or given back to run later: not begun; held by a lease: left to its worker."""
    for instance_id in ("queued", "put-off", "held"):
        await _with_activity(backend, instance_id)
    tasks = {task.task.instance_id: task for task in await backend.lock_activity_work_items(10, LEASE)}
    await backend.abandon_activity_work_item(tasks["queued"])
    await backend.abandon_activity_work_item(tasks["put-off"], retry_at=utc_now() + timedelta(milliseconds=300))
    for instance_id in ("queued", "put-off", "held"):  # a work item for each
        await backend.send_event(instance_id, EventRaised(timestamp=utc_now(), name="poke"))
    items = await backend.lock_orchestration_work_items(10, LEASE)
    checkpoints = [checkpoint_for(item, status=Status.TERMINATED) for item in items]
    assert await backend.complete_orchestration_work_items(checkpoints) == [True] * 3
    await asyncio.sleep(0.4)  # past the put-off task's time: it is gone too
    assert await backend.lock_activity_work_items(10, LEASE) == []
    assert await backend.renew_activity_lease(tasks["held"], LEASE) is True


async def test_an_event_sent_for_later_waits_until_then(backend: Backend) -> None:
    assert await backend.next_visible_at(WorkKind.ORCHESTRATION) is None
    assert await backend.next_visible_at(WorkKind.ACTIVITY) is None
    await run_to(backend, "a", Status.RUNNING)
    due = utc_now() + timedelta(milliseconds=300)
    later = EventRaised(timestamp=utc_now(), name="later")
    await backend.send_event("a", later, visible_at=due)
    assert await backend.lock_orchestration_work_items(10, LEASE) == []
    next_due = await backend.next_visible_at(WorkKind.ORCHESTRATION)
    assert next_due is not None and abs((next_due - due).total_seconds()) < 0.01
    await asyncio.sleep(0.35)
    item = await lock_one(backend, "a")
    assert [m.event for m in item.messages] == [later]


async def test_the_moments_of_work_sent_for_later_that_a_backend_remembers_stay_bounded(backend: Backend) -> None:
    # A client process sends work for later and runs no dispatcher to take the moments out.
    await run_to(backend, "a", Status.RUNNING)
    now = utc_now()
    moments = [now + timedelta(hours=1, seconds=-index) for index in range(2500)]  # each the earliest yet
    for batch in range(0, len(moments), 500):
        later = EventRaised(timestamp=now, name="later")
        await asyncio.gather(*(backend.send_event("a", later, visible_at=m) for m in moments[batch : batch + 500]))
    assert backend.local_due(WorkKind.ORCHESTRATION) == moments[-1]
    assert len(backend._delayed[WorkKind.ORCHESTRATION]) <= 2000
