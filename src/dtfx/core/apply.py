"""From a locked work item to a checkpoint: the one place actions become history and messages.

An orchestration episode has three steps, whoever executes the orchestrator:

1. :func:`plan_episode` decides what the work item's inbox means: new events to run
   (after an ``OrchestratorStarted`` that sets the episode's time), or messages to
   discard (a stale execution, an ended instance), or a checkpoint computed without
   running any code (rewind, terminating an instance that never started), or a
   deferral (events for an instance whose scheduled start is still ahead).
2. An executor turns the new events into actions: the local replay engine, or a
   remote SDK worker over gRPC.
3. :func:`apply_actions` turns the actions into history events, the instance's new
   state and the outbound messages, as one :class:`~dtfx.core.workitems.OrchestrationCheckpoint`
   that the backend commits atomically.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec

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
from dtfx.core.entities import entity_target
from dtfx.core.errors import (
    InvalidInstanceIdError,
    NotRegisteredError,
    OrchestrationAlreadyExistsError,
    UnstorableValueError,
)
from dtfx.core.history import (
    EntityLockRequested,
    EntityOperationCalled,
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
    qualified_name,
    storable_text,
)
from dtfx.core.instance_ids import instance_id_error, is_entity_id, orchestration_id_error
from dtfx.core.moments import as_utc
from dtfx.core.tokens import new_token
from dtfx.core.versioning import VERSION_MISMATCH
from dtfx.core.workitems import (
    ActivityTask,
    InboxMessage,
    MessageId,
    OrchestrationCheckpoint,
    OrchestrationWorkItem,
    OutboundMessage,
)

logger = logging.getLogger(__name__)

REFUSED_START = qualified_name(OrchestrationAlreadyExistsError)
"""The error type of the failure a parent gets when its sub-orchestration's id is taken
(:func:`~dtfx.backends.delivery.refusal`); no orchestration fails with it (a refusal it does
not catch fails it with a ``TaskFailedError``), so it tells the refusal apart."""
_REFUSED_START_BEFORE = OrchestrationAlreadyExistsError.__name__
"""The same, in histories written before 2026-12-07."""

DEFER_RETRY = timedelta(seconds=1)
"""How long to wait before looking again at events for an instance that has not started."""


class EpisodeKind(enum.Enum):
    """What a work item calls for."""

    RUN = "run"
    """Run the orchestrator on ``new_events``."""
    CHECKPOINT = "checkpoint"
    """Commit ``checkpoint`` as it is; no orchestrator code runs."""
    DEFER = "defer"
    """Leave the messages in the inbox and look again at ``defer_until``."""


@dataclass
class EpisodePlan:
    """The outcome of :func:`plan_episode`."""

    kind: EpisodeKind
    new_events: list[HistoryEvent] = field(default_factory=list)
    consumed: list[MessageId] = field(default_factory=list)
    checkpoint: OrchestrationCheckpoint | None = None
    defer_until: datetime | None = None


def needs_history(item: OrchestrationWorkItem) -> bool:
    """True if planning or applying this work item reads the history, whatever the cache holds."""
    return any(
        isinstance(m.event, ExecutionRewound) or (isinstance(m.event, ExecutionTerminated) and m.event.recurse)
        for m in item.messages
    )


def plan_episode(item: OrchestrationWorkItem, history: Sequence[HistoryEvent] | None, now: datetime) -> EpisodePlan:
    """Decide what the work item's messages mean (see the module docstring)."""
    state = item.state
    consumed = [message.id for message in item.messages]
    started = item.history_size > 0
    start: ExecutionStarted | None = None
    events: list[HistoryEvent] = []
    suspended = state.runtime_status == OrchestrationStatus.SUSPENDED
    redundant = 0
    for message in in_time_order(item.messages) if started else _carried_first(item.messages, state.execution_id):
        event = message.event
        if isinstance(event, ExecutionStarted):
            if not started and start is None and event.instance.execution_id == state.execution_id:
                start = event
            continue
        if isinstance(event, GenericEvent):  # a wake-up call; it carries nothing to run
            continue
        if message.execution_id is not None and message.execution_id != state.execution_id:
            continue
        if isinstance(event, ExecutionSuspended | ExecutionResumed):
            if isinstance(event, ExecutionSuspended) == suspended:
                # Already so: nothing to record. (A second suspend would be held back with the
                # other events by the official Python SDK's worker, which then loops for ever
                # replaying it on resume.)
                redundant += 1
                continue
            suspended = not suspended
        events.append(event)

    rewind = next((e for e in events if isinstance(e, ExecutionRewound)), None)
    if rewind is not None:
        if history and _failed(history):
            rewinds = [m.id for m in item.messages if isinstance(m.event, ExecutionRewound | GenericEvent)]
            return EpisodePlan(EpisodeKind.CHECKPOINT, checkpoint=rewind_checkpoint(item, history, rewinds, now))
        if rewind.parent is not None and state.runtime_status.is_terminal and history:
            checkpoint = unchanged_checkpoint(item, consumed, now)
            checkpoint.messages.extend(_outcome_again(history, rewind.parent, item.instance_id, now))
            return EpisodePlan(EpisodeKind.CHECKPOINT, checkpoint=checkpoint)
        # Nothing failed to rewind: a child still running reports to its parent when it ends.
        redundant += sum(isinstance(e, ExecutionRewound) for e in events)
        events = [e for e in events if not isinstance(e, ExecutionRewound)]
    if redundant == len(item.messages):  # nothing but those: no episode either
        return EpisodePlan(EpisodeKind.CHECKPOINT, checkpoint=unchanged_checkpoint(item, consumed, now))
    if state.runtime_status.is_terminal:
        return EpisodePlan(EpisodeKind.CHECKPOINT, checkpoint=unchanged_checkpoint(item, consumed, now))

    terminate = None if started else termination(events)
    if terminate is not None and start is not None:  # terminated before any of its code ran: none will
        end = CompleteOrchestration(id=-1, status=OrchestrationStatus.TERMINATED, result=terminate.input)
        episode = [OrchestratorStarted(timestamp=now), start, terminate]
        checkpoint = apply_actions(item, start, episode, [end], None, consumed, now, history=())
        return EpisodePlan(EpisodeKind.CHECKPOINT, checkpoint=checkpoint)
    if not started and start is None:
        if terminate is not None:
            return EpisodePlan(
                EpisodeKind.CHECKPOINT, checkpoint=terminate_unstarted_checkpoint(item, terminate, consumed, now)
            )
        if not events:
            return EpisodePlan(EpisodeKind.CHECKPOINT, checkpoint=unchanged_checkpoint(item, consumed, now))
        scheduled = state.scheduled_start_at
        return EpisodePlan(
            EpisodeKind.DEFER, defer_until=scheduled if scheduled and scheduled > now else now + DEFER_RETRY
        )

    new_events: list[HistoryEvent] = [OrchestratorStarted(timestamp=now)]
    if start is not None:
        new_events.append(start)
    new_events.extend(events)
    return EpisodePlan(EpisodeKind.RUN, new_events=new_events, consumed=consumed)


