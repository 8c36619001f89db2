"""Three worker processes share one task hub; one of them is killed mid-run; nothing is lost."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import pytest

import dtfx
from dtfx.core.history import ExecutionCompleted
from tests.durability.processes import execution_counts, executions, wait_until, worker_processes
from tests.postgres import postgres_url

Status = dtfx.OrchestrationStatus

# (orchestrator, input, expected output, activity executions)
JOBS: list[tuple[str, dict[str, Any], Any, int]] = [
    ("sequence", {"steps": 3, "sleep": 0.01}, [0, 10, 20], 3),
    ("fan_out", {"steps": 4, "sleep": 0.01}, 60, 4),
    ("timer_then_work", {"delay": 0.2}, 0, 1),
]


@pytest.fixture(params=["sqlite", "postgres"])
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, int]:
    """A task hub URL and how many orchestrations to run on it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/hub.db", 150
    return postgres_url(), 500


async def test_three_workers_run_every_orchestration_exactly_once(hub: tuple[str, int], tmp_path: Path) -> None:
    url, count = hub
    log = tmp_path / "executions.log"
    jobs = {f"job-{index}": JOBS[index % len(JOBS)] for index in range(count)}
    total_executions = sum(job[3] for job in jobs.values())

    async with dtfx.AsyncClient(url) as client:
        with worker_processes(url, log, 3) as workers:
            await asyncio.gather(
                *(
                    client.schedule_new_orchestration(name, input=job_input, instance_id=instance_id)
                    for instance_id, (name, job_input, _, _) in jobs.items()
                )
            )
            killed = workers[0]

            def under_way() -> bool:  # a quarter of the work done, and some of it by the worker to kill
                done = executions(log)
                return len(done) >= total_executions // 4 and any(pid == killed.pid for pid, _, _ in done)

            await wait_until(under_way, 60, "a quarter of the work, some of it by the worker to kill")
            killed.kill()

            async def all_ended() -> list[dtfx.OrchestrationState]:
                while True:
                    states = await client.get_all_orchestration_states(dtfx.OrchestrationQuery(max_instance_count=1000))
                    if len(states) == count and all(state.runtime_status.is_terminal for state in states):
                        return states
                    await asyncio.sleep(0.2)

            await asyncio.wait_for(all_ended(), 90)
        states = {instance_id: await client.get_orchestration_state(instance_id) for instance_id in jobs}
        histories = {instance_id: await client.get_orchestration_history(instance_id) for instance_id in jobs}

    for instance_id, (_, _, expected, _) in jobs.items():
        state = states[instance_id]
        assert state is not None and state.runtime_status == Status.COMPLETED, (instance_id, state)
        assert state.get_output() == expected, instance_id
        assert sum(isinstance(event, ExecutionCompleted) for event in histories[instance_id]) == 1, instance_id

    runs = collections.defaultdict(set)
    for pid, instance_id, step in executions(log):
        runs[instance_id, step].add(pid)
    counts = execution_counts(log)
    assert sum(1 for _ in counts) == total_executions  # every activity ran
    for key, times in counts.items():
        if times > 1:  # only what the killed worker had in flight runs again
            assert killed.pid in runs[key], key
    busy = collections.Counter(pid for pid, _, _ in executions(log))
    assert set(busy) == {worker.pid for worker in workers}, busy  # the work was spread
