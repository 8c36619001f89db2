"""Running and killing worker processes, and reading what they did."""

from __future__ import annotations

import asyncio
import collections
import glob
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def skewed_clock(seconds: int) -> dict[str, str]:
    """The environment of a process whose wall clock is ``seconds`` ahead of this machine's
    (behind, if negative), by Debian's libfaketime; its monotonic clock is left alone, as a
    machine's clock that is off leaves it. Skips when libfaketime is missing (fails in CI)."""
    libraries = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    if not libraries:
        reason = "libfaketime is not installed (Debian's package faketime)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    env = {
        **os.environ,
        "LD_PRELOAD": libraries[0],
        "FAKETIME": f"{seconds:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }
    shown = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"], env=env, capture_output=True, text=True, check=True
    )
    off = float(shown.stdout) - time.time()
    assert abs(off - seconds) < 10, f"the process's clock is {off:.1f} s off, not {seconds} s"
    return env


class WorkerProcess:
    """A ``tests.durability.worker_process`` running against one task hub."""

    def __init__(self, url: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.durability.worker_process", url, str(log)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until the worker has started."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the process prints "ready" once started, or dies
        assert line.strip() == "ready", f"worker {self.pid} did not start (exit code {self.process.poll()})"

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextmanager
def worker_processes(url: str, log: Path, count: int) -> Iterator[list[WorkerProcess]]:
    """``count`` started worker processes, stopped on exit."""
    workers = [WorkerProcess(url, log) for _ in range(count)]
    try:
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def executions(log: Path) -> list[tuple[int, str, int]]:
    """The (pid, instance id, step) of every activity execution logged so far."""
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        pid, instance_id, step = line.split(" ")
        rows.append((int(pid), instance_id, int(step)))
    return rows


def execution_counts(log: Path) -> collections.Counter[tuple[str, int]]:
    """How many times each (instance id, step) ran."""
    return collections.Counter((instance_id, step) for _, instance_id, step in executions(log))


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate()`` every 20 ms until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
