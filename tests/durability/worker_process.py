"""A worker process for the durability tests: ``python -m tests.durability.worker_process URL LOG``.

It runs a :class:`dtfx.Worker` with a short lease on the task hub at ``URL`` until it is
terminated, and appends one line per activity execution to the file ``LOG``:
``<pid> <instance id> <step>``. Appends of one short line are atomic, and they reach
the file before the activity returns, so a test that kills the process still counts
every execution.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import timedelta
from typing import Any

import dtfx

LEASE = timedelta(seconds=2)

app = dtfx.App()
_log_fd: int | None = None
_never = threading.Event()  # waited on for a while; never set


def record(instance_id: str, step: int) -> None:
    """Note one activity execution in the log file."""
    if _log_fd is not None:
        os.write(_log_fd, f"{os.getpid()} {instance_id} {step}\n".encode())


@app.activity
def work(ctx: dtfx.ActivityContext, job: dict[str, Any]) -> int:
    """Step ``job["step"]``: sleeps ``job["sleep"]`` seconds and returns ``10 * step``."""
    record(ctx.orchestration_id, job["step"])
    # Not time.sleep, which libfaketime breaks (EINVAL) in the processes of tests/durability/test_clock_skew.py.
    _never.wait(job.get("sleep", 0))
    return 10 * int(job["step"])


@app.orchestrator
def sequence(ctx: dtfx.OrchestrationContext, job: dict[str, Any]) -> Any:
    """``job["steps"]`` activities one after the other."""
    results = []
    for step in range(job["steps"]):
        results.append((yield ctx.call_activity(work, input={"step": step, "sleep": job.get("sleep", 0)})))
    return results


@app.orchestrator
def fan_out(ctx: dtfx.OrchestrationContext, job: dict[str, Any]) -> Any:
    """``job["steps"]`` activities at once; their sum."""
    tasks = [
        ctx.call_activity(work, input={"step": step, "sleep": job.get("sleep", 0)}) for step in range(job["steps"])
    ]
    results = yield dtfx.when_all(tasks)
    return sum(results)


@app.orchestrator
def timer_then_work(ctx: dtfx.OrchestrationContext, job: dict[str, Any]) -> Any:
    """A durable timer of ``job["delay"]`` seconds, then one activity."""
    yield ctx.create_timer(ctx.current_utc_datetime + timedelta(seconds=job["delay"]))
    result = yield ctx.call_activity(work, input={"step": 0})
    return result


@app.orchestrator
def approval(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
    """Waits for the external event ``approval`` and returns its data."""
    return (yield ctx.wait_for_external_event("approval"))


def main() -> None:
    global _log_fd
    url, log_path = sys.argv[1], sys.argv[2]
    _log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Few orchestrations and activities at a time, so that one process cannot lease all of them at once.
    concurrency = dtfx.ConcurrencyOptions(
        maximum_concurrent_orchestration_work_items=10, maximum_concurrent_activity_work_items=10
    )
    with dtfx.Worker(url, app=app, concurrency=concurrency, options=dtfx.WorkerOptions(lease_duration=LEASE)):
        print("ready", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
