"""Malformed requests, unknown ids and operations that do not fit: each gets the right status and a clear message."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, empty_pb2, timestamp_pb2, wrappers_pb2
from tests.grpc.conftest import rpc_error, running_sidecar
from tests.postgres import postgres_url

import grpc
from dtfx.core.errors import BackendError, BackendUnavailableError, CommitInDoubtError, UnstorableValueError
from dtfx.grpc import SidecarServer

Stub = pb_grpc.TaskHubSidecarServiceStub
Code = grpc.StatusCode


def expect(call: Callable[[], Any], code: grpc.StatusCode, *words: str) -> None:
    error = rpc_error(call)
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details()


def start(stub: Stub, instance_id: str, name: str = "anything", **kw: Any) -> None:
    stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name=name, **kw))


def test_hello_and_create_task_hub(stub: Stub) -> None:
    assert stub.Hello(empty_pb2.Empty()) == empty_pb2.Empty()
    stub.CreateTaskHub(pb.CreateTaskHubRequest())
    expect(lambda: stub.CreateTaskHub(pb.CreateTaskHubRequest(recreateIfExists=True)), Code.UNIMPLEMENTED)
    expect(lambda: stub.DeleteTaskHub(pb.DeleteTaskHubRequest()), Code.UNIMPLEMENTED, "DeleteTaskHub")


def test_start_instance(stub: Stub) -> None:
    expect(lambda: stub.StartInstance(pb.CreateInstanceRequest(instanceId="x")), Code.INVALID_ARGUMENT, "name")
    expect(lambda: start(stub, "@counter@one"), Code.INVALID_ARGUMENT, "entities")
    expect(lambda: start(stub, "tab\there"), Code.INVALID_ARGUMENT, "control character")
    expect(lambda: start(stub, "nul\x00inside"), Code.INVALID_ARGUMENT, "control character")
    expect(lambda: start(stub, "x" * 1025), Code.INVALID_ARGUMENT, "1025 characters")
    for refused in ("@counter@one", "tab\there", "nul\x00inside", "x" * 1025):
        assert not stub.GetInstance(pb.GetInstanceRequest(instanceId=refused)).exists
    start(stub, "taken")
    expect(lambda: start(stub, "taken"), Code.ALREADY_EXISTS, "taken", "PENDING")
    terminal_only = pb.OrchestrationIdReusePolicy(replaceableStatus=[pb.ORCHESTRATION_STATUS_COMPLETED])
    expect(lambda: start(stub, "taken", orchestrationIdReusePolicy=terminal_only), Code.ALREADY_EXISTS)
    pending_too = pb.OrchestrationIdReusePolicy(replaceableStatus=[pb.ORCHESTRATION_STATUS_PENDING])
    start(stub, "taken", orchestrationIdReusePolicy=pending_too)
    bad_policy = pb.OrchestrationIdReusePolicy(replaceableStatus=[42])
    expect(lambda: start(stub, "other", orchestrationIdReusePolicy=bad_policy), Code.INVALID_ARGUMENT, "42")
    generated = stub.StartInstance(pb.CreateInstanceRequest(name="no-id-given")).instanceId
    assert generated
    assert stub.GetInstance(pb.GetInstanceRequest(instanceId=generated)).exists


def test_reading_instances(stub: Stub) -> None:
    expect(lambda: stub.GetInstance(pb.GetInstanceRequest()), Code.INVALID_ARGUMENT, "instanceId")
    assert not stub.GetInstance(pb.GetInstanceRequest(instanceId="unknown")).exists
    expect(lambda: stub.WaitForInstanceCompletion(pb.GetInstanceRequest()), Code.INVALID_ARGUMENT)
    history = stub.StreamInstanceHistory(pb.StreamInstanceHistoryRequest(instanceId="unknown"))
    expect(lambda: list(history), Code.NOT_FOUND, "unknown")
    start(stub, "known")
    other_execution = pb.StreamInstanceHistoryRequest(
        instanceId="known", executionId=wrappers_pb2.StringValue(value="long-gone")
    )
    expect(lambda: list(stub.StreamInstanceHistory(other_execution)), Code.NOT_FOUND, "long-gone")


def test_a_long_poll_ends_at_the_client_deadline(stub: Stub) -> None:
    start(stub, "never-runs")  # no worker is connected
    expect(
        lambda: stub.WaitForInstanceCompletion(pb.GetInstanceRequest(instanceId="never-runs"), timeout=0.3),
        Code.DEADLINE_EXCEEDED,
    )


def test_acting_on_unknown_instances(stub: Stub) -> None:
    expect(lambda: stub.RaiseEvent(pb.RaiseEventRequest(instanceId="ghost", name="e")), Code.NOT_FOUND, "ghost")
    expect(lambda: stub.TerminateInstance(pb.TerminateRequest(instanceId="ghost")), Code.NOT_FOUND)
    expect(lambda: stub.SuspendInstance(pb.SuspendRequest(instanceId="ghost")), Code.NOT_FOUND)
    expect(lambda: stub.ResumeInstance(pb.ResumeRequest(instanceId="ghost")), Code.NOT_FOUND)
    expect(lambda: stub.RestartInstance(pb.RestartInstanceRequest(instanceId="ghost")), Code.NOT_FOUND)
    expect(lambda: stub.RewindInstance(pb.RewindInstanceRequest(instanceId="ghost")), Code.NOT_FOUND)
    entity = pb.RestartInstanceRequest(instanceId="@counter@one")
    expect(lambda: stub.RestartInstance(entity), Code.INVALID_ARGUMENT, "entities")
    to_an_entity = pb.RaiseEventRequest(instanceId="@counter@one", name="e")  # the entity would drop it
    expect(lambda: stub.RaiseEvent(to_an_entity), Code.INVALID_ARGUMENT, "entities")
    assert not stub.GetInstance(pb.GetInstanceRequest(instanceId="@counter@one")).exists
    expect(lambda: stub.RaiseEvent(pb.RaiseEventRequest(instanceId="ghost")), Code.INVALID_ARGUMENT, "name")
    expect(lambda: stub.TerminateInstance(pb.TerminateRequest()), Code.INVALID_ARGUMENT, "instanceId")


def test_operations_that_do_not_fit_the_status(stub: Stub) -> None:
    start(stub, "pending")
    expect(lambda: stub.RestartInstance(pb.RestartInstanceRequest(instanceId="pending")), Code.FAILED_PRECONDITION)
    expect(
        lambda: stub.RewindInstance(pb.RewindInstanceRequest(instanceId="pending")),
        Code.FAILED_PRECONDITION,
        "failed",
    )


def test_queries(stub: Stub) -> None:
    bad_token = pb.InstanceQuery(continuationToken=wrappers_pb2.StringValue(value="garbage"))
    expect(lambda: stub.QueryInstances(pb.QueryInstancesRequest(query=bad_token)), Code.INVALID_ARGUMENT, "garbage")
    bad_status = pb.InstanceQuery(runtimeStatus=[99])
    expect(lambda: stub.QueryInstances(pb.QueryInstancesRequest(query=bad_status)), Code.INVALID_ARGUMENT, "99")
    negative = pb.InstanceQuery(maxInstanceCount=-1)
    expect(lambda: stub.QueryInstances(pb.QueryInstancesRequest(query=negative)), Code.INVALID_ARGUMENT)
    expect(lambda: stub.ListInstanceIds(pb.ListInstanceIdsRequest(pageSize=-5)), Code.INVALID_ARGUMENT)
    out_of_range = pb.InstanceQuery(createdTimeFrom=timestamp_pb2.Timestamp(seconds=10**15))
    expect(lambda: stub.QueryInstances(pb.QueryInstancesRequest(query=out_of_range)), Code.INVALID_ARGUMENT)
    # Only instances that have ended are listed: asking for running ones matches nothing.
    start(stub, "listed")
    response = stub.ListInstanceIds(pb.ListInstanceIdsRequest(runtimeStatus=[pb.ORCHESTRATION_STATUS_PENDING]))
    assert list(response.instanceIds) == []
    assert not response.HasField("lastInstanceKey")


def test_purges(stub: Stub) -> None:
    expect(lambda: stub.PurgeInstances(pb.PurgeInstancesRequest()), Code.INVALID_ARGUMENT, "instanceId")
    too_many = pb.InstanceBatch(instanceIds=[f"i{n}" for n in range(501)])
    expect(lambda: stub.PurgeInstances(pb.PurgeInstancesRequest(instanceBatch=too_many)), Code.INVALID_ARGUMENT, "500")
    with_empty = pb.InstanceBatch(instanceIds=["a", ""])
    expect(lambda: stub.PurgeInstances(pb.PurgeInstancesRequest(instanceBatch=with_empty)), Code.INVALID_ARGUMENT)
    start(stub, "not-ended")
    response = stub.PurgeInstances(pb.PurgeInstancesRequest(instanceId="not-ended"))
    assert response.deletedInstanceCount == 0
    assert stub.GetInstance(pb.GetInstanceRequest(instanceId="not-ended")).exists
    since = timestamp_pb2.Timestamp()
    since.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    everything = pb.PurgeInstanceFilter(createdTimeFrom=since)
    assert stub.PurgeInstances(pb.PurgeInstancesRequest(purgeInstanceFilter=everything)).deletedInstanceCount == 0
    assert stub.GetInstance(pb.GetInstanceRequest(instanceId="not-ended")).exists
    running_only = pb.PurgeInstanceFilter(runtimeStatus=[pb.ORCHESTRATION_STATUS_RUNNING])
    response = stub.PurgeInstances(pb.PurgeInstancesRequest(purgeInstanceFilter=running_only))
    assert response.deletedInstanceCount == 0 and response.isComplete.value  # nothing to purge: all done

    def within(seconds: int) -> pb.PurgeInstancesRequest:
        bounded = pb.PurgeInstanceFilter(createdTimeFrom=since, timeout=duration_pb2.Duration(seconds=seconds))
        return pb.PurgeInstancesRequest(purgeInstanceFilter=bounded)

    beyond_a_timedelta = within(-(2**63))
    expect(lambda: stub.PurgeInstances(beyond_a_timedelta), Code.INVALID_ARGUMENT, "timeout", "out of range")
    assert stub.PurgeInstances(within(2**40)).isComplete.value  # past the last datetime from now: no limit


@pytest.mark.parametrize(
    ("method", "request_type"),
    [("SkipGracefulOrchestrationTerminations", pb.SkipGracefulOrchestrationTerminationsRequest)],
)
def test_unsupported_rpcs_say_so(stub: Stub, method: str, request_type: type) -> None:
    error = rpc_error(lambda: getattr(stub, method)(request_type()))
    assert error.code() == Code.UNIMPLEMENTED
    assert "not supported" in error.details()


def test_bad_work_item_requests(stub: Stub) -> None:
    negative = pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=-1)
    expect(lambda: next(iter(stub.GetWorkItems(negative))), Code.INVALID_ARGUMENT, "negative")
    nameless = pb.GetWorkItemsRequest(
        workItemFilters=pb.WorkItemFilters(orchestrations=[pb.OrchestrationFilter(name="")])
    )
    expect(lambda: next(iter(stub.GetWorkItems(nameless))), Code.INVALID_ARGUMENT, "name")
    abandon = pb.AbandonActivityTaskRequest(completionToken="unknown")
    expect(lambda: stub.AbandonTaskActivityWorkItem(abandon), Code.NOT_FOUND, "unknown")
    expect(lambda: stub.CompleteActivityTask(pb.ActivityResponse(completionToken="unknown")), Code.NOT_FOUND, "unknown")
    expect(lambda: stub.CompleteEntityTask(pb.EntityBatchResult()), Code.INVALID_ARGUMENT, "completionToken")
    expect(
        lambda: stub.AbandonTaskEntityWorkItem(pb.AbandonEntityTaskRequest()), Code.INVALID_ARGUMENT, "completionToken"
    )


@pytest.mark.parametrize(
    ("error", "code", "word"),
    [
        (BackendUnavailableError("the database is down"), Code.UNAVAILABLE, "database is down"),  # worth a retry
        (CommitInDoubtError("may or may not have committed"), Code.UNKNOWN, "may or may not"),  # never retried
        (UnstorableValueError("text cannot hold NUL"), Code.INVALID_ARGUMENT, "NUL"),  # the request's fault
        (BackendError("a constraint failed"), Code.INTERNAL, "constraint failed"),  # would fail again
        (KeyError("oops"), Code.INTERNAL, "KeyError"),  # a bug: logged, answered, survived
    ],
)
def test_failures_inside_the_server(
    bare_sidecar: SidecarServer, stub: Stub, error: Exception, code: grpc.StatusCode, word: str
) -> None:
    backend = bare_sidecar.backend
    real_get_instance = backend.get_instance

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    backend.get_instance = failing  # type: ignore[method-assign]
    try:
        expect(lambda: stub.GetInstance(pb.GetInstanceRequest(instanceId="x")), code, word)
    finally:
        backend.get_instance = real_get_instance  # type: ignore[method-assign]
    assert not stub.GetInstance(pb.GetInstanceRequest(instanceId="x")).exists  # still serving


def test_a_nul_in_an_input_on_postgresql_is_invalid_and_the_hub_keeps_working() -> None:
    with running_sidecar(postgres_url()) as server, grpc.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        with_nul = wrappers_pb2.StringValue(value='"a\x00b"')  # SDKs escape it in JSON; a raw peer may not
        expect(lambda: start(stub, "with-nul", input=with_nul), Code.INVALID_ARGUMENT, "NUL")
        assert not stub.GetInstance(pb.GetInstanceRequest(instanceId="with-nul")).exists
        start(stub, "after", input=wrappers_pb2.StringValue(value='"a\\u0000b"'))
        response = stub.GetInstance(pb.GetInstanceRequest(instanceId="after", getInputsAndOutputs=True))
        assert response.exists and response.orchestrationState.input.value == '"a\\u0000b"'


def test_a_nul_in_a_terminations_output_is_invalid(stub: Stub) -> None:
    start(stub, "to-end")
    with_nul = pb.TerminateRequest(instanceId="to-end", output=wrappers_pb2.StringValue(value='"a\x00b"'))
    expect(lambda: stub.TerminateInstance(with_nul), Code.INVALID_ARGUMENT, "NUL")
    stub.TerminateInstance(pb.TerminateRequest(instanceId="to-end", output=wrappers_pb2.StringValue(value='"ok"')))
