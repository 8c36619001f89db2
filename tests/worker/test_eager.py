"""Eager activities: a sequence runs in one work item, one transaction per step, and yields to other messages."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

import dtfx
from dtfx import OrchestrationStatus as Status
from dtfx.backends.memory import MemoryBackend
from dtfx.core.errors import BackendError
from dtfx.core.history import TaskCompleted
from tests.chain_orchestrators import chain, chain_then_wait


class CountingBackend(MemoryBackend):
    """Counts the calls that eager activities are meant to save."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def lock_orchestration_work_items(self, *args: Any, **kwargs: Any) -> Any:
        items = await super().lock_orchestration_work_items(*args, **kwargs)
        if items:
            self._count("orchestration work items")
        return items

    async def _create_instance(self, *args: Any) -> Any:
        item = await super()._create_instance(*args)
        if item is not None:  # taken by the worker's intake as it was created
            self._count("orchestration work items")
        return item

    async def lock_activity_work_items(self, *args: Any, **kwargs: Any) -> Any:
        items = await super().lock_activity_work_items(*args, **kwargs)
        if items:
            self._count("activities locked")
        return items

    async def complete_orchestration_work_items(self, *args: Any, **kwargs: Any) -> Any:
        self._count("checkpoints")
        return await super().complete_orchestration_work_items(*args, **kwargs)


def chain_app(events: asyncio.Queue[str] | None = None) -> dtfx.App:
    app = dtfx.App()

    @app.activity
    async def step(ctx: dtfx.ActivityContext, n: int) -> int:
        if events is not None and n == 3:
            await events.put("step 3 running")
            await asyncio.sleep(0.2)
        return n + 1

    app.orchestrator(chain)
    app.orchestrator(chain_then_wait)

    return app


async def test_a_sequence_runs_eagerly_in_one_work_item() -> None:
    backend = CountingBackend()
    client = dtfx.AsyncClient(backend)
    async with dtfx.Worker(backend, app=chain_app()):
        instance_id = await client.schedule_new_orchestration("chain", input=20)
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == 20
    # One lock of the instance, no activity locked from the queue, one checkpoint per step: the first
    # activity ran before the first commit, which holds the start too.
    assert backend.calls == {"orchestration work items": 1, "checkpoints": 20}
    history = await client.get_orchestration_history(instance_id)
    assert sum(isinstance(event, TaskCompleted) for event in history) == 20


async def test_without_eager_activities_every_step_goes_through_the_queues() -> None:
    backend = CountingBackend()
    client = dtfx.AsyncClient(backend)
    options = dtfx.WorkerOptions(eager_activities=False)
    async with dtfx.Worker(backend, app=chain_app(), options=options):
        instance_id = await client.schedule_new_orchestration("chain", input=5)
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == 5
    assert backend.calls["activities locked"] == 5
    assert backend.calls["orchestration work items"] == 6


class StallingBackend(CountingBackend):
    """Takes ``stall`` seconds after locking orchestrations: a worker paused (SIGSTOP, a VM) just after."""

    stall = 0.0

    async def lock_orchestration_work_items(self, *args: Any, **kwargs: Any) -> Any:
        items = await super().lock_orchestration_work_items(*args, **kwargs)
        if items:
            await asyncio.sleep(self.stall)
        return items


async def test_a_first_activity_does_not_run_ahead_on_a_lease_near_its_end() -> None:
    # It would hold the lease for its window and a commit: run past the lease's end, another worker
    # would take the orchestration and run the activity again.
    backend = StallingBackend()
    client = dtfx.AsyncClient(backend)
    instance_id = await client.schedule_new_orchestration("chain", input=1)  # no worker yet: from the queue
    options = dtfx.WorkerOptions(lease_duration=timedelta(seconds=1.5))  # a window of 0.5 s
    backend.stall = 1.0
    async with dtfx.Worker(backend, app=chain_app(), options=options):
        await asyncio.sleep(1.2)  # the first lock and its stall
        backend.stall = 0.0
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == 1
    assert backend.calls["activities locked"] == 1  # from the queue, once


async def test_a_message_that_arrives_during_an_eager_chain_is_not_kept_waiting() -> None:
    events: asyncio.Queue[str] = asyncio.Queue()
    backend = CountingBackend()
    client = dtfx.AsyncClient(backend)
    async with dtfx.Worker(backend, app=chain_app(events)):
        instance_id = await client.schedule_new_orchestration("chain_then_wait", input=6)
        assert await events.get() == "step 3 running"
        await client.raise_orchestration_event(instance_id, "go", data="went")
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == [6, "went"]
    # The event made the checkpoint after step 3 release the lease; the queue took over from there.
    assert backend.calls["orchestration work items"] >= 2