def termination(events: Sequence[HistoryEvent]) -> ExecutionTerminated | None:
    """The first request to terminate among ``events``, if any."""
    return next((event for event in events if isinstance(event, ExecutionTerminated)), None)


def _failed(history: Sequence[HistoryEvent]) -> bool:
    """True if the execution in ``history`` ended in failure."""
    for event in reversed(history):
        if isinstance(event, ExecutionCompleted):
            return event.status == OrchestrationStatus.FAILED
    return False


class HistoryNeededError(Exception):
    """:func:`apply_actions` needs the past history, which it was not given."""


def apply_actions(
    item: OrchestrationWorkItem,
    started: ExecutionStarted,
    new_events: list[HistoryEvent],
    actions: Sequence[OrchestratorAction],
    custom_status: str | None,
    consumed: list[MessageId],
    now: datetime,
    *,
    history: Sequence[HistoryEvent] | None = None,
    span: OrchestrationSpan | None = None,
    new_id: Callable[[], str] = new_token,
) -> OrchestrationCheckpoint:
    """Turn an episode's actions into a checkpoint.

    ``started`` is the execution's ``ExecutionStarted`` (from history or ``new_events``);
    ``history`` is the past history, needed when :func:`needs_history` says so, and for an
    episode that must fail instead (its actions could not be stored), for the unlocks of the
    critical section it was in: without it, that raises :class:`HistoryNeededError`;
    ``span``, the execution's span as the episode's worker began or changed it, is
    recorded on the episode's ``OrchestratorStarted``. An activity, sub-orchestration or
    entity operation that comes with no trace context of its own continues the execution's.
    """
    invalid = _unstorable(actions, custom_status) or _misaddressed(actions)
    if invalid is not None:  # it would fail every commit, or another instance: the orchestration fails instead
        if history is None:
            raise HistoryNeededError
        end = CompleteOrchestration(id=-1, status=OrchestrationStatus.FAILED, failure_details=invalid)
        actions = [*releases_of_open_sections(history, item.instance_id, now), end]
        custom_status = None
    state = item.state
    instance_id = item.instance_id
    execution_id = state.execution_id
    appended: list[HistoryEvent] = list(new_events)
    if span is not None and appended and isinstance(appended[0], OrchestratorStarted):
        appended[0] = msgspec.structs.replace(appended[0], span=span)
    tasks: list[ActivityTask] = []
    messages: list[OutboundMessage] = []
    completion: CompleteOrchestration | None = None

    for action in actions:
        if isinstance(action, ScheduleTask):
            scheduled = TaskScheduled(
                event_id=action.id,
                timestamp=now,
                name=action.name,
                version=action.version,
                input=action.input,
                tags=action.tags,
                trace_context=action.trace_context or started.trace_context,
            )
            appended.append(scheduled)
            tasks.append(ActivityTask(instance_id, execution_id, scheduled))
        elif isinstance(action, CreateTimer):
            appended.append(
                TimerCreated(event_id=action.id, timestamp=now, fire_at=action.fire_at, retry_of=action.retry_of)
            )
            fired = TimerFired(timestamp=action.fire_at, timer_id=action.id, fire_at=action.fire_at)
            messages.append(OutboundMessage(instance_id, fired, execution_id, visible_at=action.fire_at))
        elif isinstance(action, CreateSubOrchestration):
            appended.append(
                SubOrchestrationInstanceCreated(
                    event_id=action.id,
                    timestamp=now,
                    instance_id=action.instance_id,
                    name=action.name,
                    version=action.version,
                    input=action.input,
                    trace_context=action.trace_context or started.trace_context,
                )
            )
            refused = orchestration_id_error(action.instance_id)
            if refused is not None:  # the id must not reach the store: the task fails in the next episode
                messages.append(_refused_child(refused, action.id, instance_id, execution_id, now))
                continue
            child_start = ExecutionStarted(
                timestamp=now,
                name=action.name,
                instance=OrchestrationInstance(instance_id=action.instance_id, execution_id=new_id()),
                version=action.version,
                input=action.input,
                parent=ParentInstance(
                    instance_id=instance_id,
                    execution_id=execution_id,
                    name=state.name,
                    version=state.version,
                    task_scheduled_id=action.id,
                ),
                tags=action.tags,
                trace_context=action.trace_context or started.trace_context,
            )
            messages.append(OutboundMessage(action.instance_id, child_start))
        elif isinstance(action, SendEvent):
            appended.append(
                EventSent(
                    event_id=action.id,
                    timestamp=now,
                    instance_id=action.instance_id,
                    name=action.name,
                    input=action.data,
                )
            )
            if instance_id_error(action.instance_id) is None:  # else no instance has it: as to one that is gone
                raised = EventRaised(timestamp=now, name=action.name, input=action.data)
                messages.append(OutboundMessage(action.instance_id, raised))
        elif isinstance(action, TerminateOrchestration):
            if instance_id_error(action.instance_id) is None:
                terminated = ExecutionTerminated(timestamp=now, input=action.reason, recurse=action.recurse)
                messages.append(OutboundMessage(action.instance_id, terminated))
        elif isinstance(action, SendEntityMessage):
            event = action.event
            if isinstance(event, EntityOperationSignaled | EntityOperationCalled) and event.trace_context is None:
                event = msgspec.structs.replace(event, trace_context=started.trace_context)
            appended.append(event)
            visible_at = getattr(event, "scheduled_time", None)
            messages.append(OutboundMessage(entity_target(event), event, visible_at=visible_at))
        elif isinstance(action, CompleteOrchestration):
            completion = action
        else:
            logger.warning("Instance %s: ignoring unsupported action %s", instance_id, type(action).__name__)

    appended.append(OrchestratorCompleted(timestamp=now))
    status = _status_after(state.runtime_status, new_events)
    checkpoint = OrchestrationCheckpoint(
        instance_id=instance_id,
        lock_token=item.lock_token,
        consumed=consumed,
        new_history=appended,
        status=status,
        execution_id=execution_id,
        input=state.serialized_input,
        output=None,
        custom_status=custom_status,
        failure_details=None,
        version=state.version,
        completed_at=None,
        updated_at=now,
        activity_tasks=tasks,
        messages=messages,
    )
    if completion is None:
        return checkpoint
    terminate = termination(new_events)
    if completion.status == OrchestrationStatus.CONTINUED_AS_NEW:
        if terminate is None:
            _continue_as_new(checkpoint, started, completion, now, new_id(), new_events)
            return checkpoint
        # Terminated in the episode that continued it as new, after what made it continue (had the
        # termination come first, the orchestrator would have ended with it): the termination wins,
        # as in the Durable Task Framework, rather than being lost with the execution.
        completion = CompleteOrchestration(
            id=completion.id, status=OrchestrationStatus.TERMINATED, result=terminate.input
        )

    checkpoint.status = completion.status
    checkpoint.completed_at = now
    checkpoint.failure_details = completion.failure_details
    checkpoint.output = completion.result
    appended.append(
        ExecutionCompleted(
            event_id=completion.id,
            timestamp=now,
            status=completion.status,
            result=completion.result,
            failure_details=completion.failure_details,
        )
    )
    if started.parent is not None:
        messages.append(_notify_parent(started.parent, completion, instance_id, now))
    if completion.status == OrchestrationStatus.TERMINATED and terminate is not None and terminate.recurse:
        for child_id in open_children([*(history or []), *appended]):
            child_terminated = ExecutionTerminated(timestamp=now, input=terminate.input, recurse=True)
            messages.append(OutboundMessage(child_id, child_terminated))
    return checkpoint


