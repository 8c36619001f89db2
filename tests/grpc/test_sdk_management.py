"""Managing instances with the SDK's clients: suspend, terminate, restart, rewind, purge, query, waits."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from durabletask import client as sdk_client
from durabletask.client import OrchestrationQuery, OrchestrationStatus
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as pb_grpc
from tests.grpc import sdk_app
from tests.grpc.conftest import rpc_error, running_sdk_worker, running_sidecar
from tests.polling import wait_until

import dtfx
import grpc

pytestmark = pytest.mark.usefixtures("sdk_worker_running")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def completed(client: sdk_client.TaskHubGrpcClient, instance_id: str) -> sdk_client.OrchestrationState:
    state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None
    return state


def test_suspend_holds_events_until_resume(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = client.schedule_new_orchestration(sdk_app.waiter)
    client.wait_for_orchestration_start(instance_id, timeout=10)
    client.suspend_orchestration(instance_id, reason="maintenance")
    wait_until(lambda: client.get_orchestration_state(instance_id).runtime_status == OrchestrationStatus.SUSPENDED)
    client.raise_orchestration_event(instance_id, "proceed", data="after resume")
    with pytest.raises(TimeoutError):  # the long poll runs until the client's deadline
        client.wait_for_orchestration_completion(instance_id, timeout=0.5)
    assert client.get_orchestration_state(instance_id).runtime_status == OrchestrationStatus.SUSPENDED
    client.resume_orchestration(instance_id)
    state = completed(client, instance_id)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == "after resume"


def test_a_wait_without_a_deadline_lasts_until_the_instance_ends(
    sidecar_stub: pb_grpc.TaskHubSidecarServiceStub, client: sdk_client.TaskHubGrpcClient
) -> None:
    # As the .NET SDK waits with a cancellation token.
    instance_id = client.schedule_new_orchestration(sdk_app.waiter)
    client.wait_for_orchestration_start(instance_id, timeout=10)
    waiting = sidecar_stub.WaitForInstanceCompletion.future(pb.GetInstanceRequest(instanceId=instance_id))
    try:
        with pytest.raises(grpc.FutureTimeoutError):  # still waiting: no deadline has run out
            waiting.result(timeout=0.5)
        client.raise_orchestration_event(instance_id, "proceed", data="in the end")
        answer = waiting.result(timeout=15)
    finally:
        waiting.cancel()
    assert answer.exists and answer.orchestrationState.orchestrationStatus == pb.ORCHESTRATION_STATUS_COMPLETED


def test_a_second_suspend_changes_nothing(client: sdk_client.TaskHubGrpcClient) -> None:
    # Recorded, it would be held back by the SDK's worker with the other events and replayed
    # on resume, where the worker loops for ever re-suspending the orchestration.
    instance_id = client.schedule_new_orchestration(sdk_app.waiter)
    client.wait_for_orchestration_start(instance_id, timeout=10)
    for _ in range(2):
        client.suspend_orchestration(instance_id, reason="maintenance")
        wait_until(lambda: client.get_orchestration_state(instance_id).runtime_status == OrchestrationStatus.SUSPENDED)
    client.resume_orchestration(instance_id)
    client.raise_orchestration_event(instance_id, "proceed", data="resumed once")
    state = completed(client, instance_id)
    assert (state.runtime_status, state.get_output()) == (OrchestrationStatus.COMPLETED, "resumed once")


def test_a_terminate_that_comes_with_a_continue_as_new_ends_the_instance() -> None:
    with running_sidecar() as server, sdk_client.TaskHubGrpcClient(host_address=server.address) as client:
        with running_sdk_worker(server.address):
            instance_id = client.schedule_new_orchestration(sdk_app.collector, input=[])
            client.wait_for_orchestration_start(instance_id, timeout=10)
        # No worker: the event that makes it continue as new and the terminate make one episode.
        client.raise_orchestration_event(instance_id, "item", data="a")
        client.terminate_orchestration(instance_id, output="stop")
        with running_sdk_worker(server.address):
            state = completed(client, instance_id)
    assert (state.runtime_status, state.get_output()) == (OrchestrationStatus.TERMINATED, "stop")


def test_terminate_is_recursive(client: sdk_client.TaskHubGrpcClient) -> None:
    root = new_id("nested")
    client.schedule_new_orchestration(sdk_app.nested, input=2, instance_id=root)
    leaf = f"{root}:0001:0001"
    wait_until(lambda: client.get_orchestration_state(leaf))
    client.wait_for_orchestration_start(leaf, timeout=10)
    client.terminate_orchestration(root, output="enough")  # recursive by default
    state = completed(client, root)
    assert state.runtime_status == OrchestrationStatus.TERMINATED
    assert state.get_output() == "enough"
    for descendant in (f"{root}:0001", leaf):
        assert completed(client, descendant).runtime_status == OrchestrationStatus.TERMINATED


def test_terminate_without_recursion_leaves_children_running(client: sdk_client.TaskHubGrpcClient) -> None:
    root = new_id("nested")
    client.schedule_new_orchestration(sdk_app.nested, input=1, instance_id=root)
    child = f"{root}:0001"
    wait_until(lambda: client.get_orchestration_state(child))
    client.wait_for_orchestration_start(child, timeout=10)
    client.terminate_orchestration(root, recursive=False)
    assert completed(client, root).runtime_status == OrchestrationStatus.TERMINATED
    assert client.get_orchestration_state(child).runtime_status == OrchestrationStatus.RUNNING
    client.terminate_orchestration(child)


def test_restart_with_the_same_and_a_new_id(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = client.schedule_new_orchestration(sdk_app.echo, input={"x": 1})
    first = completed(client, instance_id)
    assert client.restart_orchestration(instance_id) == instance_id
    again = completed(client, instance_id)
    assert again.get_output() == {"x": 1}
    assert again.created_at >= first.created_at
    new_instance = client.restart_orchestration(instance_id, restart_with_new_instance_id=True)
    assert new_instance != instance_id
    assert completed(client, new_instance).get_output() == {"x": 1}


def test_restart_of_a_running_instance_is_refused(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = client.schedule_new_orchestration(sdk_app.waiter)
    client.wait_for_orchestration_start(instance_id, timeout=10)
    error = rpc_error(lambda: client.restart_orchestration(instance_id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "RUNNING" in error.details()
    client.terminate_orchestration(instance_id)


def test_rewind_reruns_only_the_failed_activity(client: sdk_client.TaskHubGrpcClient) -> None:
    key = uuid.uuid4().hex
    instance_id = client.schedule_new_orchestration(sdk_app.rewindable, input=key)
    assert completed(client, instance_id).runtime_status == OrchestrationStatus.FAILED
    client.rewind_orchestration(instance_id, reason="fixed")
    state = completed(client, instance_id)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == [1, "recovered"]
    assert sdk_app.attempts[f"counted:{key}"] == 1  # what succeeded is not repeated
    assert sdk_app.attempts[f"fail:{key}"] == 2


def test_rewind_rewinds_a_failed_sub_orchestration(client: sdk_client.TaskHubGrpcClient) -> None:
    key = uuid.uuid4().hex
    instance_id = new_id("rewind-parent")
    client.schedule_new_orchestration(sdk_app.rewindable_parent, input=key, instance_id=instance_id)
    assert completed(client, instance_id).runtime_status == OrchestrationStatus.FAILED
    assert completed(client, f"{instance_id}:0001").runtime_status == OrchestrationStatus.FAILED
    client.rewind_orchestration(instance_id)
    state = completed(client, instance_id)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == [1, "recovered"]
    assert completed(client, f"{instance_id}:0001").runtime_status == OrchestrationStatus.COMPLETED


def test_rewind_of_an_instance_that_did_not_fail_is_refused(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = client.schedule_new_orchestration(sdk_app.echo, input=1)
    completed(client, instance_id)
    error = rpc_error(lambda: client.rewind_orchestration(instance_id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_purge_by_id_recursive(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = new_id("purge-parent")
    client.schedule_new_orchestration(sdk_app.parent, instance_id=instance_id)
    completed(client, instance_id)
    result = client.purge_orchestration(instance_id)  # recursive by default
    assert result.deleted_instance_count == 3
    assert result.is_complete is True
    for purged in (instance_id, f"{instance_id}:0001", f"{instance_id}-named"):
        assert client.get_orchestration_state(purged) is None
    assert client.purge_orchestration(instance_id).deleted_instance_count == 0


def test_purge_by_filter_keeps_running_instances(client: sdk_client.TaskHubGrpcClient) -> None:
    since = datetime.now(UTC)
    done = [client.schedule_new_orchestration(sdk_app.echo, input=n) for n in range(3)]
    for instance_id in done:
        completed(client, instance_id)
    running = client.schedule_new_orchestration(sdk_app.waiter)
    client.wait_for_orchestration_start(running, timeout=10)
    only_running = client.purge_orchestrations_by(created_time_from=since, runtime_status=[OrchestrationStatus.RUNNING])
    assert only_running.deleted_instance_count == 0
    result = client.purge_orchestrations_by(created_time_from=since, timeout=timedelta(seconds=10))
    assert result.deleted_instance_count == 3
    assert result.is_complete is True
    assert client.get_orchestration_state(running) is not None
    client.terminate_orchestration(running)


def test_purge_by_batch(sidecar_stub: pb_grpc.TaskHubSidecarServiceStub, client: sdk_client.TaskHubGrpcClient) -> None:
    instance_ids = [client.schedule_new_orchestration(sdk_app.echo, input=n) for n in range(2)]
    for instance_id in instance_ids:
        completed(client, instance_id)
    request = pb.PurgeInstancesRequest(instanceBatch=pb.InstanceBatch(instanceIds=[*instance_ids, "no-such-instance"]))
    response = sidecar_stub.PurgeInstances(request)
    assert response.deletedInstanceCount == 2


def test_query_pages_through_every_match(client: sdk_client.TaskHubGrpcClient) -> None:
    prefix = new_id("query")
    for n in range(5):
        client.schedule_new_orchestration(sdk_app.echo, input=n, instance_id=f"{prefix}-{n}")
    for n in range(5):
        completed(client, f"{prefix}-{n}")
    query = OrchestrationQuery(instance_id_prefix=prefix, fetch_inputs_and_outputs=True, max_instance_count=2)
    states = client.get_all_orchestration_states(query)  # pages of 2, following continuation tokens
    assert sorted(state.instance_id for state in states) == [f"{prefix}-{n}" for n in range(5)]
    assert sorted(state.get_output() for state in states) == list(range(5))
    without_payloads = client.get_all_orchestration_states(OrchestrationQuery(instance_id_prefix=prefix))
    assert all(state.serialized_input is None for state in without_payloads)
    running = client.get_all_orchestration_states(
        OrchestrationQuery(instance_id_prefix=prefix, runtime_status=[OrchestrationStatus.RUNNING])
    )
    assert running == []


def test_list_instance_ids_pages_through_ended_instances(client: sdk_client.TaskHubGrpcClient) -> None:
    since = datetime.now(UTC)
    ended = {client.schedule_new_orchestration(sdk_app.echo, input=n) for n in range(3)}
    for instance_id in ended:
        completed(client, instance_id)
    running = client.schedule_new_orchestration(sdk_app.waiter)
    client.wait_for_orchestration_start(running, timeout=10)
    seen: list[str] = []
    token = None
    while True:
        page = client.list_instance_ids(completed_time_from=since, page_size=2, continuation_token=token)
        seen.extend(page.items)
        assert len(page.items) <= 2
        if page.continuation_token is None:
            break
        assert any(instance_id in page.continuation_token for instance_id in page.items)
        token = page.continuation_token
    assert set(seen) == ended
    client.terminate_orchestration(running)


def test_reuse_policy(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = client.schedule_new_orchestration(sdk_app.echo, input="first")
    completed(client, instance_id)
    error = rpc_error(lambda: client.schedule_new_orchestration(sdk_app.echo, input="again", instance_id=instance_id))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert instance_id in error.details()
    policy = pb.OrchestrationIdReusePolicy(replaceableStatus=[pb.ORCHESTRATION_STATUS_COMPLETED])
    client.schedule_new_orchestration(sdk_app.echo, input="second", instance_id=instance_id, reuse_id_policy=policy)
    assert completed(client, instance_id).get_output() == "second"


def test_scheduled_start_version_and_tags(client: sdk_client.TaskHubGrpcClient, native_client: dtfx.Client) -> None:
    start_at = datetime.now(UTC) + timedelta(milliseconds=300)
    instance_id = client.schedule_new_orchestration(
        sdk_app.echo, input="later", start_at=start_at, version="1.2", tags={"team": "billing"}
    )
    assert client.get_orchestration_state(instance_id).runtime_status == OrchestrationStatus.PENDING
    state = completed(client, instance_id)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    native = native_client.get_orchestration_state(instance_id)
    assert native is not None
    assert native.version == "1.2"
    assert native.tags == {"team": "billing"}
    assert native.scheduled_start_at is not None and native.scheduled_start_at >= start_at - timedelta(milliseconds=1)
    history = native_client.get_orchestration_history(instance_id)
    assert history[0].timestamp >= start_at - timedelta(milliseconds=1)  # it did not run before its time


def test_waits_for_an_unknown_instance_return_nothing(client: sdk_client.TaskHubGrpcClient) -> None:
    assert client.get_orchestration_state("no-such-instance") is None
    assert client.wait_for_orchestration_start("no-such-instance", timeout=5) is None
    assert client.wait_for_orchestration_completion("no-such-instance", timeout=5) is None


def test_wait_for_start_times_out_at_the_deadline(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = client.schedule_new_orchestration(
        sdk_app.echo, input=1, start_at=datetime.now(UTC) + timedelta(hours=1)
    )
    with pytest.raises(TimeoutError):
        client.wait_for_orchestration_start(instance_id, timeout=0.3)
    client.terminate_orchestration(instance_id)
    assert completed(client, instance_id).runtime_status == OrchestrationStatus.TERMINATED


@pytest.mark.parametrize(
    ("instance_id", "complaint"),
    [("@counter@key", "belong to entities"), ("nul\x00inside", "control character"), ("x" * 1025, "at most 1024")],
)
def test_an_id_no_orchestration_can_have_is_refused(
    client: sdk_client.TaskHubGrpcClient, native_client: dtfx.Client, instance_id: str, complaint: str
) -> None:
    error = rpc_error(lambda: client.schedule_new_orchestration(sdk_app.echo, input=1, instance_id=instance_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in error.details()
    assert native_client.get_orchestration_state(instance_id) is None
    assert native_client.get_all_entities(dtfx.EntityQuery(include_transient=True)) == []


def test_restarting_an_entity_is_refused(client: sdk_client.TaskHubGrpcClient) -> None:
    error = rpc_error(lambda: client.restart_orchestration("@counter@key"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "belong to entities" in error.details()


@pytest.mark.parametrize("child_id", ["@counter@child", "nul\x00child", "c" * 1025])
def test_a_sub_orchestration_under_a_bad_id_fails_in_the_sdk_orchestrator(
    client: sdk_client.TaskHubGrpcClient, native_client: dtfx.Client, child_id: str
) -> None:
    instance_id = client.schedule_new_orchestration(sdk_app.bad_child_id, input=child_id)
    output = completed(client, instance_id).get_output()
    assert output["type"] == "dtfx.core.errors.InvalidInstanceIdError", output
    assert "cannot be used" in output["message"]
    assert native_client.get_orchestration_state(child_id) is None
