"""Every orchestration pattern, written with the official SDK and run by its worker against dtfx.

The clients are the SDK's too: the sync ``TaskHubGrpcClient`` and the async
``AsyncTaskHubGrpcClient``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from durabletask import client as sdk_client
from durabletask.client import OrchestrationStatus
from tests.grpc import sdk_app

import dtfx
from dtfx.core.history import TaskScheduled, TimerCreated
from dtfx.grpc import SidecarServer

pytestmark = pytest.mark.usefixtures("sdk_worker_running")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def async_client(sidecar: SidecarServer) -> AsyncIterator[sdk_client.AsyncTaskHubGrpcClient]:
    async with sdk_client.AsyncTaskHubGrpcClient(host_address=sidecar.address) as sdk:
        yield sdk


def run(
    client: sdk_client.TaskHubGrpcClient, orchestrator: object, value: object = None
) -> sdk_client.OrchestrationState:
    instance_id = client.schedule_new_orchestration(orchestrator, input=value)  # type: ignore[arg-type]
    state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None
    return state


def test_sequence_with_the_sync_client(client: sdk_client.TaskHubGrpcClient) -> None:
    state = run(client, sdk_app.sequence)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]


async def test_fan_out_fan_in_with_the_async_client(async_client: sdk_client.AsyncTaskHubGrpcClient) -> None:
    instance_id = await async_client.schedule_new_orchestration(sdk_app.fan_out_fan_in, input=10)
    state = await async_client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == sum(value * value for value in range(10))


def test_durable_timer(client: sdk_client.TaskHubGrpcClient) -> None:
    state = run(client, sdk_app.sleeper, 0.3)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    # current_utc_datetime comes from orchestratorStarted: the episode after the timer starts after it fired.
    assert state.get_output() >= 0.3


def test_external_event_arrives_before_the_timeout(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = client.schedule_new_orchestration(sdk_app.approval, input=30)
    client.wait_for_orchestration_start(instance_id, timeout=10)
    client.raise_orchestration_event(instance_id, "approval", data="Ada")
    state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.get_output() == "approved by Ada"


async def test_external_event_times_out(async_client: sdk_client.AsyncTaskHubGrpcClient) -> None:
    instance_id = await async_client.schedule_new_orchestration(sdk_app.approval, input=0.2)
    state = await async_client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.get_output() == "timed out"


def test_sub_orchestrations_with_default_and_given_ids(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = new_id("parent")
    client.schedule_new_orchestration(sdk_app.parent, instance_id=instance_id)
    state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == [
        {"instance_id": f"{instance_id}:0001", "parent": instance_id, "value": 4},
        {"instance_id": f"{instance_id}-named", "parent": instance_id, "value": 9},
    ]
    child_state = client.get_orchestration_state(f"{instance_id}:0001")
    assert child_state is not None and child_state.runtime_status == OrchestrationStatus.COMPLETED


def test_retries_reuse_the_task_id(client: sdk_client.TaskHubGrpcClient, native_client: dtfx.Client) -> None:
    key = uuid.uuid4().hex
    instance_id = client.schedule_new_orchestration(sdk_app.with_retries, input=key)
    state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == 3
    history = client.get_orchestration_history(instance_id)
    scheduled = [event for event in history if type(event).__name__ == "TaskScheduledEvent"]
    assert len(scheduled) == 3
    assert len({event.event_id for event in scheduled}) == 1  # the SDK schedules each retry under the same id
    # The same history, as dtfx stores it.
    native = native_client.get_orchestration_history(instance_id)
    assert [event.event_id for event in native if isinstance(event, TaskScheduled)] == [scheduled[0].event_id] * 3
    assert sum(isinstance(event, TimerCreated) for event in native) == 2


def test_continue_as_new(client: sdk_client.TaskHubGrpcClient) -> None:
    state = run(client, sdk_app.counter, {"n": 0, "until": 5})
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == 5
    assert state.get_input() == {"n": 5, "until": 5}


def test_continue_as_new_carries_over_events(client: sdk_client.TaskHubGrpcClient) -> None:
    instance_id = client.schedule_new_orchestration(sdk_app.collector, input=[])
    client.wait_for_orchestration_start(instance_id, timeout=10)
    for item in ("a", "b", "c"):  # all at once: two arrive while an earlier execution still runs
        client.raise_orchestration_event(instance_id, "item", data=item)
    state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    assert sorted(state.get_output()) == ["a", "b", "c"]


async def test_custom_status(async_client: sdk_client.AsyncTaskHubGrpcClient) -> None:
    instance_id = await async_client.schedule_new_orchestration(sdk_app.with_status)
    await async_client.wait_for_orchestration_start(instance_id, timeout=10)
    state = await async_client.get_orchestration_state(instance_id)
    while state is None or state.serialized_custom_status is None:  # set by the first episode
        await asyncio.sleep(0.01)
        state = await async_client.get_orchestration_state(instance_id)
    assert state.get_custom_status() == {"stage": "waiting"}
    await async_client.raise_orchestration_event(instance_id, "go", data=True)
    state = await async_client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.get_custom_status() == {"stage": "done"}


def test_orchestrator_failure_reaches_the_client(client: sdk_client.TaskHubGrpcClient) -> None:
    state = run(client, sdk_app.fails, "nope")
    assert state.runtime_status == OrchestrationStatus.FAILED
    assert state.failure_details is not None
    assert state.failure_details.error_type == "builtins.ValueError"  # the SDK's naming
    assert state.failure_details.message == "nope"
    with pytest.raises(sdk_client.OrchestrationFailedError):
        state.raise_if_failed()


def test_an_activity_error_without_a_message_is_still_a_failure(client: sdk_client.TaskHubGrpcClient) -> None:
    state = run(client, sdk_app.empty_failure)
    assert state.get_output() == {"failed": True, "type": "builtins.RuntimeError"}


def test_history_streams_every_event_in_order(client: sdk_client.TaskHubGrpcClient) -> None:
    state = run(client, sdk_app.sequence)
    history = client.get_orchestration_history(state.instance_id)
    names = [type(event).__name__ for event in history]
    assert names[:3] == ["OrchestratorStartedEvent", "ExecutionStartedEvent", "TaskScheduledEvent"]
    assert names[-1] == "ExecutionCompletedEvent"
    assert names.count("TaskCompletedEvent") == 3
    assert json.loads(history[-1].result) == state.get_output()  # type: ignore[attr-defined]