def merge_checkpoints(
    first: OrchestrationCheckpoint, second: OrchestrationCheckpoint, done_task: str
) -> OrchestrationCheckpoint | None:
    """One checkpoint for two consecutive episodes of one work item with no commit between.

    ``second`` continues ``first`` with the result of ``first``'s activity ``done_task``
    (its lock token), which ran before anything was committed: that task is not queued.
    ``None`` when the two cannot be one commit (an episode starts a fresh history).
    """
    if first.replace_history or second.replace_history:
        return None
    return dataclasses.replace(
        second,
        consumed=first.consumed,
        new_history=[*first.new_history, *second.new_history],
        activity_tasks=[task for task in first.activity_tasks if task.lock_token != done_task] + second.activity_tasks,
        messages=[*first.messages, *second.messages],
        finished_tasks=[*first.finished_tasks, *second.finished_tasks],
    )


def in_time_order(messages: Sequence[InboxMessage]) -> Sequence[InboxMessage]:
    """``messages`` in the order things happened: the message of a timer, written when the
    timer was made, takes its place at the moment the timer fired, among the others, which
    keep the order they were written in (the moments they became visible, from the clocks
    of several processes, may disagree a little). So an event raised before a timer came
    due comes before it when both waited for a worker (one that was away, or busy): an
    approval that came before its deadline wins, as it would have with a worker ready."""
    if len(messages) < 2 or not any(isinstance(message.event, TimerFired) for message in messages):
        return messages
    moments: list[datetime] = []
    latest: datetime | None = None
    for message in messages:
        event = message.event
        if isinstance(event, TimerFired):
            moment = as_utc(event.fire_at)
        else:
            written = as_utc(message.visible_at or event.timestamp)
            latest = moment = written if latest is None else max(latest, written)
        moments.append(moment)
    order = sorted(range(len(messages)), key=lambda position: (moments[position], position))
    return [messages[position] for position in order]


