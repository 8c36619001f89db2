"""Machines whose clocks disagree share a PostgreSQL task hub: its times are the server's.

Each process here has its own wall clock (libfaketime), ten minutes off this machine's,
which is also the server's. Read by each process's own clock, a new orchestration or an
event from a client ahead of the worker would wait ten minutes to be seen, and a worker
ahead of the others would take over the leases of live workers at once.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dtfx
from dtfx.core.history import TimerCreated, TimerFired
from tests.durability.processes import ROOT, WorkerProcess, execution_counts, executions, skewed_clock, wait_until
from tests.postgres import postgres_url

Status = dtfx.OrchestrationStatus

SKEW = 600  # seconds

_CLIENT = """
import json, sys
import dtfx
url, action, name, argument = sys.argv[1:]
with dtfx.Client(url) as client:
    if action == "start":
        print(client.schedule_new_orchestration(name, input=json.loads(argument)))
    else:
        client.raise_orchestration_event(name, "approval", data=argument)
"""


def _skewed_client(url: str, seconds: int, *arguments: str) -> str:
    """Run one client call in a process whose clock is ``seconds`` off; what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, url, *arguments],
        cwd=ROOT,
        env=skewed_clock(seconds),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_a_worker_behind_the_client_runs_new_orchestrations_and_timers_at_once(tmp_path: Path) -> None:
    url = postgres_url()
    worker = WorkerProcess(url, tmp_path / "executions.log", env=skewed_clock(-SKEW))
    try:
        worker.wait_ready()
        async with dtfx.AsyncClient(url) as client:
            sequence = await client.schedule_new_orchestration("sequence", input={"steps": 2})
            timer = await client.schedule_new_orchestration("timer_then_work", input={"delay": 1})
            scheduled_at = datetime.now(UTC)
            for instance_id in (sequence, timer):
                state = await client.wait_for_orchestration_completion(instance_id, timeout=60)
                assert state is not None and state.runtime_status == Status.COMPLETED, state
            history = await client.get_orchestration_history(timer)
    finally:
        worker.stop()
    created = next(event for event in history if isinstance(event, TimerCreated))
    fired = next(event for event in history if isinstance(event, TimerFired))
    # The worker set the timer by the server's clock (not ten minutes early), and it fired when due.
    assert abs(created.fire_at - (scheduled_at + timedelta(seconds=1))) < timedelta(seconds=30)
    assert fired.timestamp >= created.fire_at


async def test_a_worker_ahead_of_the_others_leaves_their_leases_alone(tmp_path: Path) -> None:
    url = postgres_url()
    log = tmp_path / "executions.log"
    first = WorkerProcess(url, log)
    ahead: WorkerProcess | None = None
    try:
        first.wait_ready()
        async with dtfx.AsyncClient(url) as client:
            # Each step outlasts the workers' 2 s lease, renewed by the worker that runs it.
            instance_id = await client.schedule_new_orchestration("sequence", input={"steps": 2, "sleep": 3})
            await wait_until(lambda: len(executions(log)) == 1, 30, "the first step to start")
            ahead = WorkerProcess(url, log, env=skewed_clock(SKEW))
            ahead.wait_ready()
            state = await client.wait_for_orchestration_completion(instance_id, timeout=60)
    finally:
        first.stop()
        if ahead is not None:
            ahead.stop()
    assert state is not None and state.runtime_status == Status.COMPLETED, state
    assert state.get_output() == [0, 10]
    assert execution_counts(log) == {(instance_id, 0): 1, (instance_id, 1): 1}


async def test_a_client_ahead_of_the_worker_starts_orchestrations_and_raises_events_at_once(tmp_path: Path) -> None:
    url = postgres_url()
    worker = WorkerProcess(url, tmp_path / "executions.log")
    try:
        worker.wait_ready()
        started = _skewed_client(url, SKEW, "start", "sequence", '{"steps": 1}')
        waiting = _skewed_client(url, SKEW, "start", "approval", "null")
        _skewed_client(url, SKEW, "raise", waiting, "yes")
        async with dtfx.AsyncClient(url) as client:
            for instance_id in (started, waiting):
                state = await client.wait_for_orchestration_completion(instance_id, timeout=60)
                assert state is not None and state.runtime_status == Status.COMPLETED, state
    finally:
        worker.stop()
    assert state.get_output() == "yes"
