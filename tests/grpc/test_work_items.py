"""The worker side of the protocol, spoken raw with the generated stub.

These tests play a worker themselves, so that they can look at every message the
server sends and answer wrongly on purpose.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as pb_grpc
from google.protobuf import wrappers_pb2
from tests.conftest import CONTRACT_BACKENDS
from tests.grpc.conftest import FAST, WorkItemStream, open_stream, rpc_error, running_sidecar
from tests.polling import wait_until
from tests.postgres import postgres_url
from tests.proxy import TcpProxy

import grpc
from dtfx.core.errors import BackendUnavailableError
from dtfx.core.workitems import OrchestrationWorkItem
from dtfx.grpc import SidecarOptions, SidecarServer

Stub = pb_grpc.TaskHubSidecarServiceStub


def start(stub: Stub, name: str, instance_id: str, value: str | None = None, version: str | None = None) -> None:
    stub.StartInstance(
        pb.CreateInstanceRequest(
            instanceId=instance_id,
            name=name,
            input=wrappers_pb2.StringValue(value=value) if value is not None else None,
            version=wrappers_pb2.StringValue(value=version) if version is not None else None,
        )
    )


def status_of(stub: Stub, instance_id: str) -> int:
    response = stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id, getInputsAndOutputs=True))
    assert response.exists
    return response.orchestrationState.orchestrationStatus


def complete_action(action_id: int, result: str) -> pb.OrchestratorAction:
    return pb.OrchestratorAction(
        id=action_id,
        completeOrchestration=pb.CompleteOrchestrationAction(
            orchestrationStatus=pb.ORCHESTRATION_STATUS_COMPLETED, result=wrappers_pb2.StringValue(value=result)
        ),
    )


def respond(stub: Stub, item: pb.WorkItem, *actions: pb.OrchestratorAction) -> None:
    """Answer an orchestration work item with ``actions``."""
    stub.CompleteOrchestratorTask(
        pb.OrchestratorResponse(
            instanceId=item.orchestratorRequest.instanceId, completionToken=item.completionToken, actions=actions
        )
    )


def schedule(action_id: int, name: str) -> pb.OrchestratorAction:
    return pb.OrchestratorAction(id=action_id, scheduleTask=pb.ScheduleTaskAction(name=name))


def finish(stub: Stub, item: pb.WorkItem, result: str = '"done"') -> None:
    respond(stub, item, complete_action(1, result))


def test_an_orchestration_episode_and_its_activity(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    start(stub, "greet", "shape", '"Ada"')

    first = stream.next()
    assert first.completionToken
    request = first.orchestratorRequest
    assert request.instanceId == "shape"
    assert list(request.pastEvents) == []
    kinds = [event.WhichOneof("eventType") for event in request.newEvents]
    assert kinds == ["orchestratorStarted", "executionStarted"]
    started = request.newEvents[1].executionStarted
    assert started.name == "greet" and started.input.value == '"Ada"'
    assert started.orchestrationInstance.instanceId == "shape"
    assert started.orchestrationInstance.executionId.value == request.executionId.value != ""
    assert all(event.HasField("timestamp") for event in request.newEvents)

    schedule = pb.OrchestratorAction(
        id=1, scheduleTask=pb.ScheduleTaskAction(name="hello", input=wrappers_pb2.StringValue(value='"Ada"'))
    )
    stub.CompleteOrchestratorTask(
        pb.OrchestratorResponse(
            instanceId="shape",
            completionToken=first.completionToken,
            actions=[schedule],
            customStatus=wrappers_pb2.StringValue(value='"working"'),
        )
    )
    activity = stream.next()
    assert activity.activityRequest.name == "hello"
    assert activity.activityRequest.taskId == 1
    assert activity.activityRequest.input.value == '"Ada"'
    assert activity.activityRequest.orchestrationInstance.instanceId == "shape"
    assert activity.activityRequest.orchestrationInstance.executionId.value == request.executionId.value
    stub.CompleteActivityTask(
        pb.ActivityResponse(
            instanceId="shape",
            taskId=1,
            result=wrappers_pb2.StringValue(value='"Hello, Ada"'),
            completionToken=activity.completionToken,
        )
    )

    second = stream.next().orchestratorRequest
    past = [event.WhichOneof("eventType") for event in second.pastEvents]
    assert past == ["orchestratorStarted", "executionStarted", "taskScheduled", "orchestratorCompleted"]
    assert second.pastEvents[2].eventId == 1
    new = [event.WhichOneof("eventType") for event in second.newEvents]
    assert new == ["orchestratorStarted", "taskCompleted"]
    assert second.newEvents[1].taskCompleted.taskScheduledId == 1
    assert second.newEvents[1].taskCompleted.result.value == '"Hello, Ada"'
    assert all(event.HasField("timestamp") for event in [*second.pastEvents, *second.newEvents])
    response = stub.GetInstance(pb.GetInstanceRequest(instanceId="shape", getInputsAndOutputs=True))
    assert response.orchestrationState.customStatus.value == '"working"'


def test_quiet_streams_get_health_pings() -> None:
    options = SidecarOptions(health_ping_interval=timedelta(milliseconds=50))
    with running_sidecar(options=options) as server, grpc.insecure_channel(server.address) as channel:
        stream = WorkItemStream(Stub(channel))
        try:
            assert stream.next(pings=True).HasField("healthPing")
            assert stream.next(pings=True).HasField("healthPing")
        finally:
            stream.close()


def test_the_work_of_a_stream_that_dies_is_dispatched_again(stub: Stub, streams: list[WorkItemStream]) -> None:
    dying = open_stream(stub, streams)
    start(stub, "orphan", "orphan")
    first = dying.next()
    dying.close()
    survivor = open_stream(stub, streams)
    again = survivor.next()
    assert again.orchestratorRequest.instanceId == "orphan"
    assert again.completionToken != first.completionToken
    late = rpc_error(lambda: finish(stub, first))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stream" in late.details()
    finish(stub, again)
    wait_until(lambda: status_of(stub, "orphan") == pb.ORCHESTRATION_STATUS_COMPLETED)


def test_an_activity_held_by_a_stream_that_dies_is_dispatched_again(stub: Stub, streams: list[WorkItemStream]) -> None:
    dying = open_stream(stub, streams)
    start(stub, "with-activity", "activity-orphan")
    respond(stub, dying.next(), schedule(1, "slow"))
    assert dying.next().activityRequest.name == "slow"
    dying.close()
    survivor = open_stream(stub, streams)
    activity = survivor.next()
    assert activity.activityRequest.name == "slow"
    assert activity.activityRequest.orchestrationInstance.instanceId == "activity-orphan"


def test_the_work_of_a_worker_whose_host_vanishes_is_dispatched_again_after_the_keepalive() -> None:
    # The health pings on the stream (every second here) cannot tell: nothing fails to write.
    keepalive = timedelta(milliseconds=300)
    options = dataclasses.replace(FAST, keepalive_interval=keepalive, keepalive_timeout=keepalive)
    with running_sidecar(options=options) as server, grpc.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        proxy = TcpProxy(server.port)
        try:
            with grpc.insecure_channel(proxy.address) as far_channel:
                vanishing = WorkItemStream(Stub(far_channel))
                start(stub, "orphan", "vanished")
                assert vanishing.next().orchestratorRequest.instanceId == "vanished"
                proxy.fall_silent()
                survivor = WorkItemStream(stub)
                try:
                    again = survivor.next(timeout=10)  # 30 s + 20 s with the default keepalive
                    assert again.orchestratorRequest.instanceId == "vanished"
                    finish(stub, again)
                    wait_until(lambda: status_of(stub, "vanished") == pb.ORCHESTRATION_STATUS_COMPLETED)
                finally:
                    survivor.close()
                    vanishing.close()
        finally:
            proxy.close()


def test_concurrency_limits_and_a_slow_worker_does_not_block_others(stub: Stub, streams: list[WorkItemStream]) -> None:
    slow = open_stream(stub, streams, maxConcurrentOrchestrationWorkItems=1)
    start(stub, "job", "job-1")
    start(stub, "job", "job-2")
    held = slow.next()
    assert slow.nothing_within(0.3)  # its one slot is taken, and it does not answer
    other = open_stream(stub, streams)
    taken = other.next()
    assert {held.orchestratorRequest.instanceId, taken.orchestratorRequest.instanceId} == {"job-1", "job-2"}
    finish(stub, taken)
    finish(stub, held)
    for instance_id in ("job-1", "job-2"):
        wait_until(lambda instance_id=instance_id: status_of(stub, instance_id) == pb.ORCHESTRATION_STATUS_COMPLETED)


def test_work_locked_for_one_worker_goes_out_though_the_lock_for_the_next_failed(
    bare_sidecar: SidecarServer, stub: Stub, streams: list[WorkItemStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One fetch locks for each connection in turn; the second lock fails. Had the fetch failed
    # whole, the first item would stay leased (a minute), its worker's one slot taken for good.
    backend = bare_sidecar.backend
    lock = backend.lock_orchestration_work_items
    took, failed = [], []

    async def failing_after_one_took(count: int, *args: Any, **kwargs: Any) -> list[OrchestrationWorkItem]:
        if took and not failed and not kwargs.get("entities"):
            failed.append(True)
            raise BackendUnavailableError("the database went away")
        items = await lock(count, *args, **kwargs)
        took.extend(items)
        return items

    monkeypatch.setattr(backend, "lock_orchestration_work_items", failing_after_one_took)
    workers = [open_stream(stub, streams, maxConcurrentOrchestrationWorkItems=1) for _ in range(2)]
    wait_until(lambda: bare_sidecar._hub is not None and len(bare_sidecar._hub.connections) == 2)
    start(stub, "job", "first")
    start(stub, "job", "second")
    received = {worker.next(10).orchestratorRequest.instanceId for worker in workers}  # one each, held
    assert received == {"first", "second"} and failed


def test_filters_route_work_by_name_and_version(stub: Stub, streams: list[WorkItemStream]) -> None:
    filters = pb.WorkItemFilters(orchestrations=[pb.OrchestrationFilter(name="wanted", versions=["2"])])
    picky = open_stream(stub, streams, workItemFilters=filters)
    start(stub, "unwanted", "other-name")
    start(stub, "wanted", "old-version", version="1")
    start(stub, "wanted", "right-one", version="2")
    item = picky.next()
    assert item.orchestratorRequest.instanceId == "right-one"
    assert picky.nothing_within(0.3)
    assert status_of(stub, "other-name") == pb.ORCHESTRATION_STATUS_PENDING
    assert status_of(stub, "old-version") == pb.ORCHESTRATION_STATUS_PENDING
    anyone = open_stream(stub, streams)
    assert {anyone.next().orchestratorRequest.instanceId for _ in range(2)} == {"other-name", "old-version"}


def test_a_worker_that_filters_out_activities_gets_none(stub: Stub, streams: list[WorkItemStream]) -> None:
    filters = pb.WorkItemFilters(orchestrations=[pb.OrchestrationFilter(name="calls-activity")])
    orchestrations_only = open_stream(stub, streams, workItemFilters=filters)
    start(stub, "calls-activity", "activity-filtered")
    respond(stub, orchestrations_only.next(), schedule(1, "elsewhere"))
    assert orchestrations_only.nothing_within(0.3)
    activity_worker = open_stream(
        stub, streams, workItemFilters=pb.WorkItemFilters(activities=[pb.ActivityFilter(name="elsewhere")])
    )
    assert activity_worker.next().activityRequest.name == "elsewhere"


def test_completion_tokens(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    start(stub, "tokens", "tokens")
    item = stream.next()

    unknown = rpc_error(
        lambda: stub.CompleteOrchestratorTask(pb.OrchestratorResponse(instanceId="tokens", completionToken="nope"))
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in unknown.details()
    missing = rpc_error(lambda: stub.CompleteOrchestratorTask(pb.OrchestratorResponse(instanceId="tokens")))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    wrong_kind = rpc_error(
        lambda: stub.CompleteActivityTask(
            pb.ActivityResponse(instanceId="tokens", completionToken=item.completionToken)
        )
    )
    assert wrong_kind.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "orchestration" in wrong_kind.details()

    finish(stub, item, '"once"')
    finish(stub, item, '"twice"')  # a retried completion is accepted again, and changes nothing
    wait_until(lambda: status_of(stub, "tokens") == pb.ORCHESTRATION_STATUS_COMPLETED)
    response = stub.GetInstance(pb.GetInstanceRequest(instanceId="tokens", getInputsAndOutputs=True))
    assert response.orchestrationState.output.value == '"once"'
    abandon_after = rpc_error(
        lambda: stub.AbandonTaskOrchestratorWorkItem(
            pb.AbandonOrchestrationTaskRequest(completionToken=item.completionToken)
        )
    )
    assert abandon_after.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_an_abandoned_work_item_is_dispatched_again(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    start(stub, "rejected", "rejected")
    item = stream.next()
    abandon = pb.AbandonOrchestrationTaskRequest(completionToken=item.completionToken)
    stub.AbandonTaskOrchestratorWorkItem(abandon)
    stub.AbandonTaskOrchestratorWorkItem(abandon)  # idempotent too
    again = stream.next()
    assert again.orchestratorRequest.instanceId == "rejected"
    assert [e.WhichOneof("eventType") for e in again.orchestratorRequest.newEvents] == [
        "orchestratorStarted",
        "executionStarted",
    ]
    late = rpc_error(lambda: finish(stub, item))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "abandoned" in late.details()
    finish(stub, again)
    wait_until(lambda: status_of(stub, "rejected") == pb.ORCHESTRATION_STATUS_COMPLETED)


@pytest.mark.parametrize(
    ("action", "complaint"),
    [
        (pb.OrchestratorAction(id=1), "no action type"),
        (pb.OrchestratorAction(id=2, scheduleTask=pb.ScheduleTaskAction()), "needs a name"),
        (pb.OrchestratorAction(id=3, createTimer=pb.CreateTimerAction()), "fireAt"),
        (
            pb.OrchestratorAction(
                id=4,
                completeOrchestration=pb.CompleteOrchestrationAction(
                    orchestrationStatus=pb.ORCHESTRATION_STATUS_RUNNING
                ),
            ),
            "RUNNING",
        ),
    ],
)
def test_a_malformed_completion_is_refused_and_the_instance_is_not_lost(
    stub: Stub, streams: list[WorkItemStream], action: pb.OrchestratorAction, complaint: str
) -> None:
    stream = open_stream(stub, streams)
    start(stub, "misbehaved", "misbehaved")
    item = stream.next()
    error = rpc_error(lambda: respond(stub, item, action))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in error.details()
    again = stream.next()  # given back, and offered again
    assert again.orchestratorRequest.instanceId == "misbehaved"
    finish(stub, again)
    wait_until(lambda: status_of(stub, "misbehaved") == pb.ORCHESTRATION_STATUS_COMPLETED)


def test_the_orchestrations_span_comes_back_in_its_next_episodes(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    start(stub, "spanned", "spanned")
    first = stream.next()
    assert not first.orchestratorRequest.HasField("orchestrationTraceContext")
    span = pb.OrchestrationTraceContext(spanID=wrappers_pb2.StringValue(value="b7ad6b7169203331"))
    span.spanStartTime.FromSeconds(1_780_000_000)
    stub.CompleteOrchestratorTask(
        pb.OrchestratorResponse(
            instanceId="spanned",
            completionToken=first.completionToken,
            actions=[schedule(0, "work")],
            orchestrationTraceContext=span,
        )
    )
    activity = stream.next()
    stub.CompleteActivityTask(
        pb.ActivityResponse(instanceId="spanned", taskId=0, completionToken=activity.completionToken)
    )
    second = stream.next().orchestratorRequest
    assert second.orchestrationTraceContext == span


def test_a_completion_with_an_unreadable_span_is_refused_and_the_instance_is_not_lost(
    stub: Stub, streams: list[WorkItemStream]
) -> None:
    stream = open_stream(stub, streams)
    start(stub, "bad-span", "bad-span")
    item = stream.next()
    span = pb.OrchestrationTraceContext()
    span.spanStartTime.seconds = 10**15  # far past year 9999
    error = rpc_error(
        lambda: stub.CompleteOrchestratorTask(
            pb.OrchestratorResponse(
                instanceId="bad-span",
                completionToken=item.completionToken,
                actions=[complete_action(1, '"done"')],
                orchestrationTraceContext=span,
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spanStartTime" in error.details()
    again = stream.next()  # given back, and offered again
    finish(stub, again)
    wait_until(lambda: status_of(stub, "bad-span") == pb.ORCHESTRATION_STATUS_COMPLETED)


def test_a_response_for_another_instance_is_refused(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    start(stub, "mine", "mine")
    item = stream.next()
    error = rpc_error(
        lambda: stub.CompleteOrchestratorTask(
            pb.OrchestratorResponse(instanceId="someone-else", completionToken=item.completionToken)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stream.next().orchestratorRequest.instanceId == "mine"


def test_an_activity_response_for_another_task_is_refused(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    start(stub, "task-ids", "task-ids")
    respond(stub, stream.next(), schedule(7, "work"))
    activity = stream.next()
    error = rpc_error(
        lambda: stub.CompleteActivityTask(
            pb.ActivityResponse(instanceId="task-ids", taskId=8, completionToken=activity.completionToken)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    again = stream.next()
    assert again.activityRequest.taskId == 7
    failure = pb.TaskFailureDetails(errorType="RuntimeError")  # no message: still a failure
    stub.CompleteActivityTask(
        pb.ActivityResponse(
            instanceId="task-ids", taskId=7, failureDetails=failure, completionToken=again.completionToken
        )
    )
    failed = stream.next().orchestratorRequest.newEvents[1]
    assert failed.WhichOneof("eventType") == "taskFailed"
    assert failed.taskFailed.taskScheduledId == 7
    assert failed.taskFailed.failureDetails.errorType == "RuntimeError"


def test_a_response_in_chunks_is_applied_whole(stub: Stub, streams: list[WorkItemStream]) -> None:
    stream = open_stream(stub, streams)
    start(stub, "chunked", "chunked")
    item = stream.next()
    chunks = [
        [schedule(1, "a")],
        [schedule(2, "b")],
    ]
    for index, actions in enumerate(chunks):
        stub.CompleteOrchestratorTask(
            pb.OrchestratorResponse(
                instanceId="chunked",
                completionToken=item.completionToken,
                actions=actions,
                isPartial=index == 0,
                chunkIndex=wrappers_pb2.Int32Value(value=index),
            )
        )
    names = {stream.next().activityRequest.name for _ in range(2)}
    assert names == {"a", "b"}


def test_a_response_in_chunks_adding_up_to_over_the_limit_fails_its_orchestration() -> None:
    # The server keeps the chunks until the last one: without a limit, a worker could fill its memory.
    options = dataclasses.replace(FAST, max_message_bytes=8_000, max_response_bytes=10_000)
    with running_sidecar(options=options) as server, grpc.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        stream = WorkItemStream(stub)
        try:
            start(stub, "whole", "whole")
            respond(stub, stream.next(), schedule(1, "a" * 6_000), schedule(2, "b"))  # not in chunks: not counted
            assert {stream.next().activityRequest.name for _ in range(2)} == {"a" * 6_000, "b"}

            start(stub, "chunked", "chunked")
            item = stream.next()

            def chunk(index: int, last: bool = False) -> None:
                stub.CompleteOrchestratorTask(
                    pb.OrchestratorResponse(
                        instanceId="chunked",
                        completionToken=item.completionToken,
                        actions=[schedule(index + 1, "a" * 4_000)],
                        isPartial=not last,
                        chunkIndex=wrappers_pb2.Int32Value(value=index),
                    )
                )

            chunk(0)
            chunk(1)
            chunk(1)  # sent again: counted once
            refused = rpc_error(lambda: chunk(2))
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_response_bytes" in str(refused.details())
            chunk(3, last=True)  # too late: the work item is done with
            wait_until(lambda: status_of(stub, "chunked") == pb.ORCHESTRATION_STATUS_FAILED)
            state = stub.GetInstance(pb.GetInstanceRequest(instanceId="chunked")).orchestrationState
            assert state.failureDetails.errorType == "dtfx.core.errors.MessageTooLargeError"
            assert "adds up to" in state.failureDetails.errorMessage
            assert stream.nothing_within(0.5)  # no activity was scheduled
        finally:
            stream.close()


def test_the_server_survives_a_worker_that_hangs_up_mid_episode() -> None:
    with running_sidecar(options=FAST) as server, grpc.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        for round_number in range(3):
            stream = WorkItemStream(stub)
            start(stub, "flaky-worker", f"hang-up-{round_number}")
            stream.next()
            stream.close()
        survivor = WorkItemStream(stub)
        try:
            seen = set()
            while len(seen) < 3:
                item = survivor.next()
                seen.add(item.orchestratorRequest.instanceId)
                finish(stub, item)
        except queue.Empty:
            pytest.fail(f"only {sorted(seen)} came back")
        finally:
            survivor.close()
        assert seen == {f"hang-up-{n}" for n in range(3)}


def test_leases_are_renewed_while_a_worker_holds_the_work() -> None:
    """Held longer than a lease, an episode and an activity are neither dispatched twice nor lost."""
    options = SidecarOptions(lease_duration=timedelta(milliseconds=300), health_ping_interval=timedelta(seconds=1))
    with running_sidecar(options=options) as server, grpc.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        stream = WorkItemStream(stub)
        try:
            start(stub, "slow", "slow")
            episode = stream.next()
            assert stream.nothing_within(1.0)  # three leases long: an expired lease would be locked again
            respond(stub, episode, schedule(1, "slow-activity"))
            activity = stream.next()
            assert stream.nothing_within(1.0)
            stub.CompleteActivityTask(
                pb.ActivityResponse(instanceId="slow", taskId=1, completionToken=activity.completionToken)
            )
            finish(stub, stream.next())
            wait_until(lambda: status_of(stub, "slow") == pb.ORCHESTRATION_STATUS_COMPLETED)
        finally:
            stream.close()


@pytest.fixture(params=CONTRACT_BACKENDS)
def hub_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh task hub of each kind under test, for a server that opens (and closes) it itself."""
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path}/hub.db" if request.param == "sqlite" else postgres_url()