def _carried_first(messages: Sequence[InboxMessage], execution_id: str | None) -> Sequence[InboxMessage]:
    """An execution's first messages in the order it takes them: what the execution before it
    carried over to it (on continue-as-new: the events it had not taken, then suspensions),
    which are addressed to it, ahead of what reached the inbox while that execution ran.
    (They went to the inbox behind those, with its start.)"""
    carried = [message for message in messages if execution_id is not None and message.execution_id == execution_id]
    if not carried:
        return messages
    return [*carried, *(message for message in messages if message.execution_id != execution_id)]


def _status_after(status: OrchestrationStatus, new_events: Sequence[HistoryEvent]) -> OrchestrationStatus:
    suspended = status == OrchestrationStatus.SUSPENDED
    for event in new_events:
        if isinstance(event, ExecutionSuspended):
            suspended = True
        elif isinstance(event, ExecutionResumed):
            suspended = False
    return OrchestrationStatus.SUSPENDED if suspended else OrchestrationStatus.RUNNING


def _continue_as_new(
    checkpoint: OrchestrationCheckpoint,
    started: ExecutionStarted,
    completion: CompleteOrchestration,
    now: datetime,
    execution_id: str,
    new_events: Sequence[HistoryEvent],
) -> None:
    """Start the next execution: a fresh history, and its ``ExecutionStarted`` in the inbox.

    What the episode's events asked of the instance rather than of the execution goes on to
    the next one: a suspension or resumption (in order; one that came before what made the
    orchestrator continue was undone by a later resumption, or the orchestrator would still be
    waiting), and the events the orchestration sent to its own instance id."""
    version = completion.new_version or checkpoint.version
    restart = ExecutionStarted(
        timestamp=now,
        name=started.name,
        instance=OrchestrationInstance(instance_id=checkpoint.instance_id, execution_id=execution_id),
        version=version,
        input=completion.result,
        parent=started.parent,
        tags=started.tags,
        trace_context=started.trace_context,  # the next execution continues the same trace
    )
    suspensions = [e for e in new_events if isinstance(e, ExecutionSuspended | ExecutionResumed)]
    instance_id = checkpoint.instance_id
    checkpoint.replace_history = True
    checkpoint.new_history = []
    checkpoint.status = OrchestrationStatus.RUNNING  # until the next execution takes in the suspensions
    checkpoint.execution_id = execution_id
    checkpoint.input = completion.result
    checkpoint.version = version
    checkpoint.activity_tasks = []
    # Timers (and a refused child's failure) are for the old execution; the events it sent to
    # its own instance id wait for the next.
    sent_to_itself = [m for m in checkpoint.messages if m.instance_id == instance_id and m.execution_id is None]
    checkpoint.messages = [m for m in checkpoint.messages if m.instance_id != instance_id]
    checkpoint.messages.append(OutboundMessage(instance_id, restart, execution_id))
    for event in [*completion.carryover_events, *suspensions]:
        checkpoint.messages.append(OutboundMessage(instance_id, event, execution_id))
    checkpoint.messages.extend(sent_to_itself)


