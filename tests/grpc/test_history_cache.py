"""The server keeps the history it sent an SDK worker, and reads the store again only when it changed elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from durabletask import client as sdk_client
from durabletask import task
from durabletask import worker as sdk_worker
from durabletask.client import OrchestrationStatus
from tests.grpc import sdk_app
from tests.grpc.conftest import FAST, run_sdk_sequence, running_sdk_worker, running_sidecar
from tests.polling import wait_until

import dtfx
from dtfx.core.history import HistoryEvent


def two_events(ctx: task.OrchestrationContext, _: Any) -> Any:
    ctx.set_custom_status("waiting for first")
    first = yield ctx.wait_for_external_event("first")
    ctx.set_custom_status("waiting for second")
    second = yield ctx.wait_for_external_event("second")
    return [first, second]


def _register(worker: sdk_worker.TaskHubGrpcWorker) -> None:
    sdk_app.register(worker)
    worker.add_orchestrator(two_events)


def _count_history_reads(backend: dtfx.MemoryBackend, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The instance ids whose history ``backend`` is asked for from now on."""
    reads: list[str] = []
    read = backend.get_history

    async def counted(instance_id: str) -> Sequence[HistoryEvent]:
        reads.append(instance_id)
        return await read(instance_id)

    monkeypatch.setattr(backend, "get_history", counted)
    return reads


@pytest.mark.parametrize(("cached_instances", "expected_reads"), [(10_000, 0), (0, 3)])
def test_later_episodes_reuse_the_history_sent_before(
    cached_instances: int, expected_reads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = dtfx.MemoryBackend()
    reads = _count_history_reads(backend, monkeypatch)
    instance_id = run_sdk_sequence(backend, options=replace(FAST, cached_instances=cached_instances))
    # The first episode has no history yet; each of the three after it has one.
    assert reads.count(instance_id) == expected_reads


def test_a_history_that_grew_on_another_server_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server A runs the first episode, B the second, A the third: A's history is stale by then."""
    backend = dtfx.MemoryBackend()
    reads = _count_history_reads(backend, monkeypatch)
    with (
        running_sidecar(backend) as first,
        running_sidecar(backend) as second,
        sdk_client.TaskHubGrpcClient(host_address=first.address) as client,
    ):
        with running_sdk_worker(first.address, _register):
            instance_id = client.schedule_new_orchestration(two_events)
            _wait_for_status(client, instance_id, "waiting for first")
        with running_sdk_worker(second.address, _register):
            client.raise_orchestration_event(instance_id, "first", data="a")
            _wait_for_status(client, instance_id, "waiting for second")
        assert reads == [instance_id]  # the second server had never seen it
        with running_sdk_worker(first.address, _register):
            client.raise_orchestration_event(instance_id, "second", data="b")
            state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    assert state.get_output() == ["a", "b"]
    assert reads == [instance_id, instance_id]


def _wait_for_status(client: sdk_client.TaskHubGrpcClient, instance_id: str, status: str) -> None:
    """Until the instance's custom status is ``status`` (the episode that set it is committed)."""

    def reached() -> bool:
        state = client.get_orchestration_state(instance_id)
        return state is not None and state.serialized_custom_status == f'"{status}"'

    wait_until(reached, timeout=15)
