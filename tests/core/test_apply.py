"""plan_episode and apply_actions: work items to checkpoints."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from dtfx.core.actions import (
    CompleteOrchestration,
    CreateSubOrchestration,
    CreateTimer,
    OrchestratorAction,
    ScheduleTask,
    SendEntityMessage,
    SendEvent,
    TerminateOrchestration,
)
from dtfx.core.apply import (
    EpisodeKind,
    HistoryNeededError,
    apply_actions,
    in_time_order,
    locks_a_rewind_cannot_take_back,
    needs_history,
    plan_episode,
    rewind_checkpoint,
)
from dtfx.core.errors import InvalidInstanceIdError, UnstorableValueError
from dtfx.core.history import (
    EntityLockRequested,
    EntityOperationSignaled,
    EntityUnlockSent,
    EventRaised,
    EventSent,
    ExecutionCompleted,
    ExecutionResumed,
    ExecutionRewound,
    ExecutionStarted,
    ExecutionSuspended,
    ExecutionTerminated,
    FailureDetails,
    GenericEvent,
    HistoryEvent,
    OrchestrationInstance,
    OrchestrationSpan,
    OrchestrationStatus,
    OrchestratorCompleted,
    OrchestratorStarted,
    ParentInstance,
    SubOrchestrationInstanceCompleted,
    SubOrchestrationInstanceCreated,
    SubOrchestrationInstanceFailed,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TimerCreated,
    TimerFired,
    TraceContext,
    qualified_name,
)
from dtfx.core.state import OrchestrationState
from dtfx.core.workitems import InboxMessage, OrchestrationCheckpoint, OrchestrationWorkItem

NOW = datetime(2026, 3, 1, tzinfo=UTC)
Status = OrchestrationStatus


def start(parent: ParentInstance | None = None) -> ExecutionStarted:
    return ExecutionStarted(
        timestamp=NOW,
        name="orch",
        instance=OrchestrationInstance(instance_id="i", execution_id="e1"),
        input='"in"',
        parent=parent,
        tags={"t": "1"},
    )


def item(
    *events: HistoryEvent | tuple[HistoryEvent, str | None],
    status: Status = Status.RUNNING,
    history_size: int = 4,
    scheduled_start_at: datetime | None = None,
) -> OrchestrationWorkItem:
    messages = []
    for index, entry in enumerate(events):
        event, execution = entry if isinstance(entry, tuple) else (entry, None)
        messages.append(InboxMessage(index, event, execution))
    state = OrchestrationState(
        instance_id="i",
        name="orch",
        runtime_status=status,
        created_at=NOW,
        last_updated_at=NOW,
        serialized_input='"in"',
        execution_id="e1",
        version="1",
        scheduled_start_at=scheduled_start_at,
    )
    return OrchestrationWorkItem("i", "token", NOW, state, messages, history_size)


def raised(name: str = "ev") -> EventRaised:
    return EventRaised(timestamp=NOW, name=name, input="1")


def test_plan_starts_with_orchestrator_started_then_execution_started() -> None:
    event = raised()
    plan = plan_episode(item(event, start(), history_size=0, status=Status.PENDING), [], NOW)
    assert plan.kind is EpisodeKind.RUN
    assert plan.new_events == [OrchestratorStarted(timestamp=NOW), start(), event]
    assert plan.consumed == [0, 1]


def test_plan_drops_messages_for_other_executions_and_wake_ups() -> None:
    current, stale = raised("current"), raised("stale")
    work = item((current, "e1"), (stale, "e0"), GenericEvent(timestamp=NOW, data="x"))
    plan = plan_episode(work, None, NOW)
    assert plan.new_events == [OrchestratorStarted(timestamp=NOW), current]
    assert plan.consumed == [0, 1, 2]


def test_plan_drops_a_duplicate_start() -> None:
    plan = plan_episode(item(start(), raised()), None, NOW)
    assert plan.new_events == [OrchestratorStarted(timestamp=NOW), raised()]


def test_plan_drops_a_suspend_of_a_suspended_instance_and_a_resume_of_a_running_one() -> None:
    suspend, resume = ExecutionSuspended(timestamp=NOW), ExecutionResumed(timestamp=NOW)
    plan = plan_episode(item(suspend, suspend, resume, resume, suspend), None, NOW)
    assert plan.new_events == [OrchestratorStarted(timestamp=NOW), suspend, resume, suspend]
    assert plan.consumed == [0, 1, 2, 3, 4]
    plan = plan_episode(item(suspend, raised(), resume, status=Status.SUSPENDED), None, NOW)
    assert plan.new_events == [OrchestratorStarted(timestamp=NOW), raised(), resume]
    for alone in (item(resume), item(suspend, status=Status.SUSPENDED)):  # not even an empty episode
        plan = plan_episode(alone, None, NOW)
        assert plan.kind is EpisodeKind.CHECKPOINT and plan.checkpoint is not None
        assert plan.checkpoint.new_history == [] and plan.checkpoint.consumed == [0]


def test_plan_for_an_ended_instance_only_consumes() -> None:
    plan = plan_episode(item(raised(), status=Status.COMPLETED), [], NOW)
    assert plan.kind is EpisodeKind.CHECKPOINT
    assert plan.checkpoint is not None
    assert plan.checkpoint.consumed == [0]
    assert plan.checkpoint.new_history == [] and plan.checkpoint.status == Status.COMPLETED


def test_plan_defers_events_for_an_instance_that_has_not_started() -> None:
    due = NOW + timedelta(hours=1)
    plan = plan_episode(item(raised(), history_size=0, status=Status.PENDING, scheduled_start_at=due), [], NOW)
    assert plan.kind is EpisodeKind.DEFER and plan.defer_until == due


def test_plan_terminates_an_instance_that_has_not_started() -> None:
    terminate = ExecutionTerminated(timestamp=NOW, input='"bye"')
    plan = plan_episode(item(terminate, history_size=0, status=Status.PENDING), [], NOW)
    assert plan.kind is EpisodeKind.CHECKPOINT and plan.checkpoint is not None
    assert (plan.checkpoint.status, plan.checkpoint.output) == (Status.TERMINATED, '"bye"')
    assert isinstance(plan.checkpoint.new_history[-1], ExecutionCompleted)


def test_a_terminate_with_its_start_whose_output_no_store_keeps_fails_the_instance() -> None:
    """A NUL that a client's converter left raw: the checkpoint fails the instance, as it does
    for an orchestration's own output, rather than raise."""
    terminate = ExecutionTerminated(timestamp=NOW, input="bye\x00")
    plan = plan_episode(item(start(), terminate, history_size=0, status=Status.PENDING), [], NOW)
    assert plan.checkpoint is not None and plan.checkpoint.status == Status.FAILED
    assert plan.checkpoint.failure_details is not None
    assert plan.checkpoint.failure_details.is_caused_by(UnstorableValueError)


