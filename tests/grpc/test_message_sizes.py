"""Messages over the sidecar's size limit fail the work they carry, clearly, and hold nothing else up.

Most tests lower the limit to 64 KiB, so that the official SDK's own channel (4 MiB)
takes what the server refuses to send or take; one keeps the defaults, where a work item
over 4 MiB would break the SDK worker's stream.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from durabletask import client as sdk_client
from durabletask import task
from durabletask import worker as sdk_worker
from durabletask.client import OrchestrationStatus
from durabletask.entities import DurableEntity, EntityInstanceId
from tests.grpc.conftest import FAST, running_sdk_worker, running_sidecar

import dtfx
import grpc
from dtfx.grpc import SidecarServer

LIMIT = 64 << 10
TIMEOUT = 20


def make_text(ctx: task.ActivityContext, size: int) -> str:
    return "x" * size


def measure(ctx: task.ActivityContext, text: str) -> int:
    return len(text)


def text_of_size(ctx: task.OrchestrationContext, size: int) -> Any:
    return "y" * size


def activity_result_of_size(ctx: task.OrchestrationContext, size: int) -> Any:
    try:
        yield ctx.call_activity(make_text, input=size)
    except task.TaskFailedError as error:
        return error.details.error_type
    return "no error"


def two_results_of_size(ctx: task.OrchestrationContext, size: int) -> Any:
    first = yield ctx.call_activity(make_text, input=size)
    second = yield ctx.call_activity(make_text, input=size)
    return len(first) + len(second)


class Store(DurableEntity):
    def fill(self, size: int) -> int:
        self.set_state("s" * size)
        return size

    def append(self, text: str) -> int:
        state = self.get_state(str, "") + text
        self.set_state(state)
        return len(state)

    def length(self, _: Any = None) -> int:
        return len(self.get_state(str, ""))


class Tally(DurableEntity):
    def add(self, text: str) -> int:
        total = self.get_state(int, 0) + len(text)
        self.set_state(total)
        return total


def call_store(ctx: task.OrchestrationContext, calls: list[list[Any]]) -> Any:
    """Each ``[operation, input]`` in turn: its output, or the message it failed with."""
    outcomes: list[Any] = []
    for operation, value in calls:
        try:
            outcomes.append((yield ctx.call_entity(EntityInstanceId("Store", "one"), operation, value)))
        except task.TaskFailedError as error:
            outcomes.append(error.details.message)
    return outcomes


def register(worker: sdk_worker.TaskHubGrpcWorker) -> None:
    for activity in (make_text, measure):
        worker.add_activity(activity)
    for orchestrator in (text_of_size, activity_result_of_size, two_results_of_size, call_store):
        worker.add_orchestrator(orchestrator)
    worker.add_entity(Store)
    worker.add_entity(Tally)
    worker.use_work_item_filters()  # leaves a native worker its own orchestrations


@pytest.fixture(scope="module")
def sidecar() -> Iterator[SidecarServer]:
    with running_sidecar(options=dataclasses.replace(FAST, max_message_bytes=LIMIT)) as server:
        yield server


@pytest.fixture(scope="module")
def client(sidecar: SidecarServer) -> Iterator[sdk_client.TaskHubGrpcClient]:
    with (
        running_sdk_worker(sidecar.address, register),
        sdk_client.TaskHubGrpcClient(host_address=sidecar.address) as client,
    ):
        yield client


def run(client: sdk_client.TaskHubGrpcClient, orchestrator: Any, value: Any) -> sdk_client.OrchestrationState:
    instance_id = client.schedule_new_orchestration(orchestrator, input=value)
    state = client.wait_for_orchestration_completion(instance_id, timeout=TIMEOUT)
    assert state is not None
    return state


def too_large(state: sdk_client.OrchestrationState) -> str:
    assert state.runtime_status == OrchestrationStatus.FAILED
    assert state.failure_details is not None
    assert state.failure_details.error_type == "dtfx.core.errors.MessageTooLargeError"
    assert f"more than the {LIMIT:,}" in state.failure_details.message
    return state.failure_details.message


def test_an_activity_result_over_the_limit_fails_the_task(client: sdk_client.TaskHubGrpcClient) -> None:
    state = run(client, activity_result_of_size, LIMIT + 1)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == "dtfx.core.errors.MessageTooLargeError"
    assert run(client, activity_result_of_size, 100).get_output() == "no error"


def test_an_orchestrators_response_over_the_limit_fails_the_orchestration(
    client: sdk_client.TaskHubGrpcClient,
) -> None:
    message = too_large(run(client, text_of_size, LIMIT + 1))
    assert "The orchestrator's response for instance" in message
    assert run(client, text_of_size, 10).get_output() == "y" * 10


def test_a_history_grown_over_the_limit_fails_the_orchestration(client: sdk_client.TaskHubGrpcClient) -> None:
    message = too_large(run(client, two_results_of_size, LIMIT * 2 // 3))
    assert "its history and new events" in message and "Continue as new" in message
    assert run(client, two_results_of_size, 10).get_output() == 20


def test_entity_results_and_requests_over_the_limit_fail_their_operations(
    client: sdk_client.TaskHubGrpcClient,
) -> None:
    fits = LIMIT * 3 // 4
    calls = [
        ["fill", LIMIT + 1],  # its result's new state is too large
        ["length", None],
        ["fill", fits],
        ["append", "t" * (LIMIT // 4)],  # the state and this input are too large to send
        ["length", None],
    ]
    outcomes = run(client, call_store, calls).get_output()
    assert outcomes[1:3] == [0, fits] and outcomes[4] == fits
    assert "The result of a batch of entity '@store@one' is" in outcomes[0]
    assert "The work item of entity '@store@one' (its state and an operation) is" in outcomes[3]
    assert all(f"more than the {LIMIT:,}" in outcomes[index] for index in (0, 3))


def test_a_batch_of_signals_too_large_to_send_at_once_goes_in_parts(
    sidecar: SidecarServer, client: sdk_client.TaskHubGrpcClient
) -> None:
    """Each signal fits, all of them do not: none may be lost. (Due at one moment, they come
    in one batch.)"""
    tally = EntityInstanceId("Tally", "parts")
    due = datetime.now(UTC) + timedelta(seconds=1)
    for _ in range(100):
        client.signal_entity(tally, "add", "t" * 1024, signal_time=due)
    deadline = time.monotonic() + TIMEOUT
    while (entity := client.get_entity(tally)) is None or entity.get_state(int) != 100 * 1024:
        assert time.monotonic() < deadline, entity and entity.get_state(int)
        time.sleep(0.05)


def test_a_client_request_over_the_limit_is_refused_and_creates_nothing(
    sidecar: SidecarServer, client: sdk_client.TaskHubGrpcClient
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        client.schedule_new_orchestration(text_of_size, input="z" * LIMIT, instance_id="too-large")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"more than the {LIMIT:,}" in str(refused.value.details())
    with dtfx.Client(sidecar.backend) as native:
        assert native.get_orchestration_state("too-large") is None


native_app = dtfx.App()


@native_app.orchestrator
def measure_natively_scheduled(ctx: dtfx.OrchestrationContext, size: int) -> Any:
    try:
        return (yield ctx.call_activity("measure", input="m" * size))
    except dtfx.TaskFailedError as error:
        return error.failure_details.is_caused_by(dtfx.MessageTooLargeError)


def test_an_activity_input_over_the_limit_fails_the_task_before_it_is_sent(
    sidecar: SidecarServer, client: sdk_client.TaskHubGrpcClient
) -> None:
    """A native orchestration schedules an activity that only the SDK worker has, with an
    input the server will not send it."""
    options = dtfx.WorkerOptions(registered_only=True)
    with dtfx.Worker(sidecar.backend, app=native_app, options=options) as worker, dtfx.Client(worker.backend) as native:
        for size, output in ((LIMIT + 1, True), (100, 100)):
            instance_id = native.schedule_new_orchestration(measure_natively_scheduled, input=size)
            state = native.wait_for_orchestration_completion(instance_id, timeout=TIMEOUT)
            assert state is not None and state.get_output() == output, (state.runtime_status, state.failure_details)


def test_at_the_sdks_own_limit_a_history_too_large_fails_and_the_worker_goes_on() -> None:
    """With the defaults (4 MiB, as the SDK's channel takes), a history of two 3 MiB results
    would break the SDK worker's stream each time it was sent, and starve its other work."""
    three_mib = 3 << 20
    with (
        running_sidecar() as server,
        running_sdk_worker(server.address, register),
        sdk_client.TaskHubGrpcClient(host_address=server.address) as client,
    ):
        large = client.schedule_new_orchestration(two_results_of_size, input=three_mib)
        state = client.wait_for_orchestration_completion(large, timeout=TIMEOUT)
        assert state is not None and state.runtime_status == OrchestrationStatus.FAILED
        assert state.failure_details is not None and "its history and new events" in state.failure_details.message
        assert run(client, two_results_of_size, 10).get_output() == 20