def _misaddressed(actions: Sequence[OrchestratorAction]) -> FailureDetails | None:
    """The failure of an episode that sends an entity's message to an id that is not an
    entity's (an SDK worker's; dtfx's own context refuses it), which would reach the
    orchestration of that id; ``None`` if it sends none."""
    for action in actions:
        if not isinstance(action, SendEntityMessage):
            continue
        event = action.event
        targets = event.lock_set if isinstance(event, EntityLockRequested) else [entity_target(event)]
        for target in targets:
            if not is_entity_id(target):
                return FailureDetails(
                    error_type=qualified_name(InvalidInstanceIdError),
                    message=f"The orchestration sent an entity's message to '{target}', which is not an entity's"
                    " id ('@name@key').",
                    is_non_retriable=True,
                )
    return None


def _unstorable(actions: Sequence[OrchestratorAction], custom_status: str | None) -> FailureDetails | None:
    """The failure of an episode whose actions put a NUL character where a task hub keeps
    text as it is (:data:`_TEXT_FIELDS`, the custom status), which none can (PostgreSQL refuses
    it, SQLite cuts the text at it); ``None`` if they do not. (Events are stored as JSON,
    which writes it escaped.)"""
    what = "custom status" if custom_status is not None and "\x00" in custom_status else _nul_field(actions)
    if what is None:
        return None
    return unstorable_failure(f"The orchestration's {what} holds a NUL character, which a task hub cannot store.")


def unstorable_failure(message: str) -> FailureDetails:
    """The failure of work that a task hub cannot store, which no retry would store either."""
    return FailureDetails(
        error_type=qualified_name(UnstorableValueError), message=storable_text(message), is_non_retriable=True
    )


def _nul_field(actions: Sequence[OrchestratorAction]) -> str | None:
    """The first field of ``actions`` kept as text that holds a NUL, named; ``None`` if none does."""
    for action in actions:
        for name in _TEXT_FIELDS.get(type(action), ()):
            value = getattr(action, name)
            if value and "\x00" in value:
                return f"{type(action).__name__} action's {name}"
    return None


_TEXT_FIELDS: dict[type[OrchestratorAction], tuple[str, ...]] = {
    ScheduleTask: ("name",),
    CreateSubOrchestration: ("name", "version", "input"),
    CompleteOrchestration: ("result", "new_version"),
}
"""The fields of actions that a task hub keeps as text (an activity task's name, an instance's
name, version, input and output); sub-orchestration ids are checked as ids."""


def _refused_starts(history: Sequence[HistoryEvent]) -> set[int]:
    """The task ids of the sub-orchestrations in ``history`` whose start was refused, for an id
    no orchestration can have (:func:`_refused_child`) or for an id taken (:data:`REFUSED_START`):
    they never existed."""
    refused = set()
    for event in history:
        if isinstance(event, SubOrchestrationInstanceCreated) and orchestration_id_error(event.instance_id):
            refused.add(event.event_id)
        elif isinstance(event, SubOrchestrationInstanceFailed) and _is_refusal(event.failure_details):
            refused.add(event.task_scheduled_id)
    return refused


def _is_refusal(failure: FailureDetails | None) -> bool:
    return (
        failure is not None
        and failure.error_type in (REFUSED_START, _REFUSED_START_BEFORE)
        and failure.is_non_retriable
    )


def created_children(history: Sequence[HistoryEvent], among: Collection[int] | None = None) -> list[str]:
    """Ids of the sub-orchestrations ``history`` created (those whose task id is ``among``
    the given ones, if given), without those whose start was refused."""
    refused = _refused_starts(history)
    return list(
        dict.fromkeys(
            event.instance_id
            for event in history
            if isinstance(event, SubOrchestrationInstanceCreated)
            and event.event_id not in refused
            and (among is None or event.event_id in among)
        )
    )


def _refused_child(
    error: InvalidInstanceIdError, task_id: int, instance_id: str, execution_id: str | None, now: datetime
) -> OutboundMessage:
    """The failure an orchestration gets for a sub-orchestration asked for under an id no orchestration can have."""
    details = FailureDetails(error_type=qualified_name(type(error)), message=str(error), is_non_retriable=True)
    failed = SubOrchestrationInstanceFailed(timestamp=now, task_scheduled_id=task_id, failure_details=details)
    return OutboundMessage(instance_id, failed, execution_id)