def test_a_rewind_is_refused_for_the_unlocks_a_worker_sent_in_place_of_the_code_only() -> None:
    """Not for those the code sent as it failed with an error of the same type of its own."""
    lock = EntityLockRequested(
        event_id=0, timestamp=NOW, critical_section_id="s", lock_set=["@e@k"], position=0, parent_instance_id="i"
    )
    unlock = EntityUnlockSent(
        event_id=1, timestamp=NOW, critical_section_id="s", parent_instance_id="i", target_instance_id="@e@k"
    )
    details = FailureDetails(error_type=qualified_name(InvalidInstanceIdError), message="bad key")
    history: list[HistoryEvent] = [
        OrchestratorStarted(timestamp=NOW),
        start(),
        lock,
        OrchestratorStarted(timestamp=NOW),
    ]
    by_the_code = ExecutionCompleted(event_id=2, timestamp=NOW, status=Status.FAILED, failure_details=details)
    by_the_worker = ExecutionCompleted(timestamp=NOW, status=Status.FAILED, failure_details=details)
    assert locks_a_rewind_cannot_take_back([*history, unlock, by_the_code]) == []
    assert locks_a_rewind_cannot_take_back([*history, unlock, by_the_worker]) == ["@e@k"]


def test_plan_terminates_an_instance_whose_start_comes_with_the_terminate_without_running_it() -> None:
    parent = ParentInstance(instance_id="p", execution_id="pe", name="parent", task_scheduled_id=4)
    terminate = ExecutionTerminated(timestamp=NOW, input='"bye"')
    plan = plan_episode(item(start(parent), raised(), terminate, history_size=0, status=Status.PENDING), [], NOW)
    assert plan.kind is EpisodeKind.CHECKPOINT and plan.checkpoint is not None
    checkpoint = plan.checkpoint
    assert (checkpoint.status, checkpoint.output, checkpoint.consumed) == (Status.TERMINATED, '"bye"', [0, 1, 2])
    assert [type(e).__name__ for e in checkpoint.new_history] == [
        "OrchestratorStarted",
        "ExecutionStarted",
        "ExecutionTerminated",
        "OrchestratorCompleted",
        "ExecutionCompleted",
    ]
    [to_parent] = checkpoint.messages
    assert to_parent.instance_id == "p" and isinstance(to_parent.event, SubOrchestrationInstanceFailed)


