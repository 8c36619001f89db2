"""dtfx's model <-> the sidecar protocol's protobuf messages, in both directions.

History events, orchestrator actions, failure details, statuses, instance
states and entity batches map one to one (:mod:`dtfx.core.history` follows the
protocol's ``HistoryEvent``). Payloads are JSON text on both sides and pass through as they
are. Every event leaving dtfx carries a timestamp. Trace contexts pass through as well
(see :class:`~dtfx.TraceContext`).

Reading a message a peer sent raises :class:`InvalidMessageError` when it cannot
be represented (a missing required field, an unknown ``oneof`` case); the service
answers such requests with ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from google.protobuf import json_format, timestamp_pb2, wrappers_pb2

from dtfx.core import actions, history
from dtfx.core.entities import (
    BatchResult,
    EntityAction,
    EntityInstanceId,
    EntityMetadata,
    OperationRequest,
    OperationResult,
    SignalEntity,
    StartOrchestration,
)
from dtfx.core.history import (
    FailureDetails,
    HistoryEvent,
    OrchestrationSpan,
    OrchestrationStatus,
    TraceContext,
    is_span_id,
    trace_context_problem,
)
from dtfx.core.instance_ids import is_entity_id, orchestration_id_error
from dtfx.core.moments import as_utc
from dtfx.core.state import OrchestrationState
from dtfx.grpc.protos import pb


class InvalidMessageError(ValueError):
    """A protobuf message from a peer that dtfx cannot accept; the text says why."""


# -- scalars --------------------------------------------------------------------------------


def string_value(value: str | None) -> wrappers_pb2.StringValue | None:
    """``value`` as a ``StringValue`` (``None`` stays unset)."""
    return None if value is None else wrappers_pb2.StringValue(value=value)


def optional_string(message: Any, field: str) -> str | None:
    """A ``StringValue`` field's text, or ``None`` when the field is unset."""
    return str(getattr(message, field).value) if message.HasField(field) else None


def timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    """``moment`` as a ``Timestamp`` (naive datetimes are UTC)."""
    if moment is None:
        return None
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(as_utc(moment))
    return value


def optional_datetime(message: Any, field: str) -> datetime | None:
    """A ``Timestamp`` field as an aware UTC datetime, or ``None`` when unset."""
    if not message.HasField(field):
        return None
    try:
        return getattr(message, field).ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]
    except (ValueError, OverflowError) as error:
        raise InvalidMessageError(f"{field} is not a valid timestamp: {error}") from None


def required_datetime(message: Any, field: str, what: str) -> datetime:
    """A ``Timestamp`` field that must be set."""
    moment = optional_datetime(message, field)
    if moment is None:
        raise InvalidMessageError(f"{what} needs {field}.")
    return moment


# -- trace contexts ------------------------------------------------------------------------------


def trace_context_to_proto(context: TraceContext | None) -> pb.TraceContext | None:
    """A trace context as the protocol's ``TraceContext`` (``None`` stays unset)."""
    if context is None:
        return None
    return pb.TraceContext(
        traceParent=context.trace_parent, spanID=context.span_id or "", traceState=string_value(context.trace_state)
    )


def optional_trace_context(message: Any, field: str = "parentTraceContext") -> TraceContext | None:
    """A ``TraceContext`` field, or ``None`` when it is unset or is no W3C trace context
    (as W3C's Trace Context has a receiver ignore one it cannot read)."""
    if not message.HasField(field):
        return None
    received = getattr(message, field)
    context = TraceContext(
        trace_parent=received.traceParent,
        trace_state=optional_string(received, "traceState"),
        span_id=received.spanID or None,
    )
    return None if trace_context_problem(context) else context


def span_to_proto(span: OrchestrationSpan | None) -> pb.OrchestrationTraceContext | None:
    """An execution's span as the protocol's ``OrchestrationTraceContext`` (``None`` stays unset)."""
    if span is None:
        return None
    return pb.OrchestrationTraceContext(spanID=string_value(span.span_id), spanStartTime=timestamp(span.start_time))


def optional_span(message: Any, field: str = "orchestrationTraceContext") -> OrchestrationSpan | None:
    """An ``OrchestrationTraceContext`` field, or ``None`` when it is unset or empty (a span
    id that is not W3C's is left out)."""
    if not message.HasField(field):
        return None
    context = getattr(message, field)
    span_id = optional_string(context, "spanID")
    span = OrchestrationSpan(
        span_id=span_id if span_id is not None and is_span_id(span_id) else None,
        start_time=optional_datetime(context, "spanStartTime"),
    )
    return None if span == OrchestrationSpan() else span


def status_to_proto(status: OrchestrationStatus) -> pb.OrchestrationStatus:
    """The protocol's status value (the numbers are the same)."""
    return cast(pb.OrchestrationStatus, int(status))