def _notify_parent(
    parent: ParentInstance, completion: CompleteOrchestration, instance_id: str, now: datetime
) -> OutboundMessage:
    event: HistoryEvent
    if completion.status == OrchestrationStatus.COMPLETED:
        event = SubOrchestrationInstanceCompleted(
            timestamp=now, task_scheduled_id=parent.task_scheduled_id, result=completion.result
        )
    else:
        details = completion.failure_details or FailureDetails(
            error_type="OrchestrationTerminated",
            message=f"Sub-orchestration '{instance_id}' was terminated"
            + (f": {completion.result}" if completion.result else "."),
        )
        event = SubOrchestrationInstanceFailed(
            timestamp=now, task_scheduled_id=parent.task_scheduled_id, failure_details=details
        )
    return OutboundMessage(parent.instance_id, event, parent.execution_id)


def _outcome_again(
    history: Sequence[HistoryEvent], parent: ParentInstance, instance_id: str, now: datetime
) -> list[OutboundMessage]:
    """A child that ended otherwise than FAILED tells its rewound parent again how it ended
    (the parent, FAILED when it first told it, dropped it)."""
    ended = next((e for e in reversed(history) if isinstance(e, ExecutionCompleted)), None)
    if ended is None:
        return []
    completion = CompleteOrchestration(
        id=-1, status=ended.status, result=ended.result, failure_details=ended.failure_details
    )
    return [_notify_parent(parent, completion, instance_id, now)]


_ANSWERS = (TaskCompleted, TaskFailed, SubOrchestrationInstanceCompleted, SubOrchestrationInstanceFailed)
"""The events that bring back what an activity or a sub-orchestration came to."""


def open_children(history: Sequence[HistoryEvent]) -> list[str]:
    """Ids of sub-orchestrations created in ``history`` that have not reported back."""
    refused = _refused_starts(history)
    created: dict[int, str] = {}
    for event in history:
        if isinstance(event, SubOrchestrationInstanceCreated) and event.event_id not in refused:
            created[event.event_id] = event.instance_id
        elif isinstance(event, SubOrchestrationInstanceCompleted | SubOrchestrationInstanceFailed):
            created.pop(event.task_scheduled_id, None)
    return list(dict.fromkeys(created.values()))


def unchanged_checkpoint(
    item: OrchestrationWorkItem, consumed: list[MessageId], now: datetime
) -> OrchestrationCheckpoint:
    """A checkpoint that only deletes ``consumed`` messages."""
    state = item.state
    return OrchestrationCheckpoint(
        instance_id=item.instance_id,
        lock_token=item.lock_token,
        consumed=consumed,
        new_history=[],
        status=state.runtime_status,
        execution_id=state.execution_id,
        input=state.serialized_input,
        output=state.serialized_output,
        custom_status=state.serialized_custom_status,
        failure_details=state.failure_details,
        version=state.version,
        completed_at=state.completed_at,
        updated_at=state.last_updated_at,
    )


def unstorable_checkpoint(
    item: OrchestrationWorkItem,
    checkpoint: OrchestrationCheckpoint,
    started: ExecutionStarted,
    error: Exception,
    now: datetime,
    history: Sequence[HistoryEvent],
) -> OrchestrationCheckpoint:
    """The checkpoint that fails the instance instead of ``checkpoint``, whose commit the store
    refused for a value it cannot hold (a lone surrogate in an error message, say): committed
    again, it would be refused again every time the episode ran. The episode's events are
    left out; its messages are consumed, its parent, if any, is told, and the entities that
    the critical section it was in (by ``history``, the past history) had locked are unlocked."""
    details = unstorable_failure(f"The episode holds a value the task hub cannot store: {error}")
    failed = unchanged_checkpoint(item, checkpoint.consumed, now)
    failed.finished_tasks = checkpoint.finished_tasks
    failed.new_history = [OrchestratorStarted(timestamp=now)]
    if item.history_size == 0:
        failed.new_history.append(started)
    for message in unlock_messages(history, item.instance_id, now):
        failed.new_history.append(message.event)
        failed.messages.append(message)
    ended = ExecutionCompleted(timestamp=now, status=OrchestrationStatus.FAILED, failure_details=details)
    failed.new_history.append(ended)
    failed.status = OrchestrationStatus.FAILED
    failed.output = None
    failed.failure_details = details
    failed.completed_at = now
    if started.parent is not None:
        end = CompleteOrchestration(id=-1, status=OrchestrationStatus.FAILED, failure_details=details)
        failed.messages.append(_notify_parent(started.parent, end, item.instance_id, now))
    return failed