def test_needs_history_for_rewind_and_recursive_terminate_only() -> None:
    assert not needs_history(item(raised()))
    assert needs_history(item(ExecutionRewound(timestamp=NOW)))
    assert needs_history(item(ExecutionTerminated(timestamp=NOW, recurse=True)))
    assert not needs_history(item(ExecutionTerminated(timestamp=NOW, recurse=False)))


@pytest.mark.parametrize(
    ("actions", "custom_status", "what"),
    [
        ([ScheduleTask(id=1, name="act\x00ivity")], None, "ScheduleTask action's name"),
        ([CreateSubOrchestration(id=1, instance_id="kid", name="sub", input='"a\x00"')], None, "action's input"),
        ([CompleteOrchestration(id=2, status=Status.COMPLETED, result="\x00")], None, "action's result"),
        ([], "\x00", "custom status"),
    ],
)
def test_actions_a_task_hub_cannot_store_fail_the_orchestration(
    actions: list[OrchestratorAction], custom_status: str | None, what: str
) -> None:
    """Their commit would fail every time the episode ran (a NUL in an activity's name, say)."""
    new_events = [OrchestratorStarted(timestamp=NOW), raised()]
    with pytest.raises(HistoryNeededError):  # for the unlocks of a critical section it may be in
        apply_actions(item(raised()), start(), new_events, actions, custom_status, [0], NOW)
    checkpoint = apply_actions(item(raised()), start(), new_events, actions, custom_status, [0], NOW, history=[])
    assert checkpoint.status == Status.FAILED and checkpoint.activity_tasks == [] and checkpoint.messages == []
    assert checkpoint.failure_details is not None and checkpoint.failure_details.is_caused_by(UnstorableValueError)
    assert what in checkpoint.failure_details.message and checkpoint.custom_status is None
    escaped = [ScheduleTask(id=1, name="act", input='"a\\u0000b"')]  # JSON's way of writing it: stored
    assert apply_actions(item(raised()), start(), new_events, escaped, None, [0], NOW).status == Status.RUNNING


def test_an_entity_message_to_an_id_that_is_no_entitys_fails_the_orchestration() -> None:
    """It would reach the orchestration of that id (an SDK worker's actions are not checked before)."""
    signal = EntityOperationSignaled(event_id=1, timestamp=NOW, request_id="r", operation="add", target_instance_id="o")
    lock = EntityLockRequested(
        event_id=1, timestamp=NOW, critical_section_id="s", lock_set=["@e@k", "o"], position=0, parent_instance_id="i"
    )
    new_events = [OrchestratorStarted(timestamp=NOW), raised()]
    for event in (signal, lock):
        action = SendEntityMessage(id=1, event=event)
        checkpoint = apply_actions(item(), start(), new_events, [action], None, [0], NOW, history=[])
        assert checkpoint.status == Status.FAILED and checkpoint.messages == []
        assert checkpoint.failure_details is not None
        assert checkpoint.failure_details.is_caused_by(InvalidInstanceIdError)
        assert "'o', which is not an entity's id" in checkpoint.failure_details.message


