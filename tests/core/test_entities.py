"""Entity batches: scheduling against the lock, and the checkpoint they produce."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from durabletask.entities import EntityInstanceId as SdkEntityInstanceId

from dtfx.core.entities import (
    BatchResult,
    EntityInstanceId,
    EntitySchedulerState,
    OperationResult,
    SignalEntity,
    StartOrchestration,
    apply_batch,
    decode_scheduler_state,
    encode_scheduler_state,
    entity_id_text,
    plan_batch,
)
from dtfx.core.history import (
    EntityLockGranted,
    EntityLockRequested,
    EntityOperationCalled,
    EntityOperationCompleted,
    EntityOperationFailed,
    EntityOperationSignaled,
    EntityUnlockSent,
    ExecutionStarted,
    FailureDetails,
    HistoryEvent,
    OrchestrationStatus,
)
from dtfx.core.state import OrchestrationState
from dtfx.core.workitems import InboxMessage, OrchestrationWorkItem

NOW = datetime(2026, 4, 1, tzinfo=UTC)
ENTITY = "@counter@k"


def item(
    *events: HistoryEvent, scheduler: EntitySchedulerState | None = None, state: str | None = None
) -> OrchestrationWorkItem:
    stored = OrchestrationState(
        instance_id=ENTITY,
        name="counter",
        runtime_status=OrchestrationStatus.RUNNING,
        created_at=NOW,
        last_updated_at=NOW,
        serialized_output=state,
        serialized_custom_status=encode_scheduler_state(scheduler) if scheduler else None,
    )
    messages = [InboxMessage(index, event) for index, event in enumerate(events)]
    return OrchestrationWorkItem(ENTITY, "token", NOW, stored, messages, 0)


def signal(op: str = "add", request_id: str = "s") -> EntityOperationSignaled:
    return EntityOperationSignaled(
        timestamp=NOW, request_id=request_id, operation=op, target_instance_id=ENTITY, input="1"
    )


def call(owner: str, request_id: str = "c") -> EntityOperationCalled:
    return EntityOperationCalled(
        timestamp=NOW, request_id=request_id, operation="get", target_instance_id=ENTITY, parent_instance_id=owner
    )


def lock_request(owner: str, lock_set: list[str], position: int = 0, section: str = "cs") -> EntityLockRequested:
    return EntityLockRequested(
        timestamp=NOW, critical_section_id=section, lock_set=lock_set, position=position, parent_instance_id=owner
    )


def unlock(owner: str, section: str = "cs") -> EntityUnlockSent:
    return EntityUnlockSent(
        timestamp=NOW, critical_section_id=section, parent_instance_id=owner, target_instance_id=ENTITY
    )


def test_operations_run_in_arrival_order() -> None:
    first, second = signal(request_id="1"), call("o", request_id="2")
    plan = plan_batch(item(first, second), NOW)
    assert plan.operations == [first, second] and plan.scheduler.is_empty and plan.consumed == [0, 1]


def test_a_lock_request_is_passed_on_then_granted_by_the_last_entity() -> None:
    lock_set = [ENTITY, "@counter@z"]
    plan = plan_batch(item(lock_request("orch", lock_set)), NOW)
    [forward] = plan.lock_messages
    assert forward.instance_id == "@counter@z"
    assert isinstance(forward.event, EntityLockRequested) and forward.event.position == 1
    assert plan.scheduler.lock is not None and plan.scheduler.lock.owner == "orch"

    last = plan_batch(item(lock_request("orch", ["@counter@a", ENTITY], position=1)), NOW)
    [grant] = last.lock_messages
    assert (grant.instance_id, grant.event) == ("orch", EntityLockGranted(timestamp=NOW, critical_section_id="cs"))


def test_a_lock_request_that_comes_after_its_sections_unlock_is_dropped() -> None:
    """The orchestration ended while its request travelled along the lock set: the entity
    must not hold a lock for it ever after."""
    free = plan_batch(item(unlock("orch", "gone")), NOW)
    assert free.scheduler.lock is None and free.scheduler.released == ["gone"]
    stored = decode_scheduler_state(encode_scheduler_state(free.scheduler))
    late = plan_batch(item(lock_request("orch", ["@counter@a", ENTITY], 1, "gone"), signal(), scheduler=stored), NOW)
    assert late.lock_messages == [] and late.operations == [signal()] and late.scheduler.is_empty

    held = plan_batch(item(lock_request("other", [ENTITY], section="held"), unlock("orch", "gone")), NOW)
    assert held.scheduler.lock is not None and held.scheduler.lock.owner == "other"
    assert held.scheduler.released == ["gone"] and held.scheduler.queue == []
    both = plan_batch(item(unlock("orch", "gone"), lock_request("orch", [ENTITY], section="gone")), NOW)
    assert both.lock_messages == [] and both.scheduler.is_empty


def test_others_wait_while_locked_and_go_first_after_the_unlock() -> None:
    other_signal, other_call, owner_call = signal(request_id="x"), call("someone-else", "y"), call("orch", "z")
    plan = plan_batch(item(lock_request("orch", [ENTITY]), other_signal, other_call, owner_call), NOW)
    assert plan.operations == [owner_call]
    assert plan.scheduler.queue == [other_signal, other_call]

    stored = decode_scheduler_state(encode_scheduler_state(plan.scheduler))
    later = signal(request_id="later")
    released = plan_batch(item(later, unlock("orch"), scheduler=stored), NOW)
    assert released.operations == [other_signal, other_call, later]
    assert released.scheduler.is_empty


def test_an_unlock_for_another_section_leaves_the_lock_alone() -> None:
    stored = plan_batch(item(lock_request("orch", [ENTITY])), NOW).scheduler
    plan = plan_batch(item(unlock("orch", section="other"), signal(), scheduler=stored), NOW)
    assert plan.operations == [] and plan.scheduler.queue == [signal()] and plan.scheduler.lock == stored.lock
    assert plan.scheduler.released == ["other"]  # its request, should it come, is dropped


def test_an_unlock_withdraws_its_sections_lock_request_still_waiting_for_the_lock() -> None:
    # The orchestration ended (a lock timeout, a termination) while its request waited here:
    # granted later, the lock would be held for ever by an orchestration that has ended.
    stored = plan_batch(item(lock_request("holder", [ENTITY], section="held")), NOW).scheduler
    waiting = lock_request("gone", [ENTITY, "@counter@z"], section="given-up")
    queued = plan_batch(item(waiting, scheduler=stored), NOW).scheduler
    assert queued.queue == [waiting]
    withdrawn = plan_batch(item(unlock("gone", section="given-up"), scheduler=queued), NOW)
    assert withdrawn.scheduler.queue == [] and withdrawn.lock_messages == []
    released = plan_batch(item(unlock("holder", section="held"), scheduler=withdrawn.scheduler), NOW)
    assert released.scheduler.is_empty and released.lock_messages == []


def test_apply_replies_to_calls_and_sends_actions() -> None:
    the_call, the_signal = call("orch", "r1"), signal(request_id="r2")
    failing_call = call("orch2", "r3")
    plan = plan_batch(item(the_call, the_signal, failing_call), NOW)
    failure = FailureDetails(error_type="ValueError", message="no")
    result = BatchResult(
        state="5",
        results=[OperationResult(output="5"), OperationResult(output=None), OperationResult(failure=failure)],
        actions=[SignalEntity("@other@k", "ping", "1", NOW), StartOrchestration("new-id", "greet", '"x"')],
    )
    checkpoint = apply_batch(item(the_call, the_signal, failing_call), plan, result, NOW)
    assert (
        checkpoint.output == "5" and checkpoint.status == OrchestrationStatus.RUNNING and checkpoint.new_history == []
    )
    reply, failed, signalled, started = checkpoint.messages
    assert (reply.instance_id, reply.event) == (
        "orch",
        EntityOperationCompleted(timestamp=NOW, request_id="r1", output="5"),
    )
    assert failed.instance_id == "orch2"
    assert failed.event == EntityOperationFailed(timestamp=NOW, request_id="r3", failure_details=failure)
    assert signalled.instance_id == "@other@k" and signalled.visible_at == NOW
    assert isinstance(signalled.event, EntityOperationSignaled) and signalled.event.operation == "ping"
    assert started.instance_id == "new-id" and isinstance(started.event, ExecutionStarted)


def test_an_entity_without_state_lock_or_queue_is_stored_as_completed() -> None:
    plan = plan_batch(item(signal("delete"), state="3"), NOW)
    checkpoint = apply_batch(item(signal("delete"), state="3"), plan, BatchResult(None, [OperationResult()]), NOW)
    assert checkpoint.status == OrchestrationStatus.COMPLETED and checkpoint.custom_status is None


def test_an_entity_is_named_by_its_id_or_anything_written_as_one() -> None:
    assert entity_id_text(EntityInstanceId("Counter", "k")) == "@counter@k"
    assert entity_id_text("@Counter@k") == "@counter@k"
    assert entity_id_text(SdkEntityInstanceId("Counter", "k")) == "@counter@k"  # the official SDK's
    for wrong in ("counter", "@counter", 42):
        with pytest.raises(ValueError, match="Not an entity id"):
            entity_id_text(wrong)