def status_from_proto(value: int) -> OrchestrationStatus:
    """A status number from a peer."""
    try:
        return OrchestrationStatus(value)
    except ValueError:
        raise InvalidMessageError(f"{value} is not an orchestration status.") from None


# -- failure details ------------------------------------------------------------------------


def failure_to_proto(details: FailureDetails | None) -> pb.TaskFailureDetails | None:
    """Failure details as ``TaskFailureDetails`` (``None`` stays unset)."""
    if details is None:
        return None
    message = pb.TaskFailureDetails(
        errorType=details.error_type,
        errorMessage=details.message,
        stackTrace=string_value(details.stack_trace),
        innerFailure=failure_to_proto(details.inner_failure),
        isNonRetriable=details.is_non_retriable,
    )
    for key, value in (details.properties or {}).items():
        json_format.ParseDict(value, message.properties[key])
    return message


def failure_from_proto(message: pb.TaskFailureDetails) -> FailureDetails:
    """The inverse of :func:`failure_to_proto`; property values are kept as the JSON values they are
    (a number as a float: protobuf's ``Value`` has no integers)."""
    properties = {key: json_format.MessageToDict(value) for key, value in message.properties.items()}
    return FailureDetails(
        error_type=message.errorType,
        message=message.errorMessage,
        stack_trace=optional_string(message, "stackTrace"),
        inner_failure=failure_from_proto(message.innerFailure) if message.HasField("innerFailure") else None,
        is_non_retriable=message.isNonRetriable,
        properties=properties or None,
    )


def optional_failure(message: Any, field: str = "failureDetails") -> FailureDetails | None:
    """A ``TaskFailureDetails`` field, or ``None`` when unset."""
    return failure_from_proto(getattr(message, field)) if message.HasField(field) else None


def _required_failure(message: Any, what: str) -> FailureDetails:
    details = optional_failure(message)
    if details is None:
        raise InvalidMessageError(f"{what} needs failureDetails.")
    return details


# -- instances --------------------------------------------------------------------------------


def _instance_to_proto(instance_id: str, execution_id: str | None) -> pb.OrchestrationInstance:
    return pb.OrchestrationInstance(instanceId=instance_id, executionId=string_value(execution_id))


def _parent_to_proto(parent: history.ParentInstance | None) -> pb.ParentInstanceInfo | None:
    if parent is None:
        return None
    return pb.ParentInstanceInfo(
        taskScheduledId=parent.task_scheduled_id,
        name=string_value(parent.name),
        version=string_value(parent.version),
        orchestrationInstance=_instance_to_proto(parent.instance_id, parent.execution_id),
    )


def _parent_from_proto(message: pb.ExecutionStartedEvent) -> history.ParentInstance | None:
    if not message.HasField("parentInstance"):
        return None
    parent = message.parentInstance
    return history.ParentInstance(
        instance_id=parent.orchestrationInstance.instanceId,
        execution_id=optional_string(parent.orchestrationInstance, "executionId"),
        name=optional_string(parent, "name"),
        version=optional_string(parent, "version"),
        task_scheduled_id=parent.taskScheduledId,
    )


def _tags(tags: Mapping[str, str] | None) -> dict[str, str] | None:
    return dict(tags) if tags else None


# -- history events: dtfx -> protobuf ---------------------------------------------------------


def event_to_proto(event: HistoryEvent) -> pb.HistoryEvent:
    """One history event as the protocol's ``HistoryEvent``."""
    build = _EVENT_TO_PROTO.get(type(event))
    if build is None:
        raise TypeError(f"{type(event).__name__} has no protocol counterpart")
    field, payload = build(event)
    message = pb.HistoryEvent(eventId=event.event_id, timestamp=timestamp(event.timestamp))
    getattr(message, field).CopyFrom(payload)
    return message


def events_to_proto(events: Iterable[HistoryEvent]) -> list[pb.HistoryEvent]:
    """Several events, in order."""
    return [event_to_proto(event) for event in events]


def _execution_started(e: history.ExecutionStarted) -> pb.ExecutionStartedEvent:
    return pb.ExecutionStartedEvent(
        name=e.name,
        version=string_value(e.version),
        input=string_value(e.input),
        orchestrationInstance=_instance_to_proto(e.instance.instance_id, e.instance.execution_id),
        parentInstance=_parent_to_proto(e.parent),
        scheduledStartTimestamp=timestamp(e.scheduled_start_time),
        parentTraceContext=trace_context_to_proto(e.trace_context),
        tags=e.tags,
    )


def _entity_signaled(e: history.EntityOperationSignaled) -> pb.EntityOperationSignaledEvent:
    return pb.EntityOperationSignaledEvent(
        requestId=e.request_id,
        operation=e.operation,
        scheduledTime=timestamp(e.scheduled_time),
        input=string_value(e.input),
        targetInstanceId=string_value(e.target_instance_id),
    )


