"""A worker killed with SIGKILL in the middle of an orchestration loses nothing (SQLite)."""

from __future__ import annotations

from pathlib import Path

import dtfx
from dtfx.core.history import ExecutionCompleted, TaskScheduled
from tests.durability.processes import WorkerProcess, execution_counts, executions, wait_until


async def test_a_new_worker_finishes_what_a_killed_one_started(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/hub.db"
    log = tmp_path / "executions.log"
    async with dtfx.AsyncClient(url) as client:
        first = WorkerProcess(url, log)
        try:
            first.wait_ready()
            instance_id = await client.schedule_new_orchestration("sequence", input={"steps": 5, "sleep": 0.5})
            await wait_until(lambda: (instance_id, 2) in execution_counts(log), 30, "step 2 to start")
            first.kill()  # step 2 is sleeping; steps 0 and 1 are committed (step 2 was scheduled after them)
        finally:
            first.stop()

        second = WorkerProcess(url, log)
        try:
            second.wait_ready()
            state = await client.wait_for_orchestration_completion(instance_id, timeout=60)
        finally:
            second.stop()
        history = await client.get_orchestration_history(instance_id)

    assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED
    assert state.get_output() == [0, 10, 20, 30, 40]
    counts = execution_counts(log)
    assert counts[(instance_id, 0)] == counts[(instance_id, 1)] == 1  # completed: never run again
    assert 1 <= counts[(instance_id, 2)] <= 2  # in flight when killed: at most once more
    assert counts[(instance_id, 3)] == counts[(instance_id, 4)] == 1
    assert {pid for pid, _, step in executions(log) if step >= 3} == {second.pid}
    assert sum(isinstance(event, TaskScheduled) for event in history) == 5
    assert sum(isinstance(event, ExecutionCompleted) for event in history) == 1