async def test_a_message_that_arrives_while_the_first_activity_runs_ahead() -> None:
    events: asyncio.Queue[str] = asyncio.Queue()
    backend = CountingBackend()
    client = dtfx.AsyncClient(backend)
    app = dtfx.App()
    release = asyncio.Event()

    @app.activity
    async def first(ctx: dtfx.ActivityContext, _: Any) -> str:
        await events.put("first running")
        await release.wait()
        return "one"

    @app.activity
    async def second(ctx: dtfx.ActivityContext, value: str) -> str:
        return value + " two"

    @app.orchestrator
    def both(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        value = yield ctx.call_activity(first)
        value = yield ctx.call_activity(second, input=value)
        return [value, (yield ctx.wait_for_external_event("go"))]

    async with dtfx.Worker(backend, app=app):
        instance_id = await client.schedule_new_orchestration(both)
        assert await events.get() == "first running"
        await client.raise_orchestration_event(instance_id, "go", data="went")
        release.set()
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == ["one two", "went"]
    history = await client.get_orchestration_history(instance_id)
    assert sum(isinstance(event, TaskCompleted) for event in history) == 2


async def test_eager_activities_respect_the_activity_concurrency_limit() -> None:
    app = dtfx.App()
    running = {"now": 0, "peak": 0}

    @app.activity
    async def slow(ctx: dtfx.ActivityContext, _: Any) -> None:
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        await asyncio.sleep(0.05)
        running["now"] -= 1

    @app.orchestrator
    def one(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_activity(slow)
        yield ctx.call_activity(slow)

    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    concurrency = dtfx.ConcurrencyOptions(maximum_concurrent_activity_work_items=2)
    async with dtfx.Worker(backend, app=app, concurrency=concurrency):
        ids = [await client.schedule_new_orchestration(one) for _ in range(6)]
        for instance_id in ids:
            await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert running["peak"] == 2


async def test_a_slow_eager_activity_is_handed_over_with_its_lease() -> None:
    app = dtfx.App()
    runs: list[str] = []

    @app.activity
    async def slow(ctx: dtfx.ActivityContext, _: Any) -> str:
        runs.append("slow")
        await asyncio.sleep(0.5)
        return "done"

    @app.orchestrator
    def one(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(slow))

    backend = CountingBackend()
    client = dtfx.AsyncClient(backend)
    # A window of a third of the lease (50 ms); the activity runs ten times longer.
    options = dtfx.WorkerOptions(lease_duration=timedelta(milliseconds=150))
    async with dtfx.Worker(backend, app=app, options=options):
        instance_id = await client.schedule_new_orchestration(one)
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "done"
    # The activity went on running here with its lease renewed (nobody took its task from
    # the queue); the orchestration's lease went back, and its result came through the inbox.
    assert runs == ["slow"]
    assert "activities locked" not in backend.calls
    assert backend.calls["orchestration work items"] == 2


@pytest.mark.parametrize("slow_step", [1, 2], ids=["running ahead of the first commit", "after a kept lease"])
async def test_a_termination_does_not_wait_for_a_slow_eager_activity(slow_step: int) -> None:
    app = dtfx.App()
    running = asyncio.Event()
    release = asyncio.Event()

    @app.activity
    async def step(ctx: dtfx.ActivityContext, n: int) -> int:
        if n == slow_step:
            running.set()
            await release.wait()
        return n + 1

    @app.orchestrator
    def chain(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        value = yield ctx.call_activity(step, input=1)
        return (yield ctx.call_activity(step, input=value))

    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    options = dtfx.WorkerOptions(eager_activity_window=timedelta(milliseconds=100))
    async with dtfx.Worker(backend, app=app, options=options):
        instance_id = await client.schedule_new_orchestration(chain)
        await running.wait()
        # Even a first activity that runs ahead lets its episode be committed after the window.
        started = await client.wait_for_orchestration_start(instance_id, timeout=5)
        assert started is not None and started.runtime_status is Status.RUNNING
        await client.terminate_orchestration(instance_id, output="stopped")
        state = await client.wait_for_orchestration_completion(instance_id, timeout=5)
        assert state is not None and state.runtime_status is Status.TERMINATED
        release.set()


async def test_a_timer_that_fires_first_wins_against_an_activity() -> None:
    app = dtfx.App()

    @app.activity
    async def slow(ctx: dtfx.ActivityContext, _: Any) -> str:
        await asyncio.sleep(0.5)
        return "activity"

    @app.orchestrator
    def race(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        work = ctx.call_activity(slow)
        timeout = ctx.create_timer(timedelta(milliseconds=100))
        winner = yield dtfx.when_any([work, timeout])
        return "activity" if winner is work else "timeout"

    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    async with dtfx.Worker(backend, app=app):
        instance_id = await client.schedule_new_orchestration(race)
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    # Run eagerly, the activity (within the window) would have held the orchestration's
    # lease past the timer: an orchestration that waits for a timer too is left to the queues.
    assert state is not None and state.get_output() == "timeout"


async def test_an_event_that_arrives_first_wins_against_an_activity() -> None:
    app = dtfx.App()
    running = asyncio.Event()

    @app.activity
    async def slow(ctx: dtfx.ActivityContext, _: Any) -> str:
        running.set()
        await asyncio.sleep(0.5)
        return "activity"

    @app.orchestrator
    def race(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        work = ctx.call_activity(slow)
        cancel = ctx.wait_for_external_event("cancel")
        winner = yield dtfx.when_any([work, cancel])
        return "activity" if winner is work else "cancelled"

    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    async with dtfx.Worker(backend, app=app):
        instance_id = await client.schedule_new_orchestration(race)
        await running.wait()
        await client.raise_orchestration_event(instance_id, "cancel")
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "cancelled"


class FailingOnceBackend(MemoryBackend):
    """Its first checkpoint commit fails, as when the database is briefly unreachable."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def complete_orchestration_work_items(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise BackendError("the database went away for a moment")
        return await super().complete_orchestration_work_items(*args, **kwargs)


async def test_a_failed_commit_gives_back_the_activity_slot_of_its_eager_claim() -> None:
    backend = FailingOnceBackend()
    client = dtfx.AsyncClient(backend)
    # One activity slot: had the failed commit kept it, no activity could run again.
    concurrency = dtfx.ConcurrencyOptions(maximum_concurrent_activity_work_items=1)
    async with dtfx.Worker(backend, app=chain_app(), concurrency=concurrency):
        instance_id = await client.schedule_new_orchestration("chain", input=3)
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert backend.failed
    assert state is not None and state.get_output() == 3