def test_events_and_terminations_for_ids_no_instance_can_have_go_nowhere() -> None:
    """As to an instance that is gone (the store could not even look such an id up)."""
    new_events = [OrchestratorStarted(timestamp=NOW), raised()]
    actions = [
        SendEvent(id=1, instance_id="tar\x00get", name="hello"),
        TerminateOrchestration(id=2, instance_id="", reason="why"),
        SendEvent(id=3, instance_id="target", name="hello"),
    ]
    checkpoint = apply_actions(item(raised()), start(), new_events, actions, None, [0], NOW)
    assert checkpoint.status == Status.RUNNING
    assert [e.instance_id for e in checkpoint.new_history if isinstance(e, EventSent)] == ["tar\x00get", "target"]
    assert [message.instance_id for message in checkpoint.messages] == ["target"]


def test_apply_turns_actions_into_history_tasks_and_messages() -> None:
    work = item(raised())
    new_events = [OrchestratorStarted(timestamp=NOW), raised()]
    fire_at = NOW + timedelta(minutes=5)
    actions = [
        ScheduleTask(id=1, name="act", input='"x"', tags={"k": "v"}),
        CreateTimer(id=2, fire_at=fire_at),
        CreateSubOrchestration(id=3, instance_id="child", name="sub", version="2", input="3"),
        SendEvent(id=4, instance_id="other", name="hello", data='"hi"'),
        TerminateOrchestration(id=5, instance_id="victim", reason='"why"', recurse=True),
    ]
    checkpoint = apply_actions(work, start(), new_events, actions, '"status"', [0], NOW, new_id=lambda: "new-exec")

    assert [type(e).__name__ for e in checkpoint.new_history] == [
        "OrchestratorStarted",
        "EventRaised",
        "TaskScheduled",
        "TimerCreated",
        "SubOrchestrationInstanceCreated",
        "EventSent",
        "OrchestratorCompleted",
    ]
    assert [e.event_id for e in checkpoint.new_history[2:6]] == [1, 2, 3, 4]
    assert checkpoint.status == Status.RUNNING and checkpoint.custom_status == '"status"'
    [task] = checkpoint.activity_tasks
    assert (task.instance_id, task.execution_id, task.event.event_id, task.event.tags) == ("i", "e1", 1, {"k": "v"})
    timer, child, event, terminate = checkpoint.messages
    assert (timer.instance_id, timer.execution_id, timer.visible_at) == ("i", "e1", fire_at)
    assert timer.event == TimerFired(timestamp=fire_at, timer_id=2, fire_at=fire_at)
    assert isinstance(child.event, ExecutionStarted) and child.instance_id == "child"
    assert child.event.instance.execution_id == "new-exec"
    assert child.event.parent == ParentInstance(
        instance_id="i", execution_id="e1", name="orch", version="1", task_scheduled_id=3
    )
    assert (event.instance_id, event.event) == ("other", EventRaised(timestamp=NOW, name="hello", input='"hi"'))
    assert terminate.instance_id == "victim"
    assert terminate.event == ExecutionTerminated(timestamp=NOW, input='"why"', recurse=True)


def test_apply_completion_notifies_the_parent() -> None:
    parent = ParentInstance(instance_id="p", execution_id="pe", task_scheduled_id=7)
    done = CompleteOrchestration(id=2, status=Status.COMPLETED, result='"out"')
    checkpoint = apply_actions(item(), start(parent), [OrchestratorStarted(timestamp=NOW)], [done], None, [], NOW)
    assert (checkpoint.status, checkpoint.output, checkpoint.completed_at) == (Status.COMPLETED, '"out"', NOW)
    assert checkpoint.new_history[-1] == ExecutionCompleted(
        event_id=2, timestamp=NOW, status=Status.COMPLETED, result='"out"'
    )
    [notice] = checkpoint.messages
    assert (notice.instance_id, notice.execution_id) == ("p", "pe")
    assert notice.event == SubOrchestrationInstanceCompleted(timestamp=NOW, task_scheduled_id=7, result='"out"')