def _entity_called(e: history.EntityOperationCalled) -> pb.EntityOperationCalledEvent:
    return pb.EntityOperationCalledEvent(
        requestId=e.request_id,
        operation=e.operation,
        scheduledTime=timestamp(e.scheduled_time),
        input=string_value(e.input),
        parentInstanceId=string_value(e.parent_instance_id),
        parentExecutionId=string_value(e.parent_execution_id),
        targetInstanceId=string_value(e.target_instance_id),
    )


def _entity_lock_requested(e: history.EntityLockRequested) -> pb.EntityLockRequestedEvent:
    return pb.EntityLockRequestedEvent(
        criticalSectionId=e.critical_section_id,
        lockSet=e.lock_set,
        position=e.position,
        parentInstanceId=string_value(e.parent_instance_id),
    )


def _entity_unlock_sent(e: history.EntityUnlockSent) -> pb.EntityUnlockSentEvent:
    return pb.EntityUnlockSentEvent(
        criticalSectionId=e.critical_section_id,
        parentInstanceId=string_value(e.parent_instance_id),
        targetInstanceId=string_value(e.target_instance_id),
    )


_EVENT_TO_PROTO: dict[type[HistoryEvent], Callable[[Any], tuple[str, Any]]] = {
    history.ExecutionStarted: lambda e: ("executionStarted", _execution_started(e)),
    history.ExecutionCompleted: lambda e: (
        "executionCompleted",
        pb.ExecutionCompletedEvent(
            orchestrationStatus=status_to_proto(e.status),
            result=string_value(e.result),
            failureDetails=failure_to_proto(e.failure_details),
        ),
    ),
    history.ExecutionTerminated: lambda e: (
        "executionTerminated",
        pb.ExecutionTerminatedEvent(input=string_value(e.input), recurse=e.recurse),
    ),
    history.ExecutionSuspended: lambda e: (
        "executionSuspended",
        pb.ExecutionSuspendedEvent(input=string_value(e.input)),
    ),
    history.ExecutionResumed: lambda e: ("executionResumed", pb.ExecutionResumedEvent(input=string_value(e.input))),
    history.ExecutionRewound: lambda e: ("executionRewound", pb.ExecutionRewoundEvent(reason=string_value(e.reason))),
    history.TaskScheduled: lambda e: (
        "taskScheduled",
        pb.TaskScheduledEvent(
            name=e.name,
            version=string_value(e.version),
            input=string_value(e.input),
            parentTraceContext=trace_context_to_proto(e.trace_context),
            tags=e.tags,
        ),
    ),
    history.TaskCompleted: lambda e: (
        "taskCompleted",
        pb.TaskCompletedEvent(taskScheduledId=e.task_scheduled_id, result=string_value(e.result)),
    ),
    history.TaskFailed: lambda e: (
        "taskFailed",
        pb.TaskFailedEvent(taskScheduledId=e.task_scheduled_id, failureDetails=failure_to_proto(e.failure_details)),
    ),
    history.SubOrchestrationInstanceCreated: lambda e: (
        "subOrchestrationInstanceCreated",
        pb.SubOrchestrationInstanceCreatedEvent(
            instanceId=e.instance_id,
            name=e.name,
            version=string_value(e.version),
            input=string_value(e.input),
            parentTraceContext=trace_context_to_proto(e.trace_context),
        ),
    ),
    history.SubOrchestrationInstanceCompleted: lambda e: (
        "subOrchestrationInstanceCompleted",
        pb.SubOrchestrationInstanceCompletedEvent(taskScheduledId=e.task_scheduled_id, result=string_value(e.result)),
    ),
    history.SubOrchestrationInstanceFailed: lambda e: (
        "subOrchestrationInstanceFailed",
        pb.SubOrchestrationInstanceFailedEvent(
            taskScheduledId=e.task_scheduled_id, failureDetails=failure_to_proto(e.failure_details)
        ),
    ),
    history.TimerCreated: lambda e: ("timerCreated", pb.TimerCreatedEvent(fireAt=timestamp(e.fire_at))),
    history.TimerFired: lambda e: ("timerFired", pb.TimerFiredEvent(fireAt=timestamp(e.fire_at), timerId=e.timer_id)),
    history.OrchestratorStarted: lambda e: ("orchestratorStarted", pb.OrchestratorStartedEvent()),
    history.OrchestratorCompleted: lambda e: ("orchestratorCompleted", pb.OrchestratorCompletedEvent()),
    history.EventSent: lambda e: (
        "eventSent",
        pb.EventSentEvent(instanceId=e.instance_id, name=e.name, input=string_value(e.input)),
    ),
    history.EventRaised: lambda e: ("eventRaised", pb.EventRaisedEvent(name=e.name, input=string_value(e.input))),
    history.GenericEvent: lambda e: ("genericEvent", pb.GenericEvent(data=string_value(e.data))),
    history.EntityOperationSignaled: lambda e: ("entityOperationSignaled", _entity_signaled(e)),
    history.EntityOperationCalled: lambda e: ("entityOperationCalled", _entity_called(e)),
    history.EntityOperationCompleted: lambda e: (
        "entityOperationCompleted",
        pb.EntityOperationCompletedEvent(requestId=e.request_id, output=string_value(e.output)),
    ),
    history.EntityOperationFailed: lambda e: (
        "entityOperationFailed",
        pb.EntityOperationFailedEvent(requestId=e.request_id, failureDetails=failure_to_proto(e.failure_details)),
    ),
    history.EntityLockRequested: lambda e: ("entityLockRequested", _entity_lock_requested(e)),
    history.EntityLockGranted: lambda e: (
        "entityLockGranted",
        pb.EntityLockGrantedEvent(criticalSectionId=e.critical_section_id),
    ),
    history.EntityUnlockSent: lambda e: ("entityUnlockSent", _entity_unlock_sent(e)),
}


