"""dtfx's model <-> protobuf: every history event, action, failure and state, both ways."""

from __future__ import annotations

import typing
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from google.protobuf import struct_pb2, wrappers_pb2

from dtfx.core import actions, history
from dtfx.core.history import FailureDetails, OrchestrationStatus
from dtfx.core.state import OrchestrationState
from dtfx.grpc.convert import (
    InvalidMessageError,
    action_from_proto,
    action_to_proto,
    event_from_proto,
    event_to_proto,
    failure_from_proto,
    failure_to_proto,
    optional_span,
    optional_trace_context,
    span_to_proto,
    state_from_proto,
    state_to_proto,
)

NOW = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
TRACE = history.TraceContext(
    trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    trace_state="k=v",
    span_id="b7ad6b7169203331",
)
FAILURE = FailureDetails(
    error_type="builtins.ValueError",
    message="bad",
    stack_trace="Traceback ...",
    inner_failure=FailureDetails(error_type="KeyError", message="'k'"),
    is_non_retriable=True,
    properties={"code": 42.0, "text": "42", "retry": False, "none": None, "nested": {"a": [1.0, "b"]}},
)

EVENTS: list[history.HistoryEvent] = [
    history.ExecutionStarted(
        event_id=-1,
        timestamp=NOW,
        name="orders",
        instance=history.OrchestrationInstance(instance_id="i", execution_id="e1"),
        version="1.0",
        input='{"a": 1}',
        parent=history.ParentInstance(
            instance_id="p", execution_id="pe", name="parent", version="2", task_scheduled_id=3
        ),
        scheduled_start_time=LATER,
        tags={"team": "x"},
        trace_context=TRACE,
    ),
    history.ExecutionStarted(timestamp=NOW, name="bare", instance=history.OrchestrationInstance(instance_id="i")),
    history.ExecutionCompleted(event_id=9, timestamp=NOW, status=OrchestrationStatus.COMPLETED, result='"ok"'),
    history.ExecutionCompleted(timestamp=NOW, status=OrchestrationStatus.FAILED, failure_details=FAILURE),
    history.ExecutionTerminated(timestamp=NOW, input='"stop"', recurse=True),
    history.ExecutionSuspended(timestamp=NOW, input="why"),
    history.ExecutionResumed(timestamp=NOW),
    history.ExecutionRewound(timestamp=NOW, reason="retry"),
    history.TaskScheduled(
        event_id=1, timestamp=NOW, name="act", version="1", input="[1]", tags={"k": "v"}, trace_context=TRACE
    ),
    history.TaskCompleted(timestamp=NOW, task_scheduled_id=1, result="2"),
    history.TaskCompleted(timestamp=NOW, task_scheduled_id=0, result=""),
    history.TaskFailed(timestamp=NOW, task_scheduled_id=1, failure_details=FAILURE),
    history.SubOrchestrationInstanceCreated(
        event_id=2, timestamp=NOW, instance_id="c", name="child", input="1", trace_context=TRACE
    ),
    history.SubOrchestrationInstanceCompleted(timestamp=NOW, task_scheduled_id=2, result="3"),
    history.SubOrchestrationInstanceFailed(timestamp=NOW, task_scheduled_id=2, failure_details=FAILURE),
    history.TimerCreated(event_id=3, timestamp=NOW, fire_at=LATER),
    history.TimerFired(timestamp=LATER, timer_id=3, fire_at=LATER),
    history.OrchestratorStarted(timestamp=NOW),
    history.OrchestratorCompleted(timestamp=NOW),
    history.EventSent(event_id=4, timestamp=NOW, instance_id="other", name="ping", input="null"),
    history.EventRaised(timestamp=NOW, name="approval", input='"yes"'),
    history.GenericEvent(timestamp=NOW, data="rewound"),
    history.EntityOperationSignaled(
        event_id=5, timestamp=NOW, request_id="r1", operation="add", target_instance_id="@counter@a", input="1"
    ),
    history.EntityOperationCalled(
        event_id=6,
        timestamp=NOW,
        request_id="r2",
        operation="get",
        target_instance_id="@counter@a",
        parent_instance_id="i",
        parent_execution_id="e1",
        scheduled_time=LATER,
    ),
    history.EntityOperationCompleted(timestamp=NOW, request_id="r2", output="5"),
    history.EntityOperationFailed(timestamp=NOW, request_id="r2", failure_details=FAILURE),
    history.EntityLockRequested(
        event_id=7,
        timestamp=NOW,
        critical_section_id="cs",
        lock_set=["@a@1", "@b@2"],
        position=1,
        parent_instance_id="i",
    ),
    history.EntityLockGranted(timestamp=NOW, critical_section_id="cs"),
    history.EntityUnlockSent(
        event_id=8, timestamp=NOW, critical_section_id="cs", parent_instance_id="i", target_instance_id="@a@1"
    ),
]