def test_a_terminated_child_reports_a_failure_to_its_parent() -> None:
    parent = ParentInstance(instance_id="p", task_scheduled_id=7)
    terminated = CompleteOrchestration(id=2, status=Status.TERMINATED, result='"stopped"')
    checkpoint = apply_actions(item(), start(parent), [OrchestratorStarted(timestamp=NOW)], [terminated], None, [], NOW)
    [notice] = checkpoint.messages
    assert isinstance(notice.event, SubOrchestrationInstanceFailed)
    assert notice.event.failure_details.error_type == "OrchestrationTerminated"


def test_recursive_terminate_reaches_open_children() -> None:
    history: list[HistoryEvent] = [
        SubOrchestrationInstanceCreated(event_id=1, timestamp=NOW, instance_id="done-child", name="c"),
        SubOrchestrationInstanceCreated(event_id=2, timestamp=NOW, instance_id="open-child", name="c"),
        SubOrchestrationInstanceCompleted(timestamp=NOW, task_scheduled_id=1),
    ]
    terminate = ExecutionTerminated(timestamp=NOW, input='"x"', recurse=True)
    end = CompleteOrchestration(id=3, status=Status.TERMINATED, result='"x"')
    checkpoint = apply_actions(
        item(terminate),
        start(),
        [OrchestratorStarted(timestamp=NOW), terminate],
        [end],
        None,
        [0],
        NOW,
        history=history,
    )
    assert [(m.instance_id, m.event) for m in checkpoint.messages] == [
        ("open-child", ExecutionTerminated(timestamp=NOW, input='"x"', recurse=True))
    ]


def test_continue_as_new_resets_history_and_queues_the_next_start() -> None:
    carried = raised("carried")
    end = CompleteOrchestration(
        id=3, status=Status.CONTINUED_AS_NEW, result='"next"', new_version="2", carryover_events=[carried]
    )
    actions = [ScheduleTask(id=1, name="dropped"), SendEvent(id=2, instance_id="other", name="kept"), end]
    checkpoint = apply_actions(
        item(), start(), [OrchestratorStarted(timestamp=NOW)], actions, '"cs"', [], NOW, new_id=lambda: "e2"
    )
    assert checkpoint.replace_history and checkpoint.new_history == []
    assert (checkpoint.status, checkpoint.execution_id, checkpoint.input, checkpoint.version) == (
        Status.RUNNING,
        "e2",
        '"next"',
        "2",
    )
    assert checkpoint.custom_status == '"cs"' and checkpoint.activity_tasks == []
    kept, restart, carry = checkpoint.messages
    assert kept.instance_id == "other"
    assert isinstance(restart.event, ExecutionStarted) and restart.execution_id == "e2"
    assert (restart.event.input, restart.event.version, restart.event.tags) == ('"next"', "2", {"t": "1"})
    assert (carry.event, carry.execution_id) == (carried, "e2")


def _continued(
    new_events: list[HistoryEvent], actions: list[OrchestratorAction] | None = None
) -> OrchestrationCheckpoint:
    """apply_actions for an episode with ``new_events`` that ends by continuing as new."""
    end = CompleteOrchestration(id=9, status=Status.CONTINUED_AS_NEW, result='"next"')
    episode = [OrchestratorStarted(timestamp=NOW), *new_events]
    return apply_actions(item(), start(), episode, [*(actions or []), end], None, [], NOW, new_id=lambda: "e2")


def test_a_termination_in_the_episode_that_continues_as_new_ends_the_instance() -> None:
    tick = raised("tick")
    terminate = ExecutionTerminated(timestamp=NOW, input='"stop"')
    checkpoint = _continued([tick, terminate])
    assert not checkpoint.replace_history
    assert (checkpoint.status, checkpoint.output, checkpoint.execution_id) == (Status.TERMINATED, '"stop"', "e1")
    completed = checkpoint.new_history[-1]
    assert isinstance(completed, ExecutionCompleted) and completed.status == Status.TERMINATED
    assert not any(isinstance(m.event, ExecutionStarted) for m in checkpoint.messages)


def test_a_suspension_in_the_episode_that_continues_as_new_suspends_the_next_execution() -> None:
    suspend = ExecutionSuspended(timestamp=NOW, input='"hold"')
    checkpoint = _continued([raised("tick"), suspend])
    assert checkpoint.replace_history and checkpoint.status == Status.RUNNING  # the next execution suspends itself
    restart, held = checkpoint.messages
    assert isinstance(restart.event, ExecutionStarted)
    assert (held.event, held.execution_id) == (suspend, "e2")