# -- history events: protobuf -> dtfx ---------------------------------------------------------


def event_from_proto(message: pb.HistoryEvent, now: datetime) -> HistoryEvent:
    """A ``HistoryEvent`` from a peer; one without a timestamp is stamped ``now``."""
    field = message.WhichOneof("eventType")
    if field is None:
        raise InvalidMessageError(f"History event {message.eventId} has no event type.")
    read = _EVENT_FROM_PROTO.get(field)
    if read is None:
        raise InvalidMessageError(f"History events of type '{field}' are not supported.")
    moment = optional_datetime(message, "timestamp") or now
    return read(getattr(message, field), message.eventId, moment)


def events_from_proto(messages: Iterable[pb.HistoryEvent], now: datetime) -> list[HistoryEvent]:
    """Several events, in order."""
    return [event_from_proto(message, now) for message in messages]


def _required_string(message: Any, field: str, what: str) -> str:
    value = optional_string(message, field)
    if not value:
        raise InvalidMessageError(f"{what} needs {field}.")
    return value


def _execution_started_from(m: pb.ExecutionStartedEvent, event_id: int, at: datetime) -> HistoryEvent:
    return history.ExecutionStarted(
        event_id=event_id,
        timestamp=at,
        name=m.name,
        instance=history.OrchestrationInstance(
            instance_id=m.orchestrationInstance.instanceId,
            execution_id=optional_string(m.orchestrationInstance, "executionId"),
        ),
        version=optional_string(m, "version"),
        input=optional_string(m, "input"),
        parent=_parent_from_proto(m),
        scheduled_start_time=optional_datetime(m, "scheduledStartTimestamp"),
        tags=_tags(m.tags),
        trace_context=optional_trace_context(m),
    )


def _entity_signaled_from(m: pb.EntityOperationSignaledEvent, event_id: int, at: datetime) -> HistoryEvent:
    return history.EntityOperationSignaled(
        event_id=event_id,
        timestamp=at,
        request_id=m.requestId,
        operation=m.operation,
        target_instance_id=_required_string(m, "targetInstanceId", "entityOperationSignaled"),
        input=optional_string(m, "input"),
        scheduled_time=optional_datetime(m, "scheduledTime"),
    )


def _entity_called_from(m: pb.EntityOperationCalledEvent, event_id: int, at: datetime) -> HistoryEvent:
    return history.EntityOperationCalled(
        event_id=event_id,
        timestamp=at,
        request_id=m.requestId,
        operation=m.operation,
        target_instance_id=_required_string(m, "targetInstanceId", "entityOperationCalled"),
        parent_instance_id=_required_string(m, "parentInstanceId", "entityOperationCalled"),
        parent_execution_id=optional_string(m, "parentExecutionId"),
        input=optional_string(m, "input"),
        scheduled_time=optional_datetime(m, "scheduledTime"),
    )


def _entity_lock_requested_from(m: pb.EntityLockRequestedEvent, event_id: int, at: datetime) -> HistoryEvent:
    lock_set = list(m.lockSet)
    if not lock_set or len(set(lock_set)) < len(lock_set) or not all(map(is_entity_id, lock_set)):
        raise InvalidMessageError(f"entityLockRequested needs a lockSet of distinct entity ids (got {lock_set}).")
    if not 0 <= m.position < len(lock_set):
        raise InvalidMessageError(f"entityLockRequested's position {m.position} is not in its lockSet.")
    return history.EntityLockRequested(
        event_id=event_id,
        timestamp=at,
        critical_section_id=m.criticalSectionId,
        lock_set=lock_set,
        position=m.position,
        parent_instance_id=_required_string(m, "parentInstanceId", "entityLockRequested"),
    )