def test_every_event_type_is_covered() -> None:
    assert {type(event) for event in EVENTS} == set(typing.get_args(history.AnyHistoryEvent))


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: type(event).__name__)
def test_events_round_trip(event: history.HistoryEvent) -> None:
    message = event_to_proto(event)
    assert message.HasField("timestamp")
    assert message.eventId == event.event_id
    assert event_from_proto(pb.HistoryEvent.FromString(message.SerializeToString()), NOW + timedelta(hours=1)) == event


def test_event_fields_land_where_the_sdk_reads_them() -> None:
    started = event_to_proto(EVENTS[0]).executionStarted
    assert started.orchestrationInstance.executionId.value == "e1"
    assert started.parentInstance.orchestrationInstance.instanceId == "p"
    assert started.parentInstance.taskScheduledId == 3
    assert started.version.value == "1.0"
    bare = event_to_proto(EVENTS[1]).executionStarted
    assert not bare.HasField("version") and not bare.HasField("input") and not bare.HasField("parentInstance")
    empty_result = event_to_proto(history.TaskCompleted(timestamp=NOW, task_scheduled_id=0, result=""))
    assert empty_result.taskCompleted.HasField("result")  # "" is a value, unlike None


def test_trace_contexts_land_where_the_sdk_reads_them() -> None:
    started = event_to_proto(EVENTS[0]).executionStarted.parentTraceContext
    assert (started.traceParent, started.traceState.value, started.spanID) == (
        TRACE.trace_parent,
        "k=v",
        "b7ad6b7169203331",
    )
    assert not event_to_proto(EVENTS[1]).executionStarted.HasField("parentTraceContext")
    scheduled = action_to_proto(actions.ScheduleTask(id=1, name="act", trace_context=TRACE)).scheduleTask
    assert scheduled.parentTraceContext.traceParent == TRACE.trace_parent
    # What the SDKs send without OpenTelemetry: an empty context, or only a span id.
    assert optional_trace_context(pb.ScheduleTaskAction(parentTraceContext=pb.TraceContext())) is None
    assert optional_trace_context(pb.ScheduleTaskAction(parentTraceContext=pb.TraceContext(spanID="ab"))) is None
    bare = pb.ScheduleTaskAction(parentTraceContext=pb.TraceContext(traceParent=TRACE.trace_parent))
    assert optional_trace_context(bare) == history.TraceContext(trace_parent=TRACE.trace_parent)
    # One that is not W3C's is ignored, as W3C's Trace Context has a receiver do.
    garbled = pb.ScheduleTaskAction(parentTraceContext=pb.TraceContext(traceParent="00-not-a-trace-01"))
    assert optional_trace_context(garbled) is None


