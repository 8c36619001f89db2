"""Workers ride out lost PostgreSQL connections (what a database restart does to them)."""

from __future__ import annotations

import asyncio
import logging

import pytest

import dtfx
from dtfx.backends.postgres import parse_postgres_url
from dtfx.core.history import ExecutionCompleted
from tests.durability.worker_process import LEASE, app
from tests.postgres import postgres_url, terminate_connections

Status = dtfx.OrchestrationStatus


async def test_workers_retry_and_carry_on_when_connections_are_killed(caplog: pytest.LogCaptureFixture) -> None:
    url = postgres_url()
    _, schema, _ = parse_postgres_url(url)
    caplog.set_level(logging.WARNING)
    job = {"steps": 8, "sleep": 0.1}
    async with (
        dtfx.AsyncClient(url) as client,
        dtfx.Worker(url, app=app, options=dtfx.WorkerOptions(lease_duration=LEASE)),
    ):
        instance_ids = [
            await client.schedule_new_orchestration("sequence", input=job, instance_id=f"job-{index}")
            for index in range(12)
        ]
        terminated = 0
        for _ in range(4):
            await asyncio.sleep(0.2)
            terminated += await asyncio.to_thread(terminate_connections, schema)
        running = await client.query_orchestrations(dtfx.OrchestrationQuery(runtime_status=[Status.RUNNING]))
        states = [await client.wait_for_orchestration_completion(i, timeout=60) for i in instance_ids]
        histories = [await client.get_orchestration_history(i) for i in instance_ids]

    assert terminated >= 4  # the worker's and the client's connections, each time
    assert running.items  # the connections were killed while orchestrations were running
    for state, history in zip(states, histories, strict=True):
        assert state is not None and state.runtime_status == Status.COMPLETED
        assert state.get_output() == [10 * step for step in range(8)]
        assert sum(isinstance(event, ExecutionCompleted) for event in history) == 1
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any("PostgreSQL" in message for message in warnings), warnings