def _entity_unlock_sent_from(m: pb.EntityUnlockSentEvent, event_id: int, at: datetime) -> HistoryEvent:
    return history.EntityUnlockSent(
        event_id=event_id,
        timestamp=at,
        critical_section_id=m.criticalSectionId,
        parent_instance_id=_required_string(m, "parentInstanceId", "entityUnlockSent"),
        target_instance_id=_required_string(m, "targetInstanceId", "entityUnlockSent"),
    )


_EVENT_FROM_PROTO: dict[str, Callable[[Any, int, datetime], HistoryEvent]] = {
    "executionStarted": _execution_started_from,
    "executionCompleted": lambda m, i, t: history.ExecutionCompleted(
        event_id=i,
        timestamp=t,
        status=status_from_proto(m.orchestrationStatus),
        result=optional_string(m, "result"),
        failure_details=optional_failure(m),
    ),
    "executionTerminated": lambda m, i, t: history.ExecutionTerminated(
        event_id=i, timestamp=t, input=optional_string(m, "input"), recurse=m.recurse
    ),
    "executionSuspended": lambda m, i, t: history.ExecutionSuspended(
        event_id=i, timestamp=t, input=optional_string(m, "input")
    ),
    "executionResumed": lambda m, i, t: history.ExecutionResumed(
        event_id=i, timestamp=t, input=optional_string(m, "input")
    ),
    "executionRewound": lambda m, i, t: history.ExecutionRewound(
        event_id=i, timestamp=t, reason=optional_string(m, "reason")
    ),
    "taskScheduled": lambda m, i, t: history.TaskScheduled(
        event_id=i,
        timestamp=t,
        name=m.name,
        version=optional_string(m, "version"),
        input=optional_string(m, "input"),
        tags=_tags(m.tags),
        trace_context=optional_trace_context(m),
    ),
    "taskCompleted": lambda m, i, t: history.TaskCompleted(
        event_id=i, timestamp=t, task_scheduled_id=m.taskScheduledId, result=optional_string(m, "result")
    ),
    "taskFailed": lambda m, i, t: history.TaskFailed(
        event_id=i,
        timestamp=t,
        task_scheduled_id=m.taskScheduledId,
        failure_details=_required_failure(m, "taskFailed"),
    ),
    "subOrchestrationInstanceCreated": lambda m, i, t: history.SubOrchestrationInstanceCreated(
        event_id=i,
        timestamp=t,
        instance_id=m.instanceId,
        name=m.name,
        version=optional_string(m, "version"),
        input=optional_string(m, "input"),
        trace_context=optional_trace_context(m),
    ),
    "subOrchestrationInstanceCompleted": lambda m, i, t: history.SubOrchestrationInstanceCompleted(
        event_id=i, timestamp=t, task_scheduled_id=m.taskScheduledId, result=optional_string(m, "result")
    ),
    "subOrchestrationInstanceFailed": lambda m, i, t: history.SubOrchestrationInstanceFailed(
        event_id=i,
        timestamp=t,
        task_scheduled_id=m.taskScheduledId,
        failure_details=_required_failure(m, "subOrchestrationInstanceFailed"),
    ),
    "timerCreated": lambda m, i, t: history.TimerCreated(
        event_id=i, timestamp=t, fire_at=required_datetime(m, "fireAt", "timerCreated")
    ),
    "timerFired": lambda m, i, t: history.TimerFired(
        event_id=i, timestamp=t, timer_id=m.timerId, fire_at=required_datetime(m, "fireAt", "timerFired")
    ),
    "orchestratorStarted": lambda m, i, t: history.OrchestratorStarted(event_id=i, timestamp=t),
    "orchestratorCompleted": lambda m, i, t: history.OrchestratorCompleted(event_id=i, timestamp=t),
    "eventSent": lambda m, i, t: history.EventSent(
        event_id=i, timestamp=t, instance_id=m.instanceId, name=m.name, input=optional_string(m, "input")
    ),
    "eventRaised": lambda m, i, t: history.EventRaised(
        event_id=i, timestamp=t, name=m.name, input=optional_string(m, "input")
    ),
    "genericEvent": lambda m, i, t: history.GenericEvent(event_id=i, timestamp=t, data=optional_string(m, "data")),
    "entityOperationSignaled": _entity_signaled_from,
    "entityOperationCalled": _entity_called_from,
    "entityOperationCompleted": lambda m, i, t: history.EntityOperationCompleted(
        event_id=i, timestamp=t, request_id=m.requestId, output=optional_string(m, "output")
    ),
    "entityOperationFailed": lambda m, i, t: history.EntityOperationFailed(
        event_id=i,
        timestamp=t,
        request_id=m.requestId,
        failure_details=_required_failure(m, "entityOperationFailed"),
    ),
    "entityLockRequested": _entity_lock_requested_from,
    "entityLockGranted": lambda m, i, t: history.EntityLockGranted(
        event_id=i, timestamp=t, critical_section_id=m.criticalSectionId
    ),
    "entityUnlockSent": _entity_unlock_sent_from,
}


