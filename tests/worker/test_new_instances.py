"""A new instance is stored before anything of it runs that others can see (its activities),
also when a worker of its client's process takes it at once, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import dtfx
from dtfx.backends import Backend, open_backend
from dtfx.core.errors import OrchestrationAlreadyExistsError
from tests.postgres import postgres_url


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    backend = open_backend(f"sqlite:///{tmp_path}/hub.db" if request.param == "sqlite" else postgres_url())
    try:
        yield backend
    finally:
        await backend.close()


def watching_app(backend: Backend, seen: list[tuple[str, Any]], *, async_greeting: bool = False) -> dtfx.App:
    """``greet`` greets its names in turn; each greeting records the status its instance
    has in the store at that moment (read through a client of its own)."""
    app = dtfx.App()
    lock = threading.Lock()

    def record(ctx: dtfx.ActivityContext, name: str) -> str:
        with dtfx.Client(backend) as client:
            state = client.get_orchestration_state(ctx.orchestration_id)
        with lock:
            seen.append((name, None if state is None else state.runtime_status))
        return f"Hello, {name}!"

    if async_greeting:

        @app.activity(name="hello")
        async def hello_async(ctx: dtfx.ActivityContext, name: str) -> str:
            return await asyncio.to_thread(record, ctx, name)

    else:

        @app.activity(name="hello")
        def hello(ctx: dtfx.ActivityContext, name: str) -> str:
            return record(ctx, name)

    @app.orchestrator
    def greet(ctx: dtfx.OrchestrationContext, names: list[str]) -> Any:
        greetings = []
        for name in names:
            greetings.append((yield ctx.call_activity("hello", input=name)))
        return greetings

    return app


@pytest.mark.parametrize("async_greeting", [False, True])
async def test_an_instance_is_stored_before_its_first_activity_runs(backend: Backend, async_greeting: bool) -> None:
    # A client on the worker's backend and loop: the worker takes each instance as it is
    # created, and runs its first activity at once, ahead of the first episode's commit.
    seen: list[tuple[str, Any]] = []
    async with dtfx.Worker(backend, app=watching_app(backend, seen, async_greeting=async_greeting)):
        client = dtfx.AsyncClient(backend)
        for round_ in range(5):
            instance_id = await client.schedule_new_orchestration("greet", input=[f"a{round_}", f"b{round_}"])
            state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
            assert state is not None and state.get_output() == [f"Hello, a{round_}!", f"Hello, b{round_}!"]
    # The first greeting saw the instance as created; the second, after the first step's commit.
    pending, running = dtfx.OrchestrationStatus.PENDING, dtfx.OrchestrationStatus.RUNNING
    assert [status for _, status in seen] == [pending, running] * 5


async def test_a_start_that_the_reuse_rules_refuse_runs_nothing(backend: Backend) -> None:
    seen: list[tuple[str, Any]] = []
    async with dtfx.Worker(backend, app=watching_app(backend, seen)):
        client = dtfx.AsyncClient(backend)
        await client.schedule_new_orchestration("greet", input=["first"], instance_id="once")
        await client.wait_for_orchestration_completion("once", timeout=10)
        with pytest.raises(OrchestrationAlreadyExistsError):
            await client.schedule_new_orchestration("greet", input=["second"], instance_id="once")
        replace = dtfx.OrchestrationIdReusePolicy.of(dtfx.OrchestrationStatus.COMPLETED)
        await client.schedule_new_orchestration("greet", input=["third"], instance_id="once", reuse_id_policy=replace)
        state = await client.wait_for_orchestration_completion("once", timeout=10)
    assert state is not None and state.get_output() == ["Hello, third!"]
    assert [name for name, _ in seen] == ["first", "third"]


async def test_a_start_cancelled_as_it_creates_the_instance_leaves_it_to_any_worker(backend: Backend) -> None:
    """A request cancelled as it waited, or a timeout around it: the creation it had queued may
    go through all the same, leased to the worker of the client's process, which never hears
    of it. The lease is given back, so that the instance runs at once, not a lease later."""
    seen: list[tuple[str, Any]] = []
    async with dtfx.Worker(backend, app=watching_app(backend, seen)):
        client = dtfx.AsyncClient(backend)
        await client.get_orchestration_state("warm-up")
        ids = [f"cancelled-{n}" for n in range(60)]
        for n, instance_id in enumerate(ids):
            start = asyncio.create_task(client.schedule_new_orchestration("greet", input=[n], instance_id=instance_id))
            await asyncio.sleep(0.0005 * (n % 10))  # at each point of its way
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
        created = [i for i in ids if await client.get_orchestration_state(i) is not None]
        assert created  # (most of them are: each is queued at once, and runs with the others)
        for instance_id in created:  # within seconds, where a lease is a minute
            state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
            assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED
