"""One task hub, two kinds of workers and clients: native dtfx and the official SDK over gRPC."""

from __future__ import annotations

from typing import Any

from durabletask import client as sdk_client
from durabletask import worker as sdk_worker
from durabletask.client import OrchestrationStatus
from tests.grpc import sdk_app
from tests.grpc.conftest import running_sdk_worker, running_sidecar

import dtfx

native_app = dtfx.App()


@native_app.activity
def shout(ctx: dtfx.ActivityContext, text: str) -> str:
    return text.upper() + "!"


@native_app.orchestrator
def native_greeting(ctx: dtfx.OrchestrationContext, name: str) -> Any:
    return (yield ctx.call_activity(shout, input=f"hello {name}"))


def test_a_native_client_starts_what_an_sdk_worker_runs() -> None:
    with running_sidecar() as server, running_sdk_worker(server.address), dtfx.Client(server.backend) as native:
        instance_id = native.schedule_new_orchestration("sequence", tags={"from": "native"})
        state = native.wait_for_orchestration_completion(instance_id, timeout=15)
        assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED
        assert state.get_output() == ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]


def test_an_sdk_client_starts_what_a_native_worker_runs_beside_a_filtered_sdk_worker() -> None:
    """The sidecar locks only what the SDK worker's filters name, so native work is left to the native worker.

    (A native worker locks every name, so while one runs, the hub should hold no work
    for SDK workers only: it would take and fail it.)
    """

    def register_with_filters(worker: sdk_worker.TaskHubGrpcWorker) -> None:
        sdk_app.register(worker)
        worker.use_work_item_filters()  # derived from what it registered

    with (
        running_sidecar() as server,
        running_sdk_worker(server.address, register_with_filters),
        sdk_client.TaskHubGrpcClient(host_address=server.address) as client,
    ):
        with dtfx.Worker(server.backend, app=native_app):
            native_ids = [client.schedule_new_orchestration("native_greeting", input=f"n{n}") for n in range(5)]
            for n, instance_id in enumerate(native_ids):
                state = client.wait_for_orchestration_completion(instance_id, timeout=15)
                assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
                assert state.get_output() == f"HELLO N{n}!"
        sdk_id = client.schedule_new_orchestration(sdk_app.sequence)
        sdk_state = client.wait_for_orchestration_completion(sdk_id, timeout=15)
        assert sdk_state is not None and sdk_state.runtime_status == OrchestrationStatus.COMPLETED


def test_work_an_sdk_worker_filters_out_waits_for_one_that_takes_it() -> None:
    def only_echo(worker: sdk_worker.TaskHubGrpcWorker) -> None:
        worker.add_orchestrator(sdk_app.echo)
        worker.use_work_item_filters()

    with (
        running_sidecar() as server,
        running_sdk_worker(server.address, only_echo),
        sdk_client.TaskHubGrpcClient(host_address=server.address) as client,
    ):
        waiting = client.schedule_new_orchestration(sdk_app.sequence)
        echoed = client.schedule_new_orchestration(sdk_app.echo, input="ok")
        assert client.wait_for_orchestration_completion(echoed, timeout=15).get_output() == "ok"
        assert client.get_orchestration_state(waiting).runtime_status == OrchestrationStatus.PENDING
        with running_sdk_worker(server.address):
            state = client.wait_for_orchestration_completion(waiting, timeout=15)
            assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED


def versioned(version: str, failure: sdk_worker.VersionFailureStrategy) -> Any:
    def register(worker: sdk_worker.TaskHubGrpcWorker) -> None:
        worker.add_orchestrator(sdk_app.echo)
        worker.use_versioning(
            sdk_worker.VersioningOptions(
                version=version, match_strategy=sdk_worker.VersionMatchStrategy.STRICT, failure_strategy=failure
            )
        )

    return register


def test_versioning_reject_leaves_the_instance_for_a_matching_worker() -> None:
    with (
        running_sidecar() as server,
        running_sdk_worker(server.address, versioned("2.0", sdk_worker.VersionFailureStrategy.REJECT)),
        sdk_client.TaskHubGrpcClient(host_address=server.address) as client,
    ):
        old = client.schedule_new_orchestration(sdk_app.echo, input="v1", version="1.0")
        current = client.schedule_new_orchestration(sdk_app.echo, input="v2", version="2.0")
        assert client.wait_for_orchestration_completion(current, timeout=15).get_output() == "v2"
        # The v2 worker abandons the v1 instance each time it is offered; it stays pending, intact.
        assert client.get_orchestration_state(old).runtime_status == OrchestrationStatus.PENDING
        with running_sdk_worker(server.address, versioned("1.0", sdk_worker.VersionFailureStrategy.REJECT)):
            state = client.wait_for_orchestration_completion(old, timeout=15)
            assert state is not None and state.get_output() == "v1"


def test_versioning_fail_fails_the_instance() -> None:
    with (
        running_sidecar() as server,
        running_sdk_worker(server.address, versioned("2.0", sdk_worker.VersionFailureStrategy.FAIL)),
        sdk_client.TaskHubGrpcClient(host_address=server.address) as client,
    ):
        instance_id = client.schedule_new_orchestration(sdk_app.echo, input="v1", version="1.0")
        state = client.wait_for_orchestration_completion(instance_id, timeout=15)
        assert state is not None and state.runtime_status == OrchestrationStatus.FAILED
        assert state.failure_details is not None and "1.0" in state.failure_details.message