def terminate_unstarted_checkpoint(
    item: OrchestrationWorkItem, terminate: ExecutionTerminated, consumed: list[MessageId], now: datetime
) -> OrchestrationCheckpoint:
    """Terminate an instance whose (scheduled) start has not been processed yet."""
    checkpoint = unchanged_checkpoint(item, consumed, now)
    checkpoint.new_history = [
        OrchestratorStarted(timestamp=now),
        terminate,
        OrchestratorCompleted(timestamp=now),
        ExecutionCompleted(timestamp=now, status=OrchestrationStatus.TERMINATED, result=terminate.input),
    ]
    checkpoint.status = OrchestrationStatus.TERMINATED
    checkpoint.output = terminate.input
    checkpoint.completed_at = now
    checkpoint.updated_at = now
    return checkpoint


def _rewound_work(history: Sequence[HistoryEvent]) -> tuple[set[int], set[int], set[int]]:
    """What a rewind does again, by the event id of its scheduling: the activities and timers
    (failed, or not come back), the failed sub-orchestrations, and the unanswered ones."""
    retried = {event.retry_of for event in history if isinstance(event, TimerCreated) and event.retry_of is not None}
    answered = {event.task_scheduled_id for event in history if isinstance(event, _ANSWERS)}
    fired = {event.timer_id for event in history if isinstance(event, TimerFired)}
    again = {event.task_scheduled_id for event in history if isinstance(event, TaskFailed)} - retried
    again |= {event.event_id for event in history if isinstance(event, TaskScheduled)} - answered
    again |= {event.event_id for event in history if isinstance(event, TimerCreated)} - fired
    failed_children = {
        event.task_scheduled_id
        for event in history
        if isinstance(event, SubOrchestrationInstanceFailed) and event.task_scheduled_id not in retried
    }
    unanswered = {event.event_id for event in history if isinstance(event, SubOrchestrationInstanceCreated)}
    return again, failed_children, unanswered - answered


def locks_a_rewind_cannot_take_back(history: Sequence[HistoryEvent]) -> list[str]:
    """The entities locked by a critical section inside which a rewind would run work again
    (work that failed, or had not come back, was asked for while the section held its
    locks); none if it can be rewound. The section's locks are gone (released when it ended,
    or when the instance failed), and the replay would go on inside it without them. So does
    a section that a worker ended for an execution it failed in place of its code (see
    :func:`unlocks_of_open_sections`): the code would go on inside it."""
    released = _released_by_the_worker(history)
    if released:
        return released
    again, failed_children, unanswered = _rewound_work(history)
    rerun = again | failed_children | unanswered
    sections: dict[str, tuple[int, list[str]]] = {}  # by id: where it began, and its lock set
    ended: dict[str, int] = {}
    for index, event in enumerate(history):
        if isinstance(event, EntityLockRequested):
            sections.setdefault(event.critical_section_id, (index, event.lock_set))
        elif isinstance(event, EntityUnlockSent):
            ended.setdefault(event.critical_section_id, index)
    for index, event in enumerate(history):
        scheduling = isinstance(event, TaskScheduled | TimerCreated | SubOrchestrationInstanceCreated)
        if scheduling and event.event_id in rerun:
            for section_id, (began, lock_set) in sections.items():
                if began < index < ended.get(section_id, len(history)):
                    return sorted(lock_set)
    return []


_FAILED_BY_THE_WORKER = frozenset(
    qualified_name(error) for error in (NotRegisteredError, UnstorableValueError, InvalidInstanceIdError)
) | {VERSION_MISMATCH}
"""The error types of failures that a worker gives an execution in place of its code's episode
(with the unlocks the code would have sent): its orchestrator not registered, a version the
worker may not run, an episode that no store could keep or that sent an entity's message astray."""


def _released_by_the_worker(history: Sequence[HistoryEvent]) -> list[str]:
    """The entities whose locks the last episode released for an execution that a worker
    failed in place of its code (:data:`_FAILED_BY_THE_WORKER`; its end has no action's id,
    where the code's own end of the same type has its completion's)."""
    end = history[-1] if history else None
    if not isinstance(end, ExecutionCompleted) or end.event_id != -1 or end.failure_details is None:
        return []
    if end.failure_details.error_type not in _FAILED_BY_THE_WORKER:
        return []
    began = max((index for index, event in enumerate(history) if isinstance(event, OrchestratorStarted)), default=0)
    return sorted(event.target_instance_id for event in history[began:] if isinstance(event, EntityUnlockSent))