# -- orchestrator actions ---------------------------------------------------------------------

_COMPLETION_STATUSES = frozenset(
    {
        OrchestrationStatus.COMPLETED,
        OrchestrationStatus.FAILED,
        OrchestrationStatus.TERMINATED,
        OrchestrationStatus.CONTINUED_AS_NEW,
    }
)


def action_from_proto(message: pb.OrchestratorAction, instance_id: str, now: datetime) -> actions.OrchestratorAction:
    """An action an SDK worker returned for ``instance_id``; the events it carries are stamped
    ``now`` if the worker did not stamp them."""
    field = message.WhichOneof("orchestratorActionType")
    action_id = message.id
    if field == "scheduleTask":
        task = message.scheduleTask
        if not task.name:
            raise InvalidMessageError(f"scheduleTask action {action_id} needs a name.")
        return actions.ScheduleTask(
            id=action_id,
            name=task.name,
            version=optional_string(task, "version"),
            input=optional_string(task, "input"),
            tags=_tags(task.tags),
            trace_context=optional_trace_context(task),
        )
    if field == "createSubOrchestration":
        child = message.createSubOrchestration
        if not child.name:
            raise InvalidMessageError(f"createSubOrchestration action {action_id} needs a name.")
        return actions.CreateSubOrchestration(
            id=action_id,
            # The SDKs name children themselves; this is their default, for peers that do not.
            instance_id=child.instanceId or f"{instance_id}:{action_id:04x}",
            name=child.name,
            version=optional_string(child, "version"),
            input=optional_string(child, "input"),
            tags=_tags(child.tags),
            trace_context=optional_trace_context(child),
        )
    if field == "createTimer":
        fire_at = required_datetime(message.createTimer, "fireAt", f"createTimer action {action_id}")
        return actions.CreateTimer(id=action_id, fire_at=fire_at)
    if field == "sendEvent":
        send = message.sendEvent
        if not send.instance.instanceId or not send.name:
            raise InvalidMessageError(f"sendEvent action {action_id} needs a target instance and an event name.")
        return actions.SendEvent(
            id=action_id, instance_id=send.instance.instanceId, name=send.name, data=optional_string(send, "data")
        )
    if field == "completeOrchestration":
        return _completion_from_proto(message.completeOrchestration, action_id, now)
    if field == "terminateOrchestration":
        terminate = message.terminateOrchestration
        if not terminate.instanceId:
            raise InvalidMessageError(f"terminateOrchestration action {action_id} needs an instanceId.")
        return actions.TerminateOrchestration(
            id=action_id,
            instance_id=terminate.instanceId,
            reason=optional_string(terminate, "reason"),
            recurse=terminate.recurse,
        )
    if field == "sendEntityMessage":
        entity_field = message.sendEntityMessage.WhichOneof("EntityMessageType")
        if entity_field is None:
            raise InvalidMessageError(f"sendEntityMessage action {action_id} carries no entity message.")
        read = _EVENT_FROM_PROTO[entity_field]
        event = read(getattr(message.sendEntityMessage, entity_field), action_id, now)
        return actions.SendEntityMessage(id=action_id, event=event)
    if field == "rewindOrchestration":
        return actions.RewindOrchestration(
            id=action_id, new_history=events_from_proto(message.rewindOrchestration.newHistory, now)
        )
    raise InvalidMessageError(f"Action {action_id} has no action type.")


def _completion_from_proto(
    complete: pb.CompleteOrchestrationAction, action_id: int, now: datetime
) -> actions.CompleteOrchestration:
    status = status_from_proto(complete.orchestrationStatus)
    if status not in _COMPLETION_STATUSES:
        raise InvalidMessageError(
            f"completeOrchestration action {action_id} has status {status.name}; "
            "expected COMPLETED, FAILED, TERMINATED or CONTINUED_AS_NEW."
        )
    failure = optional_failure(complete)
    if status == OrchestrationStatus.FAILED and failure is None:
        # The legacy ``details`` text is all some peers send about a failure.
        failure = FailureDetails(
            error_type="OrchestrationFailed",
            message=optional_string(complete, "details") or optional_string(complete, "result") or "",
        )
    return actions.CompleteOrchestration(
        id=action_id,
        status=status,
        result=optional_string(complete, "result"),
        failure_details=failure,
        new_version=optional_string(complete, "newVersion"),
        carryover_events=events_from_proto(complete.carryoverEvents, now),
    )