def test_the_next_execution_takes_what_was_carried_over_before_what_arrived_meanwhile() -> None:
    """Continue-as-new sends the events it carries over to the inbox behind the next start,
    so behind events that arrived while the execution before ran: they still come first."""
    earlier, later, meanwhile = raised("earlier"), raised("later"), raised("meanwhile")
    suspend = ExecutionSuspended(timestamp=NOW, input=None)
    work = item(meanwhile, (start(), "e1"), (earlier, "e1"), (later, "e1"), (suspend, "e1"), history_size=0)
    plan = plan_episode(work, [], NOW)
    assert plan.new_events == [OrchestratorStarted(timestamp=NOW), start(), earlier, later, suspend, meanwhile]
    assert plan.consumed == [0, 1, 2, 3, 4]


def test_events_an_execution_sends_its_own_instance_wait_for_the_next_execution() -> None:
    actions = [SendEvent(id=1, instance_id="i", name="note", data='"n"'), CreateTimer(id=2, fire_at=NOW)]
    checkpoint = _continued([], actions)
    restart, note = checkpoint.messages  # the timer went with the old execution
    assert isinstance(restart.event, ExecutionStarted)
    assert note.instance_id == "i" and note.execution_id is None
    assert isinstance(note.event, EventRaised) and note.event.name == "note"


