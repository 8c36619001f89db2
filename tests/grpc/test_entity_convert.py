"""Entity batches <-> protobuf, and entity work-item filters: the pure parts, without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from google.protobuf import timestamp_pb2, wrappers_pb2

from dtfx.backends.base import WorkKind
from dtfx.core.entities import OperationResult, SignalEntity, StartOrchestration
from dtfx.core.history import EntityOperationCalled, EntityOperationSignaled, FailureDetails, TraceContext
from dtfx.grpc.connections import WorkerConnection, WorkerFilters
from dtfx.grpc.convert import (
    InvalidMessageError,
    batch_result_from_proto,
    entity_batch_request_to_proto,
    entity_request_to_proto,
    event_from_proto,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OPERATIONS = [
    EntityOperationSignaled(
        event_id=4, timestamp=NOW, request_id="s", operation="add", target_instance_id="@counter@k", input="1"
    ),
    EntityOperationCalled(
        event_id=7,
        timestamp=NOW,
        request_id="c",
        operation="get",
        target_instance_id="@counter@k",
        parent_instance_id="caller",
        parent_execution_id="e1",
    ),
]


def text(value: str) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=value)


def test_both_request_shapes_carry_the_batch() -> None:
    v2 = entity_request_to_proto("@counter@k", "x1", "0", OPERATIONS)
    assert (v2.instanceId, v2.executionId, v2.entityState.value) == ("@counter@k", "x1", "0")
    assert [event_from_proto(event, NOW) for event in v2.operationRequests] == OPERATIONS

    older = entity_batch_request_to_proto("@counter@k", None, OPERATIONS)
    assert older.instanceId == "@counter@k" and not older.HasField("entityState")
    assert [(o.operation, o.requestId, o.HasField("input")) for o in older.operations] == [
        ("add", "s", True),
        ("get", "c", False),
    ]


def test_the_older_request_carries_each_operations_trace_context() -> None:
    trace = TraceContext(trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    traced = msgspec.structs.replace(OPERATIONS[0], trace_context=trace)
    older = entity_batch_request_to_proto("@counter@k", None, [traced, OPERATIONS[1]])
    assert [o.traceContext.traceParent for o in older.operations] == [trace.trace_parent, ""]
    assert not older.operations[1].HasField("traceContext")


def test_results_and_actions_are_read_in_order() -> None:
    when = timestamp_pb2.Timestamp()
    when.FromDatetime(NOW)
    message = pb.EntityBatchResult(
        results=[
            pb.OperationResult(success=pb.OperationResultSuccess()),
            pb.OperationResult(
                failure=pb.OperationResultFailure(failureDetails=pb.TaskFailureDetails(errorType="E", errorMessage="m"))
            ),
        ],
        entityState=text("0"),
        actions=[
            pb.OperationAction(sendSignal=pb.SendSignalAction(instanceId="@Other@k", name="ping", scheduledTime=when)),
            pb.OperationAction(
                startNewOrchestration=pb.StartNewOrchestrationAction(
                    name="job", version=text("2"), input=text("[]"), scheduledTime=when
                )
            ),
        ],
        operationInfos=[pb.OperationInfo(requestId="s"), pb.OperationInfo(requestId="c")],
    )
    result = batch_result_from_proto(message, "9", OPERATIONS)
    assert result.state == "0"
    assert result.results == [OperationResult(), OperationResult(failure=FailureDetails(error_type="E", message="m"))]
    signal, start = result.actions
    assert signal == SignalEntity("@other@k", "ping", None, NOW)  # entity names are lower-cased
    assert isinstance(start, StartOrchestration) and start.instance_id  # the server names it when the worker did not
    assert (start.name, start.version, start.input, start.scheduled_time) == ("job", "2", "[]", NOW)

    deleted = batch_result_from_proto(
        pb.EntityBatchResult(results=[pb.OperationResult(success=pb.OperationResultSuccess())] * 2), "9", OPERATIONS
    )
    assert deleted.state is None and deleted.actions == []


def test_a_batch_that_failed_as_a_whole_fails_every_operation_and_keeps_the_state() -> None:
    details = pb.TaskFailureDetails(errorType="RuntimeError", errorMessage="crashed")
    message = pb.EntityBatchResult(failureDetails=details, entityState=text("ignored"))
    result = batch_result_from_proto(message, "9", OPERATIONS)
    failure = FailureDetails(error_type="RuntimeError", message="crashed")
    assert result.state == "9"
    assert result.results == [OperationResult(failure=failure), OperationResult(failure=failure)]
    assert result.actions == []


@pytest.mark.parametrize(
    ("instance_id", "complaint"),
    [("@counter@k", "belong to entities"), ("job\x00", "control character"), ("j" * 1025, "at most 1024")],
)
def test_an_orchestration_cannot_be_started_under_an_id_no_orchestration_can_have(
    instance_id: str, complaint: str
) -> None:
    start = pb.StartNewOrchestrationAction(instanceId=instance_id, name="job")
    message = pb.EntityBatchResult(
        results=[pb.OperationResult(success=pb.OperationResultSuccess())] * 2,
        actions=[pb.OperationAction(id=3, startNewOrchestration=start)],
    )
    with pytest.raises(InvalidMessageError, match=complaint):
        batch_result_from_proto(message, None, OPERATIONS)


def test_a_worker_that_sends_no_entity_limit_gets_the_default() -> None:
    python_sdk = pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=5, maxConcurrentActivityWorkItems=6)
    connection = WorkerConnection(1, python_sdk, default_concurrency=7)
    assert [connection.free_slots(kind) for kind in WorkKind] == [5, 6, 7]
    limited = WorkerConnection(2, pb.GetWorkItemsRequest(maxConcurrentEntityWorkItems=2), default_concurrency=7)
    assert limited.free_slots(WorkKind.ENTITY) == 2


def test_entity_filters() -> None:
    everything = WorkerFilters.from_request(pb.GetWorkItemsRequest())
    assert everything.names(WorkKind.ENTITY) is None and everything.accepts(WorkKind.ENTITY, "any", None)
    entities_only = WorkerFilters.from_request(
        pb.GetWorkItemsRequest(workItemFilters=pb.WorkItemFilters(entities=[pb.EntityFilter(name="Counter")]))
    )
    assert entities_only.names(WorkKind.ENTITY) == {"counter"}
    assert entities_only.names(WorkKind.ORCHESTRATION) == frozenset()
    assert entities_only.accepts(WorkKind.ENTITY, "counter", None)
    assert not entities_only.accepts(WorkKind.ENTITY, "account", None)
    no_entities = WorkerFilters.from_request(
        pb.GetWorkItemsRequest(workItemFilters=pb.WorkItemFilters(orchestrations=[pb.OrchestrationFilter(name="o")]))
    )
    assert no_entities.names(WorkKind.ENTITY) == frozenset()  # its filters name no entity: it takes none
    with pytest.raises(InvalidMessageError, match="needs a name"):
        WorkerFilters.from_request(
            pb.GetWorkItemsRequest(workItemFilters=pb.WorkItemFilters(entities=[pb.EntityFilter()]))
        )
