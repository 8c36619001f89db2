"""Entity work items and entity RPCs, spoken raw with the generated stub.

These tests play an SDK worker themselves, so that they see every message the
server sends, try the older ``EntityBatchRequest`` shape the Python SDK does not
receive from dtfx by default, and answer wrongly on purpose.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from durabletask import client as sdk_client
from durabletask.entities import EntityInstanceId
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as pb_grpc
from google.protobuf import timestamp_pb2, wrappers_pb2
from tests.grpc.conftest import FAST, WorkItemStream, open_stream, rpc_error, running_sidecar
from tests.polling import wait_until

import grpc
from dtfx.grpc import SidecarOptions, SidecarServer

Stub = pb_grpc.TaskHubSidecarServiceStub


def text(value: str) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=value)


def signal(stub: Stub, entity: str, operation: str, value: str | None = None, **fields: object) -> None:
    stub.SignalEntity(
        pb.SignalEntityRequest(
            instanceId=entity,
            name=operation,
            input=text(value) if value is not None else None,
            **fields,  # type: ignore[arg-type]
        )
    )


def operations_of(item: pb.WorkItem) -> list[tuple[str, str, str]]:
    """(kind, operation, request id) of each operation of a V2 entity work item."""
    found = []
    for event in item.entityRequestV2.operationRequests:
        kind = str(event.WhichOneof("eventType"))
        operation = getattr(event, kind)
        found.append((kind, operation.operation, operation.requestId))
    return found


def success(value: str | None) -> pb.OperationResult:
    return pb.OperationResult(success=pb.OperationResultSuccess(result=text(value) if value is not None else None))


def failure(message: str) -> pb.OperationResult:
    details = pb.TaskFailureDetails(errorType="ValueError", errorMessage=message)
    return pb.OperationResult(failure=pb.OperationResultFailure(failureDetails=details))


def complete(stub: Stub, item: pb.WorkItem, *results: pb.OperationResult, state: str | None, **fields: object) -> None:
    """Answer an entity work item: one result per operation and the state after them (``None``: deleted)."""
    stub.CompleteEntityTask(
        pb.EntityBatchResult(
            completionToken=item.completionToken,
            results=results,
            entityState=text(state) if state is not None else None,
            **fields,  # type: ignore[arg-type]
        )
    )


def entity_state(stub: Stub, entity: str) -> str | None:
    """The stored state, or ``None`` when the entity does not exist."""
    response = stub.GetEntity(pb.GetEntityRequest(instanceId=entity, includeState=True))
    return response.entity.serializedState.value if response.exists else None


def start(stub: Stub, name: str, instance_id: str) -> None:
    stub.StartInstance(pb.CreateInstanceRequest(instanceId=instance_id, name=name))


def respond(stub: Stub, item: pb.WorkItem, *actions: pb.OrchestratorAction) -> None:
    stub.CompleteOrchestratorTask(
        pb.OrchestratorResponse(
            instanceId=item.orchestratorRequest.instanceId, completionToken=item.completionToken, actions=actions
        )
    )


def entity_message(action_id: int, **message: object) -> pb.OrchestratorAction:
    return pb.OrchestratorAction(id=action_id, sendEntityMessage=pb.SendEntityMessageAction(**message))  # type: ignore[arg-type]


def call(action_id: int, target: str, operation: str, request_id: str, parent: str) -> pb.OrchestratorAction:
    called = pb.EntityOperationCalledEvent(
        requestId=request_id, operation=operation, targetInstanceId=text(target), parentInstanceId=text(parent)
    )
    return entity_message(action_id, entityOperationCalled=called)


def new_events(item: pb.WorkItem) -> list[str]:
    return [str(event.WhichOneof("eventType")) for event in item.orchestratorRequest.newEvents]


# -- the two request shapes --------------------------------------------------------------------------


class _SignalRequestIds(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Notes the request id of each ``SignalEntity`` call a client makes."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def intercept_unary_unary(self, continuation: Any, call_details: Any, request: Any) -> Any:
        if isinstance(request, pb.SignalEntityRequest):
            self.seen.append(request.requestId)
        return continuation(call_details, request)


def test_the_sdk_clients_request_id_reaches_the_entity(
    bare_sidecar: SidecarServer, stub: Stub, streams: list[WorkItemStream]
) -> None:
    request_ids = _SignalRequestIds()
    with sdk_client.TaskHubGrpcClient(host_address=bare_sidecar.address, interceptors=[request_ids]) as client:
        client.signal_entity(EntityInstanceId("Counter", "sdk"), "add", 1)
    assert len(request_ids.seen) == 1 and request_ids.seen[0]
    stream = open_stream(stub, streams)
    assert operations_of(stream.next()) == [("entityOperationSignaled", "add", request_ids.seen[0])]


def test_an_entity_batch_goes_out_as_entity_request_v2(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    signal(stub, "@Counter@v2", "add", "5", requestId="request-1")
    item = stream.next()
    assert item.WhichOneof("request") == "entityRequestV2" and item.completionToken
    request = item.entityRequestV2
    assert request.instanceId == "@counter@v2"  # entity names are case-insensitive: stored lower-case
    assert not request.HasField("entityState")
    (event,) = request.operationRequests
    assert event.HasField("timestamp")
    assert event.entityOperationSignaled.requestId == "request-1"
    assert event.entityOperationSignaled.operation == "add"
    assert event.entityOperationSignaled.input.value == "5"
    assert event.entityOperationSignaled.targetInstanceId.value == "@counter@v2"
    echoed = [pb.OperationInfo(requestId="request-1")]
    complete(stub, item, success("5"), state="5", operationInfos=echoed)
    wait_until(lambda: entity_state(stub, "@counter@v2") == "5")

    signal(stub, "@counter@v2", "reset")
    second = stream.next()
    assert second.entityRequestV2.entityState.value == "5"
    complete(stub, second, success(None), state="0")  # falsy state is real state
    wait_until(lambda: entity_state(stub, "@counter@v2") == "0")

    signal(stub, "@counter@v2", "delete")
    third = stream.next()
    assert third.entityRequestV2.entityState.value == "0"
    complete(stub, third, success(None), state=None)  # unset state: deleted
    wait_until(lambda: entity_state(stub, "@counter@v2") is None)

    def query(**fields: object) -> list[str]:
        request = pb.QueryEntitiesRequest(query=pb.EntityQuery(instanceIdStartsWith=text("@counter@"), **fields))  # type: ignore[arg-type]
        return [entity.instanceId for entity in stub.QueryEntities(request).entities]

    assert query() == []
    assert query(includeTransient=True) == ["@counter@v2"]  # stored, without state or lock
    an_hour_ago = timestamp_pb2.Timestamp()
    an_hour_ago.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    assert query(includeTransient=True, lastModifiedTo=an_hour_ago) == []
    assert query(includeTransient=True, lastModifiedFrom=an_hour_ago) == ["@counter@v2"]


def test_the_older_entity_batch_request_shape() -> None:
    with (
        running_sidecar(options=dataclasses.replace(FAST, legacy_entity_requests=True)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = Stub(channel)
        stream = WorkItemStream(stub)
        try:
            traced = pb.TraceContext(traceParent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            signal(stub, "@counter@legacy", "add", "2", requestId="old-1", parentTraceContext=traced)
            signal(stub, "@counter@legacy", "add", "3", requestId="old-2")
            item = stream.next()
            assert item.WhichOneof("request") == "entityRequest"
            request = item.entityRequest
            assert request.instanceId == "@counter@legacy" and not request.HasField("entityState")
            operations = [(op.operation, op.requestId, op.input.value) for op in request.operations]
            contexts = [op.traceContext.traceParent for op in request.operations]
            if len(operations) == 1:  # the second signal came after the batch was taken
                complete(stub, item, success("2"), state="2")
                item = stream.next()
                assert item.entityRequest.entityState.value == "2"
                operations += [(op.operation, op.requestId, op.input.value) for op in item.entityRequest.operations]
                contexts += [op.traceContext.traceParent for op in item.entityRequest.operations]
                complete(stub, item, success("5"), state="5")
            else:
                complete(stub, item, success("2"), success("5"), state="5")  # no operationInfos: fine
            assert operations == [("add", "old-1", "2"), ("add", "old-2", "3")]
            assert contexts == [traced.traceParent, ""]  # the signal's trace context reaches the operation
            wait_until(lambda: entity_state(stub, "@counter@legacy") == "5")
        finally:
            stream.close()


# -- calls, replies and actions -----------------------------------------------------------------------


def test_calls_get_their_replies_and_a_failed_batch_fails_every_call(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    start(stub, "caller", "caller")
    respond(
        stub,
        stream.next(),
        call(1, "@counter@calls", "add", "r1", "caller"),
        call(2, "@counter@calls", "explode", "r2", "caller"),
    )
    batch = stream.next()
    assert operations_of(batch) == [("entityOperationCalled", "add", "r1"), ("entityOperationCalled", "explode", "r2")]
    first_call = batch.entityRequestV2.operationRequests[0].entityOperationCalled
    assert first_call.parentInstanceId.value == "caller" and first_call.targetInstanceId.value == "@counter@calls"
    complete(stub, batch, success("1"), failure("no"), state="1")

    replies = stream.next()
    assert replies.orchestratorRequest.instanceId == "caller"
    past = [str(e.WhichOneof("eventType")) for e in replies.orchestratorRequest.pastEvents]
    assert past.count("entityOperationCalled") == 2  # recorded with the action ids the SDKs replay against
    assert [e.eventId for e in replies.orchestratorRequest.pastEvents if e.HasField("entityOperationCalled")] == [1, 2]
    events = {event.WhichOneof("eventType"): event for event in replies.orchestratorRequest.newEvents}
    assert events["entityOperationCompleted"].entityOperationCompleted.requestId == "r1"
    assert events["entityOperationCompleted"].entityOperationCompleted.output.value == "1"
    assert events["entityOperationFailed"].entityOperationFailed.requestId == "r2"
    assert events["entityOperationFailed"].entityOperationFailed.failureDetails.errorMessage == "no"

    respond(stub, replies, call(3, "@counter@calls", "add", "r3", "caller"))
    doomed = stream.next()
    whole_batch_failure = pb.TaskFailureDetails(errorType="RuntimeError", errorMessage="worker could not run it")
    complete(stub, doomed, state="999", failureDetails=whole_batch_failure)
    reply = stream.next().orchestratorRequest.newEvents[1]
    assert reply.entityOperationFailed.requestId == "r3"
    assert reply.entityOperationFailed.failureDetails.errorMessage == "worker could not run it"
    assert entity_state(stub, "@counter@calls") == "1"  # a failed batch changes nothing


def test_entity_actions_signal_entities_and_start_orchestrations(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    signal(stub, "@sender@1", "go")
    item = stream.next()
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(milliseconds=200))
    actions = [
        pb.OperationAction(
            id=0, sendSignal=pb.SendSignalAction(instanceId="@Receiver@2", name="ping", input=text("1"))
        ),
        pb.OperationAction(
            id=1, sendSignal=pb.SendSignalAction(instanceId="@receiver@2", name="pong", scheduledTime=later)
        ),
        pb.OperationAction(
            id=2,
            startNewOrchestration=pb.StartNewOrchestrationAction(
                instanceId="from-entity", name="started", input=text('"hi"')
            ),
        ),
    ]
    complete(stub, item, success(None), state="1", actions=actions)
    received: list[tuple[str, str]] = []
    while len(received) < 3:
        work = stream.next()
        if work.HasField("orchestratorRequest"):
            started = work.orchestratorRequest.newEvents[1].executionStarted
            assert work.orchestratorRequest.instanceId == "from-entity"
            assert (started.name, started.input.value) == ("started", '"hi"')
            received.append(("orchestration", started.name))
            respond(stub, work)  # leaves it running: it is not looked at again
        else:
            assert work.entityRequestV2.instanceId == "@receiver@2"
            for kind, operation, _ in operations_of(work):
                received.append((kind, operation))
            complete(stub, work, *[success(None) for _ in work.entityRequestV2.operationRequests], state="0")
    assert sorted(received) == [
        ("entityOperationSignaled", "ping"),
        ("entityOperationSignaled", "pong"),
        ("orchestration", "started"),
    ]


def test_lock_traffic_is_handled_by_the_server(stub: Stub, streams: list[WorkItemStream]) -> None:
    """Lock requests and unlocks run no entity code: the worker only sees the grant and the calls."""
    stream = open_stream(stub, streams)
    start(stub, "locker", "locker")
    lock = pb.EntityLockRequestedEvent(
        criticalSectionId="section", lockSet=["@counter@l1", "@counter@l2"], position=0, parentInstanceId=text("locker")
    )
    respond(stub, stream.next(), entity_message(1, entityLockRequested=lock))
    granted = stream.next()
    assert new_events(granted) == ["orchestratorStarted", "entityLockGranted"]
    assert granted.orchestratorRequest.newEvents[1].entityLockGranted.criticalSectionId == "section"
    for entity in ("@counter@l1", "@counter@l2"):
        response = stub.GetEntity(pb.GetEntityRequest(instanceId=entity))
        assert response.exists and response.entity.lockedBy.value == "locker"
    signal(stub, "@counter@l1", "add", "1")  # from someone else: waits for the lock
    wait_until(lambda: stub.GetEntity(pb.GetEntityRequest(instanceId="@counter@l1")).entity.backlogQueueSize == 1)
    assert stream.nothing_within(0.3)

    unlocks = [
        entity_message(
            2 + n,
            entityUnlockSent=pb.EntityUnlockSentEvent(
                criticalSectionId="section", parentInstanceId=text("locker"), targetInstanceId=text(target)
            ),
        )
        for n, target in enumerate(["@counter@l1", "@counter@l2"])
    ]
    respond(stub, granted, *unlocks)
    waited = stream.next()
    assert [(kind, operation) for kind, operation, _ in operations_of(waited)] == [("entityOperationSignaled", "add")]
    complete(stub, waited, success("1"), state="1")
    wait_until(lambda: entity_state(stub, "@counter@l1") == "1")
    assert not stub.GetEntity(pb.GetEntityRequest(instanceId="@counter@l1")).entity.HasField("lockedBy")
    assert not stub.GetEntity(pb.GetEntityRequest(instanceId="@counter@l2")).exists  # no state, no lock


# -- completion tokens, abandon, lost streams --------------------------------------------------------


def test_entity_completion_tokens_abandon_and_lost_streams(stub: Stub, streams: list[WorkItemStream]) -> None:
    dying = open_stream(stub, streams)
    signal(stub, "@counter@tokens", "add", "1")
    first = dying.next()
    dying.close()
    survivor = open_stream(stub, streams)
    second = survivor.next()
    assert second.entityRequestV2.instanceId == "@counter@tokens" and second.completionToken != first.completionToken
    late = rpc_error(lambda: complete(stub, first, success("1"), state="1"))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION and "stream" in late.details()

    stub.AbandonTaskEntityWorkItem(pb.AbandonEntityTaskRequest(completionToken=second.completionToken))
    stub.AbandonTaskEntityWorkItem(pb.AbandonEntityTaskRequest(completionToken=second.completionToken))  # idempotent
    third = survivor.next()
    assert third.entityRequestV2.instanceId == "@counter@tokens"
    wrong_kind = rpc_error(
        lambda: stub.CompleteOrchestratorTask(pb.OrchestratorResponse(completionToken=third.completionToken))
    )
    assert wrong_kind.code() == grpc.StatusCode.INVALID_ARGUMENT and "entity" in wrong_kind.details()
    complete(stub, third, success("1"), state="1")
    complete(stub, third, success("2"), state="2")  # a retried completion is accepted again, and changes nothing
    wait_until(lambda: entity_state(stub, "@counter@tokens") == "1")
    unknown = rpc_error(lambda: stub.CompleteEntityTask(pb.EntityBatchResult(completionToken="nope")))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    abandon_after = rpc_error(
        lambda: stub.AbandonTaskEntityWorkItem(pb.AbandonEntityTaskRequest(completionToken=third.completionToken))
    )
    assert abandon_after.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_the_lease_is_renewed_while_a_worker_holds_a_batch() -> None:
    """Held longer than a lease, a batch is neither dispatched twice nor lost."""
    options = SidecarOptions(lease_duration=timedelta(milliseconds=300), health_ping_interval=timedelta(seconds=1))
    with running_sidecar(options=options) as server, grpc.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        stream = WorkItemStream(stub)
        try:
            signal(stub, "@counter@slow", "add", "1")
            item = stream.next()
            assert stream.nothing_within(1.0)  # three leases long: an expired lease would be locked again
            complete(stub, item, success("1"), state="1")
            wait_until(lambda: entity_state(stub, "@counter@slow") == "1")
        finally:
            stream.close()


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"results": []}, "1 operation(s), but the result has 0"),
        ({"results": [success("1"), success("2")]}, "has 2 result(s)"),
        ({"results": [pb.OperationResult()]}, "neither a success nor a failure"),
        (
            {"results": [success("1")], "operationInfos": [pb.OperationInfo(requestId="someone-else")]},
            "operationInfos",
        ),
        (
            {
                "results": [success("1")],
                "actions": [pb.OperationAction(sendSignal=pb.SendSignalAction(instanceId="x"))],
            },
            "Not an entity id",
        ),
        (
            {
                "results": [success("1")],
                "actions": [pb.OperationAction(startNewOrchestration=pb.StartNewOrchestrationAction(name=""))],
            },
            "needs the orchestration's name",
        ),
    ],
)
def test_a_malformed_entity_result_is_refused_and_the_batch_is_not_lost(
    stub: Stub, streams: list[WorkItemStream], fields: dict[str, object], complaint: str
) -> None:
    stream = open_stream(stub, streams)
    signal(stub, "@counter@malformed", "add", "1", requestId="mine")
    item = stream.next()
    error = rpc_error(
        lambda: stub.CompleteEntityTask(pb.EntityBatchResult(completionToken=item.completionToken, **fields))
    )  # type: ignore[arg-type]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in error.details()
    again = stream.next()  # given back, and offered again
    assert operations_of(again) == [("entityOperationSignaled", "add", "mine")]
    complete(stub, again, success("1"), state="1")
    wait_until(lambda: entity_state(stub, "@counter@malformed") == "1")


# -- which worker gets entity work --------------------------------------------------------------------


def test_entity_filters_route_batches_by_entity_name(stub: Stub, streams: list[WorkItemStream]) -> None:
    orchestrations_only = open_stream(
        stub, streams, workItemFilters=pb.WorkItemFilters(orchestrations=[pb.OrchestrationFilter(name="x")])
    )
    counters_only = open_stream(
        stub, streams, workItemFilters=pb.WorkItemFilters(entities=[pb.EntityFilter(name="Counter")])
    )
    signal(stub, "@other@1", "op")
    signal(stub, "@counter@1", "op")
    assert counters_only.next().entityRequestV2.instanceId == "@counter@1"
    assert counters_only.nothing_within(0.3)
    assert orchestrations_only.nothing_within(0.1)
    anyone = open_stream(stub, streams)
    assert anyone.next().entityRequestV2.instanceId == "@other@1"


def test_the_entity_concurrency_limit_is_respected(stub: Stub, streams: list[WorkItemStream]) -> None:
    one_at_a_time = open_stream(stub, streams, maxConcurrentEntityWorkItems=1)
    signal(stub, "@counter@one", "op")
    signal(stub, "@counter@two", "op")
    first = one_at_a_time.next()
    assert one_at_a_time.nothing_within(0.3)
    complete(stub, first, success(None), state="1")
    second = one_at_a_time.next()
    assert {first.entityRequestV2.instanceId, second.entityRequestV2.instanceId} == {"@counter@one", "@counter@two"}


# -- the client RPCs ---------------------------------------------------------------------------------


def test_scheduled_signals_wait_for_their_time(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    far, soon = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    far.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    soon.FromDatetime(datetime.now(UTC) + timedelta(milliseconds=200))
    signal(stub, "@counter@far", "add", "1", scheduledTime=far)
    signal(stub, "@counter@soon", "add", "1", scheduledTime=soon)
    item = stream.next()
    assert item.entityRequestV2.instanceId == "@counter@soon"
    assert item.entityRequestV2.operationRequests[0].entityOperationSignaled.scheduledTime == soon
    assert stream.nothing_within(0.3)


@pytest.mark.parametrize(
    ("make_call", "complaint"),
    [
        (lambda stub: stub.SignalEntity(pb.SignalEntityRequest(instanceId="counter", name="op")), "@name@key"),
        (lambda stub: stub.SignalEntity(pb.SignalEntityRequest(instanceId="@counter@k")), "name of the operation"),
        (lambda stub: stub.GetEntity(pb.GetEntityRequest(instanceId="not-an-entity")), "not-an-entity"),
        (
            lambda stub: stub.QueryEntities(
                pb.QueryEntitiesRequest(query=pb.EntityQuery(pageSize=wrappers_pb2.Int32Value(value=-1)))
            ),
            "negative",
        ),
        (
            lambda stub: stub.CleanEntityStorage(pb.CleanEntityStorageRequest(continuationToken=text("3"))),
            "never issues one",
        ),
    ],
)
def test_bad_entity_requests_get_clear_errors(stub: Stub, make_call: object, complaint: str) -> None:
    error = rpc_error(lambda: make_call(stub))  # type: ignore[operator]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in error.details()


def test_query_entities_pages_with_continuation_tokens(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    for key in range(5):
        signal(stub, f"@paged@{key}", "set")
    done = 0
    while done < 5:
        item = stream.next()
        complete(stub, item, *[success(None) for _ in item.entityRequestV2.operationRequests], state=f'"{done}"')
        done += 1
    wait_until(lambda: len(stub.QueryEntities(pb.QueryEntitiesRequest(query=pb.EntityQuery())).entities) == 5)
    seen, token, pages = [], None, 0
    while True:
        query = pb.EntityQuery(
            instanceIdStartsWith=text("@paged@"), pageSize=wrappers_pb2.Int32Value(value=2), continuationToken=token
        )
        response = stub.QueryEntities(pb.QueryEntitiesRequest(query=query))
        seen += [(entity.instanceId, entity.HasField("serializedState")) for entity in response.entities]
        pages += 1
        if not response.HasField("continuationToken"):
            break
        token = response.continuationToken
    assert seen == [(f"@paged@{key}", False) for key in range(5)]  # includeState unset: no state
    assert pages >= 3