def actions_from_proto(
    messages: Iterable[pb.OrchestratorAction], instance_id: str, now: datetime
) -> list[actions.OrchestratorAction]:
    """Several actions, in order."""
    return [action_from_proto(message, instance_id, now) for message in messages]


def action_to_proto(action: actions.OrchestratorAction) -> pb.OrchestratorAction:
    """The inverse of :func:`action_from_proto`."""
    message = pb.OrchestratorAction(id=action.id)
    if isinstance(action, actions.ScheduleTask):
        message.scheduleTask.CopyFrom(
            pb.ScheduleTaskAction(
                name=action.name,
                version=string_value(action.version),
                input=string_value(action.input),
                tags=action.tags,
                parentTraceContext=trace_context_to_proto(action.trace_context),
            )
        )
    elif isinstance(action, actions.CreateSubOrchestration):
        message.createSubOrchestration.CopyFrom(
            pb.CreateSubOrchestrationAction(
                instanceId=action.instance_id,
                name=action.name,
                version=string_value(action.version),
                input=string_value(action.input),
                parentTraceContext=trace_context_to_proto(action.trace_context),
                tags=action.tags,
            )
        )
    elif isinstance(action, actions.CreateTimer):
        message.createTimer.CopyFrom(pb.CreateTimerAction(fireAt=timestamp(action.fire_at)))
    elif isinstance(action, actions.SendEvent):
        message.sendEvent.CopyFrom(
            pb.SendEventAction(
                instance=pb.OrchestrationInstance(instanceId=action.instance_id),
                name=action.name,
                data=string_value(action.data),
            )
        )
    elif isinstance(action, actions.CompleteOrchestration):
        message.completeOrchestration.CopyFrom(
            pb.CompleteOrchestrationAction(
                orchestrationStatus=status_to_proto(action.status),
                result=string_value(action.result),
                newVersion=string_value(action.new_version),
                carryoverEvents=events_to_proto(action.carryover_events),
                failureDetails=failure_to_proto(action.failure_details),
            )
        )
    elif isinstance(action, actions.TerminateOrchestration):
        message.terminateOrchestration.CopyFrom(
            pb.TerminateOrchestrationAction(
                instanceId=action.instance_id, reason=string_value(action.reason), recurse=action.recurse
            )
        )
    elif isinstance(action, actions.SendEntityMessage):
        event = event_to_proto(action.event)
        field = event.WhichOneof("eventType")
        getattr(message.sendEntityMessage, str(field)).CopyFrom(getattr(event, str(field)))
    elif isinstance(action, actions.RewindOrchestration):
        message.rewindOrchestration.CopyFrom(
            pb.RewindOrchestrationAction(newHistory=events_to_proto(action.new_history))
        )
    else:
        raise TypeError(f"{type(action).__name__} has no protocol counterpart")
    return message


# -- instance state ---------------------------------------------------------------------------


def state_to_proto(state: OrchestrationState) -> pb.OrchestrationState:
    """An instance's state as the protocol's ``OrchestrationState``."""
    status = state.runtime_status
    if status == OrchestrationStatus.CANCELED:
        # dtfx never sets CANCELED, and the Python SDK's status enum cannot read it.
        status = OrchestrationStatus.TERMINATED
    return pb.OrchestrationState(
        instanceId=state.instance_id,
        name=state.name,
        version=string_value(state.version),
        orchestrationStatus=status_to_proto(status),
        scheduledStartTimestamp=timestamp(state.scheduled_start_at),
        createdTimestamp=timestamp(state.created_at),
        lastUpdatedTimestamp=timestamp(state.last_updated_at),
        input=string_value(state.serialized_input),
        output=string_value(state.serialized_output),
        customStatus=string_value(state.serialized_custom_status),
        failureDetails=failure_to_proto(state.failure_details),
        executionId=string_value(state.execution_id),
        completedTimestamp=timestamp(state.completed_at),
        parentInstanceId=string_value(state.parent_instance_id),
        tags=state.tags,
    )


def state_from_proto(message: pb.OrchestrationState) -> OrchestrationState:
    """The inverse of :func:`state_to_proto`."""
    return OrchestrationState(
        instance_id=message.instanceId,
        name=message.name,
        runtime_status=status_from_proto(message.orchestrationStatus),
        created_at=required_datetime(message, "createdTimestamp", "OrchestrationState"),
        last_updated_at=required_datetime(message, "lastUpdatedTimestamp", "OrchestrationState"),
        serialized_input=optional_string(message, "input"),
        serialized_output=optional_string(message, "output"),
        serialized_custom_status=optional_string(message, "customStatus"),
        failure_details=optional_failure(message),
        version=optional_string(message, "version"),
        execution_id=optional_string(message, "executionId"),
        parent_instance_id=optional_string(message, "parentInstanceId"),
        scheduled_start_at=optional_datetime(message, "scheduledStartTimestamp"),
        completed_at=optional_datetime(message, "completedTimestamp"),
        tags=_tags(message.tags),
    )