def test_an_orchestrations_span_round_trips() -> None:
    span = history.OrchestrationSpan(span_id="b7ad6b7169203331", start_time=NOW)
    response = pb.OrchestratorResponse(orchestrationTraceContext=span_to_proto(span))
    assert optional_span(pb.OrchestratorResponse.FromString(response.SerializeToString())) == span
    assert span_to_proto(None) is None
    assert optional_span(pb.OrchestratorResponse()) is None
    assert optional_span(pb.OrchestratorResponse(orchestrationTraceContext=pb.OrchestrationTraceContext())) is None
    start_only = pb.OrchestratorResponse(
        orchestrationTraceContext=span_to_proto(history.OrchestrationSpan(start_time=NOW))
    )
    assert optional_span(start_only) == history.OrchestrationSpan(start_time=NOW)
    garbled = span_to_proto(history.OrchestrationSpan(span_id="x" * 1000, start_time=NOW))
    received = optional_span(pb.OrchestratorResponse(orchestrationTraceContext=garbled))
    assert received == history.OrchestrationSpan(start_time=NOW)  # the span id that is not W3C's is left out


def test_events_from_peers() -> None:
    unstamped = pb.HistoryEvent(eventId=-1, eventRaised=pb.EventRaisedEvent(name="e"))
    assert event_from_proto(unstamped, NOW).timestamp == NOW  # stamped by the receiver's clock
    with pytest.raises(InvalidMessageError, match="no event type"):
        event_from_proto(pb.HistoryEvent(eventId=1), NOW)
    with pytest.raises(InvalidMessageError, match="historyState"):
        event_from_proto(pb.HistoryEvent(historyState=pb.HistoryStateEvent()), NOW)
    with pytest.raises(InvalidMessageError, match="fireAt"):
        event_from_proto(pb.HistoryEvent(timerCreated=pb.TimerCreatedEvent()), NOW)
    with pytest.raises(InvalidMessageError, match="failureDetails"):
        event_from_proto(pb.HistoryEvent(taskFailed=pb.TaskFailedEvent(taskScheduledId=1)), NOW)


def test_failure_details_round_trip() -> None:
    assert failure_from_proto(failure_to_proto(FAILURE)) == FAILURE  # type: ignore[arg-type]
    message = pb.TaskFailureDetails(errorType="E", errorMessage="m")
    message.properties["count"].CopyFrom(struct_pb2.Value(number_value=3))
    message.properties["name"].CopyFrom(struct_pb2.Value(string_value="x"))
    message.properties["flag"].CopyFrom(struct_pb2.Value(bool_value=True))
    # The JSON values they are, as the SDK reads them, not their text.
    assert failure_from_proto(message).properties == {"count": 3.0, "name": "x", "flag": True}


ACTIONS: list[actions.OrchestratorAction] = [
    actions.ScheduleTask(id=1, name="act", version="1", input="[1]", tags={"k": "v"}, trace_context=TRACE),
    actions.CreateSubOrchestration(
        id=2, instance_id="i:0002", name="child", input="1", tags={"t": "u"}, trace_context=TRACE
    ),
    actions.CreateTimer(id=3, fire_at=LATER),
    actions.SendEvent(id=4, instance_id="other", name="ping", data="1"),
    actions.CompleteOrchestration(
        id=5,
        status=OrchestrationStatus.CONTINUED_AS_NEW,
        result='{"n": 2}',
        new_version="2",
        carryover_events=[history.EventRaised(timestamp=NOW, name="e", input="1")],
    ),
    actions.CompleteOrchestration(id=6, status=OrchestrationStatus.FAILED, failure_details=FAILURE),
    actions.TerminateOrchestration(id=7, instance_id="c", reason='"r"', recurse=True),
    actions.SendEntityMessage(
        id=6,
        event=history.EntityOperationSignaled(
            event_id=6, timestamp=NOW, request_id="r1", operation="add", target_instance_id="@counter@a", input="1"
        ),
    ),
    actions.RewindOrchestration(id=9, new_history=EVENTS[:3]),
]