def test_the_sidecar_locks_no_more_than_its_fetch_batch_size_at_once(
    hub_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch size comes from SidecarOptions, as a native worker's from WorkerOptions: the stream
    has room for 100 work items, yet each lock asks for 2 at most."""
    server = SidecarServer(hub_url, port=0, options=dataclasses.replace(FAST, fetch_batch_size=2))
    asked: list[int] = []
    lock = server.backend.lock_orchestration_work_items

    async def counting_lock(count: int, *args: Any, **kwargs: Any) -> list[OrchestrationWorkItem]:
        asked.append(count)
        return await lock(count, *args, **kwargs)

    monkeypatch.setattr(server.backend, "lock_orchestration_work_items", counting_lock)
    with server, grpc.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        for n in range(5):
            start(stub, "batched", f"batched-{n}")
        stream = WorkItemStream(stub)
        try:
            received = set()
            for _ in range(5):
                item = stream.next()
                received.add(item.orchestratorRequest.instanceId)
                finish(stub, item)
        finally:
            stream.close()
    assert received == {f"batched-{n}" for n in range(5)}
    assert max(asked) == 2


def test_the_slots_of_work_items_locked_together_all_come_back(hub_url: str) -> None:
    # Both instances wait before the worker connects, so that one lock takes them together.
    with SidecarServer(hub_url, port=0, options=FAST) as server, grpc.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        for index in range(2):
            start(stub, "job", f"first-{index}")
        stream = WorkItemStream(stub, pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=2))
        try:
            for item in [stream.next() for _ in range(2)]:
                finish(stub, item)
            for index in range(2):
                wait_until(lambda index=index: status_of(stub, f"first-{index}") == pb.ORCHESTRATION_STATUS_COMPLETED)
                start(stub, "job", f"second-{index}")
            second = [stream.next(5) for _ in range(2)]  # both at once: both slots came back
        finally:
            stream.close()
    assert {item.orchestratorRequest.instanceId for item in second} == {"second-0", "second-1"}


def test_a_freed_slot_wakes_only_the_fetch_loop_of_its_kind(hub_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Completed orchestration episodes make room for orchestrations only: the entity fetch
    loop, with no entity work in the hub, does not lock again for each of them."""
    server = SidecarServer(hub_url, port=0, options=FAST)
    entity_locks: list[int] = []
    lock = server.backend.lock_orchestration_work_items

    async def counting_lock(count: int, *args: Any, **kwargs: Any) -> list[OrchestrationWorkItem]:
        if kwargs.get("entities"):
            entity_locks.append(count)
        return await lock(count, *args, **kwargs)

    monkeypatch.setattr(server.backend, "lock_orchestration_work_items", counting_lock)
    with server, grpc.insecure_channel(server.address) as channel:
        stub = Stub(channel)
        stream = WorkItemStream(stub)
        try:
            wait_until(lambda: entity_locks)  # the worker's connection made room for every kind
            time.sleep(0.2)  # for a wake-up that came while that lock ran
            connected = len(entity_locks)
            for n in range(10):
                start(stub, "one_episode", f"one-episode-{n}")
                finish(stub, stream.next())
                wait_until(lambda n=n: status_of(stub, f"one-episode-{n}") == pb.ORCHESTRATION_STATUS_COMPLETED)
        finally:
            stream.close()
    # Not one lock per completed episode, as when every freed slot woke every loop; the loop
    # may still lock after one of its polls of the store (every 0.1 s on SQLite).
    assert len(entity_locks) - connected <= 2, (connected, entity_locks)
