"""dtfx's own loops run on uvloop when it is installed, and everything works on them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import dtfx
from dtfx import _loops as loops
from dtfx._portal import LoopThread
from dtfx.backends import open_backend
from tests.postgres import postgres_url

uvloop = pytest.importorskip("uvloop")

app = dtfx.App()


@app.activity
def double(ctx: dtfx.ActivityContext, value: int) -> int:
    return 2 * value


@app.activity
async def add_one(ctx: dtfx.ActivityContext, value: int) -> int:
    return value + 1


@app.orchestrator
def mixed(ctx: dtfx.OrchestrationContext, value: int) -> Any:
    value = yield ctx.call_activity(double, input=value)  # in the thread pool
    value = yield ctx.call_activity(add_one, input=value)  # on the loop
    yield ctx.create_timer(timedelta(milliseconds=10))
    bonus = yield ctx.wait_for_external_event("bonus")
    parts = yield dtfx.when_all([ctx.call_activity(double, input=value + i) for i in range(3)])
    return sum(parts) + bonus


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/hub.db" if request.param == "sqlite" else postgres_url()


def test_a_worker_and_clients_on_uvloop(url: str) -> None:
    async def main() -> Any:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        backend = open_backend(url)
        try:
            async with dtfx.Worker(backend, app=app):
                client = dtfx.AsyncClient(backend)
                instance_id = await client.schedule_new_orchestration(mixed, input=5)
                await client.wait_for_orchestration_start(instance_id, timeout=30)
                await client.raise_orchestration_event(instance_id, "bonus", data=100)
                return await client.wait_for_orchestration_completion(instance_id, timeout=30)
        finally:
            await backend.close()

    state = loops.run(main())
    assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED
    assert state.get_output() == 2 * (11 + 12 + 13) + 100


def test_the_sync_client_runs_its_loop_on_uvloop(tmp_path: Path) -> None:
    backend = open_backend(f"sqlite:///{tmp_path}/hub.db")
    with dtfx.Worker(backend, app=app), dtfx.Client(backend) as client:
        instance_id = client.schedule_new_orchestration(mixed, input=1)
        client.wait_for_orchestration_start(instance_id, timeout=30)
        client.raise_orchestration_event(instance_id, "bonus", data=0)
        state = client.wait_for_orchestration_completion(instance_id, timeout=30)
        assert isinstance(client._portal._loop, uvloop.Loop)
    assert state is not None and state.get_output() == 2 * (3 + 4 + 5)


def test_closing_a_loop_thread_lets_what_still_runs_on_it_end() -> None:
    # As asyncio.run does: a start that Ctrl-C interrupted leaves a task closing a pool, say,
    # which a loop stopped under it would leave half done ("Task was destroyed but it is pending!").
    from dtfx._portal import LoopThread

    thread = LoopThread("dtfx-test")
    ended: list[str] = []

    async def runs_until_cancelled() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)  # a clean-up that awaits
            ended.append("cleaned up")

    thread.submit(runs_until_cancelled())
    thread.submit(asyncio.sleep(0))  # lets the first one start
    thread.close()
    assert ended == ["cleaned up"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loop_thread_ended_by_an_interrupt_says_so() -> None:
    # User code raising KeyboardInterrupt on a worker's loop stops it, as Ctrl-C would; what
    # the program does with the worker next says why, not only that it is closed.
    portal = LoopThread("interrupted")

    async def interrupt() -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(BaseException):
        portal.run(interrupt())
    deadline = time.monotonic() + 5
    while not portal.closed:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    async def anything() -> None:
        return None

    with pytest.raises(RuntimeError, match="event loop has ended: KeyboardInterrupt was raised on it"):
        portal.run(anything())


def test_a_call_cut_short_by_a_close_from_another_thread_says_so() -> None:
    portal = LoopThread("closed-meanwhile")
    threading.Timer(0.1, portal.close).start()
    with pytest.raises(RuntimeError, match="closed while the call waited"):
        portal.run(asyncio.sleep(30))
