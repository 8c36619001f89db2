"""The official SDK's extensions on dtfx: scheduled tasks, history export, large payloads.

The SDK builds the first two from durable entities, orchestrators, activities and
timers. A schedule is an entity that starts its orchestration at each interval; an
export job is an entity and an orchestrator whose activities list the ended instances
and stream their histories through a client. Large payloads are kept in a store of the
application's, and only their tokens pass through the task hub. Nothing here is dtfx's
own: it must all work through the sidecar as it does on the SDK's own.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from durabletask import client as sdk_client
from durabletask import task
from durabletask import worker as sdk_worker
from durabletask.extensions.history_export import (
    ExportDestination,
    ExportHistoryClient,
    ExportJobCreationOptions,
    ExportJobStatus,
    ExportMode,
)
from durabletask.payload.store import LargePayloadStorageOptions, PayloadStore
from durabletask.scheduled import ScheduleCreationOptions, ScheduledTaskClient, ScheduleQuery, ScheduleStatus
from tests.grpc import sdk_app
from tests.grpc.conftest import running_sdk_worker, running_sidecar
from tests.polling import wait_until

import dtfx

runs: list[tuple[float, Any]] = []
"""When each scheduled orchestration ran, and its input."""
_lock = threading.Lock()


def tick(ctx: task.OrchestrationContext, value: Any) -> Any:
    if not ctx.is_replaying:
        with _lock:
            runs.append((time.monotonic(), value))
    return value


class MemoryWriter:
    """A history export destination that keeps what it is given (a ``HistoryWriter``)."""

    def __init__(self) -> None:
        self.written: dict[str, tuple[str, bytes, str | None]] = {}

    def write(
        self,
        *,
        instance_id: str,
        container: str,
        blob_name: str,
        payload: bytes,
        content_type: str,
        content_encoding: str | None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.written[instance_id] = (container, payload, content_encoding)


@dataclass
class Extensions:
    client: sdk_client.TaskHubGrpcClient
    schedules: ScheduledTaskClient
    export: ExportHistoryClient
    writer: MemoryWriter


@pytest.fixture(scope="module")
def extensions() -> Iterator[Extensions]:
    """A server, and an SDK worker with :mod:`tests.grpc.sdk_app`, the schedules' and the export's parts."""
    writer = MemoryWriter()
    with running_sidecar() as server:
        client = sdk_client.TaskHubGrpcClient(host_address=server.address)
        export = ExportHistoryClient(client, writer)

        def register(worker: sdk_worker.TaskHubGrpcWorker) -> None:
            sdk_app.register(worker)
            worker.add_orchestrator(tick)
            worker.configure_scheduled_tasks()
            export.register_worker(worker)

        with running_sdk_worker(server.address, register=register):
            yield Extensions(client, ScheduledTaskClient(client, operation_timeout=20), export, writer)
        client.close()


def runs_since(moment: float) -> list[Any]:
    with _lock:
        return [value for at, value in runs if at >= moment]


def test_a_schedule_runs_its_orchestration_at_each_interval_until_paused(extensions: Extensions) -> None:
    schedules = extensions.schedules
    began = time.monotonic()
    schedule = schedules.create_schedule(
        ScheduleCreationOptions(
            schedule_id="every-second", orchestration_name="tick", interval=timedelta(seconds=1), orchestration_input=7
        )
    )
    assert schedule.describe().status == ScheduleStatus.ACTIVE
    assert wait_until(lambda: len(runs_since(began)) >= 2) and runs_since(began)[:2] == [7, 7]
    schedule.pause()
    assert schedule.describe().status == ScheduleStatus.PAUSED
    paused = time.monotonic()
    time.sleep(1.5)
    assert runs_since(paused + 0.2) == []  # a run that was already on its way may land just after the pause
    assert [found.schedule_id for found in schedules.list_schedules(ScheduleQuery())] == ["every-second"]
    resumed = time.monotonic()
    schedule.resume()
    assert wait_until(lambda: runs_since(resumed))
    schedule.delete()
    assert schedules.get_schedule("every-second") is None


def test_an_export_job_writes_the_history_of_every_instance_that_ended_in_its_window(extensions: Extensions) -> None:
    client = extensions.client
    since = datetime.now(UTC) - timedelta(seconds=1)
    instance_ids = [client.schedule_new_orchestration(sdk_app.sequence) for _ in range(3)]
    for instance_id in instance_ids:
        client.wait_for_orchestration_completion(instance_id, timeout=15)
    extensions.export.create_job(
        ExportJobCreationOptions(
            mode=ExportMode.BATCH,
            completed_time_from=since,
            completed_time_to=datetime.now(UTC) + timedelta(seconds=1),
            destination=ExportDestination(container="histories"),
        ),
        job_id="recent",
    )
    job = extensions.export.wait_for_job("recent", timeout=30)
    written = extensions.writer.written  # the other tests' instances that ended in the window too
    assert (job.status, job.exported_instances, job.failed_instances) == (ExportJobStatus.COMPLETED, len(written), 0)
    assert set(instance_ids) <= set(written)
    container, payload, encoding = written[instance_ids[0]]
    assert (container, encoding) == ("histories", "gzip")
    lines = [json.loads(line) for line in gzip.decompress(payload).decode().splitlines()]
    assert lines[0]["kind"] == "metadata" and lines[0]["metadata"]["runtime_status"] == "COMPLETED"
    kinds = [line.get("event_type") for line in lines[1:]]
    assert kinds.count("TaskCompletedEvent") == 3
    assert kinds[-2:] == ["OrchestratorCompletedEvent", "ExecutionCompletedEvent"]


class MemoryPayloads(PayloadStore):
    """A large-payload store in memory: payloads over 1 KiB are kept here, as tokens elsewhere."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    @property
    def options(self) -> LargePayloadStorageOptions:
        return LargePayloadStorageOptions(threshold_bytes=1024, enable_compression=False)

    def upload(self, data: bytes, *, instance_id: str | None = None) -> str:
        token = f"memory:{uuid.uuid4().hex}"
        self.blobs[token] = data
        return token

    async def upload_async(self, data: bytes, *, instance_id: str | None = None) -> str:
        return self.upload(data, instance_id=instance_id)

    def download(self, token: str) -> bytes:
        return self.blobs[token]

    async def download_async(self, token: str) -> bytes:
        return self.download(token)

    def is_known_token(self, value: str) -> bool:
        return value.startswith("memory:")


