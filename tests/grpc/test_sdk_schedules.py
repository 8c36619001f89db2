"""The official SDK's scheduled tasks (recurring schedules) on dtfx.

The SDK builds them from a durable entity per schedule, an orchestrator that operates
it, and durable timers: its client signals and reads the entity, and the entity starts
the scheduled orchestration at each interval. Nothing here is dtfx's own; it must all
work through the sidecar as it does on the SDK's own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from durabletask import client as sdk_client
from durabletask import task
from durabletask import worker as sdk_worker
from durabletask.scheduled import ScheduleCreationOptions, ScheduledTaskClient, ScheduleQuery, ScheduleStatus
from tests.grpc.conftest import running_sdk_worker, running_sidecar, wait_until

runs: list[tuple[float, Any]] = []
"""When each scheduled orchestration ran, and its input."""
_lock = threading.Lock()


def tick(ctx: task.OrchestrationContext, value: Any) -> Any:
    if not ctx.is_replaying:
        with _lock:
            runs.append((time.monotonic(), value))
    return value


def register(worker: sdk_worker.TaskHubGrpcWorker) -> None:
    worker.add_orchestrator(tick)
    worker.configure_scheduled_tasks()


@pytest.fixture(scope="module")
def schedules() -> Iterator[ScheduledTaskClient]:
    with running_sidecar() as server, running_sdk_worker(server.address, register=register):
        client = sdk_client.TaskHubGrpcClient(host_address=server.address)
        yield ScheduledTaskClient(client, operation_timeout=20)
        client.close()


def runs_since(moment: float) -> list[Any]:
    with _lock:
        return [value for at, value in runs if at >= moment]


def test_a_schedule_runs_its_orchestration_at_each_interval_until_paused(schedules: ScheduledTaskClient) -> None:
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