def unlocks_of_open_sections(
    history: Sequence[HistoryEvent], instance_id: str, now: datetime
) -> list[EntityUnlockSent]:
    """The unlocks that end the critical section ``history`` left open (none if it left none),
    which the orchestrator's code sends as it ends: for an execution ended without its code
    (not registered, a version the worker may not run), failed in place of an episode that
    could not be stored, or replaced by a start under its id.
    An entity that holds the lock releases it; one whose queue holds the request drops it."""
    open_sections = {event.critical_section_id: event for event in history if isinstance(event, EntityLockRequested)}
    for event in history:
        if isinstance(event, EntityUnlockSent):
            open_sections.pop(event.critical_section_id, None)
    next_id = max((event.event_id for event in history), default=-1) + 1
    unlocks = []
    for section in open_sections.values():
        for target in section.lock_set:
            unlock = EntityUnlockSent(
                event_id=next_id,  # the id of the action that would send it, the next after the history's
                timestamp=now,
                critical_section_id=section.critical_section_id,
                parent_instance_id=instance_id,
                target_instance_id=target,
            )
            unlocks.append(unlock)
            next_id += 1
    return unlocks


def unlock_messages(history: Sequence[HistoryEvent], instance_id: str, now: datetime) -> list[OutboundMessage]:
    """The messages that deliver :func:`unlocks_of_open_sections` (each unlock is its message's event)."""
    return [
        OutboundMessage(unlock.target_instance_id, unlock)
        for unlock in unlocks_of_open_sections(history, instance_id, now)
    ]


def releases_of_open_sections(
    history: Sequence[HistoryEvent], instance_id: str, now: datetime
) -> list[SendEntityMessage]:
    """The actions that send :func:`unlocks_of_open_sections`."""
    return [
        SendEntityMessage(id=unlock.event_id, event=unlock)
        for unlock in unlocks_of_open_sections(history, instance_id, now)
    ]


def failed_children(history: Sequence[HistoryEvent]) -> list[str]:
    """The instance ids of the sub-orchestrations whose failure a rewind of ``history`` rewinds
    (a refused start, which never existed, aside)."""
    return created_children(history, among=_rewound_work(history)[1])


def rewind_checkpoint(
    item: OrchestrationWorkItem, history: Sequence[HistoryEvent], consumed: list[MessageId], now: datetime
) -> OrchestrationCheckpoint:
    """Rewind a failed instance: drop its failed work from history and run it again.

    Failed activities lose their ``TaskScheduled`` and ``TaskFailed`` events, so the
    replay schedules them again; failed sub-orchestrations lose their failure and are
    rewound themselves (one whose start was refused never existed: it is asked for again,
    like an activity). What had not come back when the execution failed, whose news the
    FAILED instance then dropped, is asked for again too: an activity or a timer, by the
    replay; a sub-orchestration, by the rewind sent to it, which it answers with its
    outcome if it has ended otherwise than FAILED. An attempt that a retry policy retried
    stays: the retry chain replays as before and only its last attempt runs again. The
    ``ExecutionRewound`` is kept at the end of the history, with its reason; the execution
    id stays. Only ``consumed`` messages are consumed: an event that came with the rewind
    waits for the episodes that follow.
    """
    again, failed_children, unanswered = _rewound_work(history)
    refused = _refused_starts(history)
    kept: list[HistoryEvent] = []
    children: dict[str, int] = {}
    for event in history:
        if isinstance(event, ExecutionCompleted):
            continue
        if isinstance(event, TaskFailed) and event.task_scheduled_id in again:
            continue
        if isinstance(event, TaskScheduled | TimerCreated) and event.event_id in again:
            continue
        if isinstance(event, SubOrchestrationInstanceFailed) and event.task_scheduled_id in failed_children:
            continue
        if isinstance(event, SubOrchestrationInstanceCreated) and event.event_id in failed_children | unanswered:
            if event.event_id in refused:  # it never existed: like a failed activity, the replay asks for it again
                continue
            children.setdefault(event.instance_id, event.event_id)
        kept.append(event)
    rewind = next(e for e in (m.event for m in item.messages) if isinstance(e, ExecutionRewound))
    kept.append(rewind)  # why it was rewound, for the record

    checkpoint = unchanged_checkpoint(item, consumed, now)
    checkpoint.replace_history = checkpoint.counts_on = True
    checkpoint.new_history = kept
    checkpoint.status = OrchestrationStatus.RUNNING
    checkpoint.output = None
    checkpoint.failure_details = None
    checkpoint.completed_at = None
    checkpoint.updated_at = now
    execution_id = item.state.execution_id
    for child_id, task_id in children.items():
        parent = ParentInstance(instance_id=item.instance_id, execution_id=execution_id, task_scheduled_id=task_id)
        child_rewind = ExecutionRewound(timestamp=now, reason=rewind.reason, parent=parent)
        checkpoint.messages.append(OutboundMessage(child_id, child_rewind))
    wake_up = GenericEvent(timestamp=now, data="rewound")
    checkpoint.messages.append(OutboundMessage(item.instance_id, wake_up, item.state.execution_id))
    return checkpoint