def test_large_payloads_pass_through_the_hub_as_tokens() -> None:
    payloads = MemoryPayloads()

    def register(worker: sdk_worker.TaskHubGrpcWorker) -> None:
        worker.add_orchestrator(sdk_app.echo)

    text = "x" * 5000
    with running_sidecar() as server, running_sdk_worker(server.address, register=register, payload_store=payloads):
        client = sdk_client.TaskHubGrpcClient(host_address=server.address, payload_store=payloads)
        try:
            instance_id = client.schedule_new_orchestration(sdk_app.echo, input=text)
            state = client.wait_for_orchestration_completion(instance_id, timeout=15)
        finally:
            client.close()
        assert state is not None and state.get_output() == text
        with dtfx.Client(server.backend) as native:
            stored = native.get_orchestration_state(instance_id)
    assert stored is not None and stored.serialized_input is not None and stored.serialized_output is not None
    assert payloads.is_known_token(stored.serialized_input) and payloads.is_known_token(stored.serialized_output)


class _Properties:
    """An exception properties provider (the SDK's ``exception_properties_provider``)."""

    def get_exception_properties(self, exception: Exception) -> dict[str, Any]:
        return {"code": 42, "retry": False, "none": None, "text": "42", "nested": {"a": [1, "b"]}}


def _failing(ctx: task.ActivityContext, _: Any) -> None:
    raise ValueError("with properties")


def _catches(ctx: task.OrchestrationContext, _: Any) -> Any:
    try:
        yield ctx.call_activity(_failing)
    except task.TaskFailedError as error:
        return error.details.properties
    return None


def _throws(ctx: task.OrchestrationContext, _: Any) -> Any:
    yield ctx.call_activity(_failing)


def _register_properties(worker: sdk_worker.TaskHubGrpcWorker) -> None:
    worker.add_activity(_failing)
    worker.add_orchestrator(_catches)
    worker.add_orchestrator(_throws)


def test_failure_properties_keep_their_json_types() -> None:
    """As on the SDK's own backends: ``retry`` false is not the text "false", which would be true."""
    expected = {"code": 42.0, "retry": False, "none": None, "text": "42", "nested": {"a": [1.0, "b"]}}
    with (
        running_sidecar() as server,
        running_sdk_worker(server.address, _register_properties, exception_properties_provider=_Properties()),
        sdk_client.TaskHubGrpcClient(host_address=server.address) as client,
    ):
        caught = client.schedule_new_orchestration(_catches)
        thrown = client.schedule_new_orchestration(_throws)
        caught_state = client.wait_for_orchestration_completion(caught, timeout=15)
        thrown_state = client.wait_for_orchestration_completion(thrown, timeout=15)
    assert caught_state is not None and json.loads(caught_state.serialized_output or "") == expected
    assert thrown_state is not None and thrown_state.failure_details is not None
    assert thrown_state.failure_details.inner_failure is not None
    assert thrown_state.failure_details.inner_failure.properties == expected