# -- entities ---------------------------------------------------------------------------------


def entity_id_from_proto(instance_id: str, what: str) -> EntityInstanceId:
    """An entity id a peer sent (``@name@key``; the name is case-insensitive)."""
    try:
        return EntityInstanceId.parse(instance_id)
    except ValueError as error:
        raise InvalidMessageError(f"{what}: {error}") from None


def entity_metadata_to_proto(metadata: EntityMetadata) -> pb.EntityMetadata:
    """What a client sees of an entity, as the protocol's ``EntityMetadata``."""
    return pb.EntityMetadata(
        instanceId=str(metadata.id),
        lastModifiedTime=timestamp(metadata.last_modified),
        backlogQueueSize=metadata.backlog_queue_size,
        lockedBy=string_value(metadata.locked_by),
        serializedState=string_value(metadata.serialized_state),
    )


def entity_request_to_proto(
    instance_id: str, execution_id: str | None, state: str | None, operations: Iterable[OperationRequest]
) -> pb.EntityRequest:
    """An entity batch as ``EntityRequest`` (V2): the operations as the events they arrived as."""
    return pb.EntityRequest(
        instanceId=instance_id,
        executionId=execution_id or "",
        entityState=string_value(state),
        operationRequests=events_to_proto(operations),
    )


def entity_batch_request_to_proto(
    instance_id: str, state: str | None, operations: Iterable[OperationRequest]
) -> pb.EntityBatchRequest:
    """An entity batch in the older shape, ``EntityBatchRequest``."""
    return pb.EntityBatchRequest(
        instanceId=instance_id,
        entityState=string_value(state),
        operations=[
            pb.OperationRequest(
                operation=o.operation,
                requestId=o.request_id,
                input=string_value(o.input),
                traceContext=trace_context_to_proto(o.trace_context),
            )
            for o in operations
        ],
    )


def batch_result_from_proto(
    message: pb.EntityBatchResult, state_before: str | None, operations: Sequence[OperationRequest]
) -> BatchResult:
    """What a worker returned for a batch of ``operations`` run on ``state_before``.

    A batch that failed as a whole (``failureDetails``) fails every operation and
    leaves the state as it was. Otherwise there is one result per operation, in
    order, and an unset ``entityState`` means the entity's state was deleted.
    """
    if message.HasField("failureDetails"):
        return BatchResult.failing(state_before, operations, failure_from_proto(message.failureDetails))
    if len(message.results) != len(operations):
        raise InvalidMessageError(
            f"The batch has {len(operations)} operation(s), but the result has {len(message.results)} result(s)."
        )
    sent = [operation.request_id for operation in operations]
    echoed = [info.requestId for info in message.operationInfos]
    if echoed and echoed != sent:
        raise InvalidMessageError(f"The result's operationInfos name requests {echoed}, but the batch was {sent}.")
    return BatchResult(
        optional_string(message, "entityState"),
        [_operation_result_from_proto(result, index) for index, result in enumerate(message.results)],
        [_entity_action_from_proto(action) for action in message.actions],
    )


def _operation_result_from_proto(message: pb.OperationResult, index: int) -> OperationResult:
    kind = message.WhichOneof("resultType")
    if kind == "success":
        return OperationResult(output=optional_string(message.success, "result"))
    if kind == "failure":
        return OperationResult(failure=_required_failure(message.failure, f"The failure of operation {index}"))
    raise InvalidMessageError(f"The result of operation {index} is neither a success nor a failure.")


def _entity_action_from_proto(message: pb.OperationAction) -> EntityAction:
    kind = message.WhichOneof("operationActionType")
    if kind == "sendSignal":
        signal = message.sendSignal
        target = entity_id_from_proto(signal.instanceId, f"sendSignal action {message.id}")
        if not signal.name:
            raise InvalidMessageError(f"sendSignal action {message.id} needs the operation's name.")
        return SignalEntity(
            str(target),
            signal.name,
            optional_string(signal, "input"),
            optional_datetime(signal, "scheduledTime"),
            optional_trace_context(signal),
        )
    if kind == "startNewOrchestration":
        start = message.startNewOrchestration
        if not start.name:
            raise InvalidMessageError(f"startNewOrchestration action {message.id} needs the orchestration's name.")
        refused = orchestration_id_error(start.instanceId) if start.instanceId else None
        if refused is not None:
            raise InvalidMessageError(f"startNewOrchestration action {message.id}: {refused}")
        return StartOrchestration(
            start.instanceId or uuid.uuid4().hex,
            start.name,
            optional_string(start, "input"),
            optional_string(start, "version"),
            optional_datetime(start, "scheduledTime"),
            optional_trace_context(start),
        )
    raise InvalidMessageError(f"Entity action {message.id} has no action type.")