TRACE = TraceContext(trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", trace_state="k=v")


def test_trace_contexts_go_from_the_actions_to_the_events_and_the_child_start() -> None:
    actions = [
        ScheduleTask(id=1, name="act", trace_context=TRACE),
        CreateSubOrchestration(id=2, instance_id="kid", name="child", trace_context=TRACE),
    ]
    checkpoint = apply_actions(item(), start(), [OrchestratorStarted(timestamp=NOW)], actions, None, [], NOW)
    scheduled, created = checkpoint.new_history[1:3]
    assert isinstance(scheduled, TaskScheduled) and scheduled.trace_context == TRACE
    assert checkpoint.activity_tasks[0].event.trace_context == TRACE
    assert isinstance(created, SubOrchestrationInstanceCreated) and created.trace_context == TRACE
    (child_start,) = checkpoint.messages
    assert isinstance(child_start.event, ExecutionStarted) and child_start.event.trace_context == TRACE


def test_the_next_execution_continues_the_trace_of_the_one_before() -> None:
    traced = msgspec.structs.replace(start(), trace_context=TRACE)
    end = CompleteOrchestration(id=1, status=Status.CONTINUED_AS_NEW, result='"next"')
    checkpoint = apply_actions(item(), traced, [OrchestratorStarted(timestamp=NOW)], [end], None, [], NOW)
    (restart,) = checkpoint.messages
    assert isinstance(restart.event, ExecutionStarted) and restart.event.trace_context == TRACE


def test_the_workers_span_is_recorded_on_the_episodes_start() -> None:
    span = OrchestrationSpan(span_id="b7ad6b7169203331", start_time=NOW)
    new_events: list[HistoryEvent] = [OrchestratorStarted(timestamp=NOW), raised("e")]
    checkpoint = apply_actions(item(), start(), new_events, [], None, [], NOW, span=span)
    assert checkpoint.new_history[0] == OrchestratorStarted(timestamp=NOW, span=span)
    assert new_events[0] == OrchestratorStarted(timestamp=NOW)  # the plan's events are left as they were
    unchanged = apply_actions(item(), start(), new_events, [], None, [], NOW)
    assert unchanged.new_history[0] == OrchestratorStarted(timestamp=NOW)


def test_suspend_and_resume_set_the_status() -> None:
    suspended = apply_actions(
        item(), start(), [OrchestratorStarted(timestamp=NOW), ExecutionSuspended(timestamp=NOW)], [], None, [], NOW
    )
    assert suspended.status == Status.SUSPENDED
    still = apply_actions(
        item(status=Status.SUSPENDED), start(), [OrchestratorStarted(timestamp=NOW)], [], None, [], NOW
    )
    assert still.status == Status.SUSPENDED


def test_rewind_drops_final_failures_keeps_retried_attempts_and_rewinds_children() -> None:
    failure = FailureDetails(error_type="E", message="m")
    history: list[HistoryEvent] = [
        OrchestratorStarted(timestamp=NOW),
        start(),
        TaskScheduled(event_id=1, timestamp=NOW, name="ok"),
        TaskCompleted(timestamp=NOW, task_scheduled_id=1),
        TaskScheduled(event_id=2, timestamp=NOW, name="retried"),
        TaskFailed(timestamp=NOW, task_scheduled_id=2, failure_details=failure),
        TimerCreated(event_id=3, timestamp=NOW, fire_at=NOW, retry_of=2),
        TimerFired(timestamp=NOW, timer_id=3, fire_at=NOW),
        TaskScheduled(event_id=4, timestamp=NOW, name="retried"),
        TaskFailed(timestamp=NOW, task_scheduled_id=4, failure_details=failure),
        SubOrchestrationInstanceCreated(event_id=5, timestamp=NOW, instance_id="kid", name="c"),
        SubOrchestrationInstanceFailed(timestamp=NOW, task_scheduled_id=5, failure_details=failure),
        OrchestratorCompleted(timestamp=NOW),
        ExecutionCompleted(event_id=6, timestamp=NOW, status=Status.FAILED, failure_details=failure),
    ]
    rewind = ExecutionRewound(timestamp=NOW, reason="fixed")
    work = item(rewind, status=Status.RUNNING)
    plan = plan_episode(work, history, NOW)
    assert plan.kind is EpisodeKind.CHECKPOINT and plan.checkpoint is not None
    assert plan.checkpoint == rewind_checkpoint(work, history, [0], NOW)
    checkpoint = plan.checkpoint
    kept = [
        (type(e).__name__, e.event_id if e.event_id >= 0 else getattr(e, "task_scheduled_id", None))
        for e in checkpoint.new_history
    ]
    assert kept == [
        ("OrchestratorStarted", None),
        ("ExecutionStarted", None),
        ("TaskScheduled", 1),
        ("TaskCompleted", 1),
        ("TaskScheduled", 2),
        ("TaskFailed", 2),
        ("TimerCreated", 3),
        ("TimerFired", None),
        ("SubOrchestrationInstanceCreated", 5),
        ("OrchestratorCompleted", None),
        ("ExecutionRewound", None),
    ]
    assert checkpoint.new_history[-1] == rewind  # why, for the record
    assert checkpoint.replace_history and checkpoint.status == Status.RUNNING and checkpoint.failure_details is None
    child, wake_up = checkpoint.messages
    parent = ParentInstance(instance_id="i", execution_id=work.state.execution_id, task_scheduled_id=5)
    assert (child.instance_id, child.event) == ("kid", ExecutionRewound(timestamp=NOW, reason="fixed", parent=parent))
    assert wake_up.instance_id == "i" and isinstance(wake_up.event, GenericEvent)


def test_a_timer_takes_its_place_at_its_moment_and_the_others_keep_their_order() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def at(seconds: float, name: str) -> EventRaised:
        return EventRaised(timestamp=t0 + timedelta(seconds=seconds), name=name)

    timer = TimerFired(timestamp=t0 + timedelta(seconds=3), timer_id=1, fire_at=t0 + timedelta(seconds=3))
    messages = [
        InboxMessage(1, timer),  # written when the timer was made
        InboxMessage(2, at(1.0, "a")),
        InboxMessage(3, at(0.9, "b")),  # written after a, by a clock a little behind: still after a
        InboxMessage(4, at(5.0, "c")),
    ]
    assert [m.id for m in in_time_order(messages)] == [2, 3, 1, 4]
    assert in_time_order(messages[1:]) == messages[1:]  # no timer: as written
    # A message is placed by when it was written, where the store says: an entity's reply carries
    # the moment its batch began, and may be written after the timer fired, by a long operation.
    late_reply = InboxMessage(5, at(1.0, "reply"), visible_at=t0 + timedelta(seconds=4))
    assert [m.id for m in in_time_order([messages[0], late_reply])] == [1, 5]