@pytest.mark.parametrize("action", ACTIONS, ids=lambda action: type(action).__name__)
def test_actions_round_trip(action: actions.OrchestratorAction) -> None:
    message = pb.OrchestratorAction.FromString(action_to_proto(action).SerializeToString())
    received = action_from_proto(message, "i", NOW)
    if isinstance(action, actions.SendEntityMessage):  # the wire carries no timestamp for it: stamped on arrival
        assert isinstance(received, actions.SendEntityMessage)
        assert received.event.timestamp.tzinfo is not None
        received = msgspec.structs.replace(
            received, event=msgspec.structs.replace(received.event, timestamp=action.event.timestamp)
        )
    assert received == action


def test_a_sub_orchestration_without_an_id_gets_the_sdk_default() -> None:
    message = pb.OrchestratorAction(id=10, createSubOrchestration=pb.CreateSubOrchestrationAction(name="child"))
    created = action_from_proto(message, "parent", NOW)
    assert isinstance(created, actions.CreateSubOrchestration)
    assert created.instance_id == "parent:000a"


def test_a_failure_without_details_still_fails() -> None:
    complete = pb.CompleteOrchestrationAction(
        orchestrationStatus=pb.ORCHESTRATION_STATUS_FAILED, details=wrappers_pb2.StringValue(value="it broke")
    )
    action = action_from_proto(pb.OrchestratorAction(id=1, completeOrchestration=complete), "i", NOW)
    assert isinstance(action, actions.CompleteOrchestration)
    assert action.failure_details is not None and action.failure_details.message == "it broke"


def _lock_request(lock_set: list[str], position: int = 0) -> pb.OrchestratorAction:
    p = wrappers_pb2.StringValue(value="o")
    lock = pb.EntityLockRequestedEvent(criticalSectionId="s", lockSet=lock_set, position=position, parentInstanceId=p)
    return pb.OrchestratorAction(id=1, sendEntityMessage=pb.SendEntityMessageAction(entityLockRequested=lock))


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (pb.OrchestratorAction(id=1), "no action type"),
        (pb.OrchestratorAction(id=1, sendEvent=pb.SendEventAction(name="e")), "target"),
        (pb.OrchestratorAction(id=1, terminateOrchestration=pb.TerminateOrchestrationAction()), "instanceId"),
        (pb.OrchestratorAction(id=1, sendEntityMessage=pb.SendEntityMessageAction()), "entity message"),
        (
            pb.OrchestratorAction(
                id=1,
                completeOrchestration=pb.CompleteOrchestrationAction(
                    orchestrationStatus=pb.ORCHESTRATION_STATUS_PENDING
                ),
            ),
            "PENDING",
        ),
        (
            pb.OrchestratorAction(id=1, completeOrchestration=pb.CompleteOrchestrationAction(orchestrationStatus=12)),
            "12",
        ),
        (_lock_request([]), "distinct entity ids"),
        (_lock_request(["@counter@a", "@counter@a"]), "distinct entity ids"),
        (_lock_request(["not-an-entity"]), "distinct entity ids"),
        (_lock_request(["@counter@a"], position=1), "position 1"),
    ],
)
def test_actions_dtfx_cannot_accept(message: pb.OrchestratorAction, complaint: str) -> None:
    with pytest.raises(InvalidMessageError, match=complaint):
        action_from_proto(message, "i", NOW)


def test_state_round_trip() -> None:
    state = OrchestrationState(
        instance_id="i",
        name="orders",
        runtime_status=OrchestrationStatus.FAILED,
        created_at=NOW,
        last_updated_at=LATER,
        serialized_input="1",
        serialized_output=None,
        serialized_custom_status='"s"',
        failure_details=FAILURE,
        version="1",
        execution_id="e",
        parent_instance_id="p",
        scheduled_start_at=NOW,
        completed_at=LATER,
        tags={"a": "b"},
    )
    assert state_from_proto(state_to_proto(state)) == state


def test_canceled_is_never_sent() -> None:
    state = OrchestrationState(
        instance_id="i", name="n", runtime_status=OrchestrationStatus.CANCELED, created_at=NOW, last_updated_at=NOW
    )
    assert state_to_proto(state).orchestrationStatus == pb.ORCHESTRATION_STATUS_TERMINATED
