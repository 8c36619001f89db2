"""Chains of eager steps on the activity's thread: the same steps, committed the same way, off the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest

import dtfx
from dtfx import OrchestrationStatus as Status
from dtfx.backends.memory import MemoryBackend
from dtfx.core.errors import BackendError, BackendUnavailableError
from dtfx.core.history import TaskCompleted
from dtfx.core.workitems import CommitResult, OrchestrationCheckpoint
from tests.chain_orchestrators import chain, chain_then_wait


class ChainBackend(MemoryBackend):
    """Counts commits by the way they come (through the event loop, or blocking on a worker thread)."""

    poll_interval = 0.1  # expired leases are found by polling

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.lose_commit: int | None = None
        """Which blocking commit finds its lease taken (counted from 1)."""
        self.fail_commit: int | None = None
        """Which blocking commit fails, as when the database goes away for a moment."""
        self.fail_after_commit: int | None = None
        """Which blocking commit goes through but fails, as when the connection drops while the
        database confirms it."""
        self.stall_commit: tuple[int, float] | None = None
        """Which blocking commit waits how long before it starts (for a database that went away)."""

    def _count(self, name: str) -> int:
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name]

    async def complete_orchestration_work_items(self, checkpoints: Sequence[OrchestrationCheckpoint]) -> Any:
        self._count("loop commits")
        return await super().complete_orchestration_work_items(checkpoints)

    def complete_orchestration_work_items_blocking(
        self, checkpoints: Sequence[OrchestrationCheckpoint]
    ) -> list[CommitResult]:
        assert threading.current_thread() is not threading.main_thread()
        number = self._count("thread commits")
        if self.stall_commit is not None and number == self.stall_commit[0]:
            time.sleep(self.stall_commit[1])
        if number == self.fail_commit:
            raise BackendError("the database went away for a moment")
        if number == self.lose_commit:  # the lease expired and another worker took the instance and let it go
            instance = self._instances[checkpoints[0].instance_id]
            instance.lock_token = instance.locked_until = None
        results = super().complete_orchestration_work_items_blocking(checkpoints)
        if number == self.fail_after_commit:
            raise BackendUnavailableError("the connection dropped during the commit")
        return results

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


def chain_app(runs: list[int], slow: dict[int, float] | None = None) -> dtfx.App:
    app = dtfx.App()

    @app.activity
    def step(ctx: dtfx.ActivityContext, n: int) -> int:
        runs.append(n)
        time.sleep((slow or {}).get(n, 0))
        return n + 1

    app.orchestrator(chain)
    app.orchestrator(chain_then_wait)

    return app


async def run_to_end(
    backend: ChainBackend, app: dtfx.App, orchestrator: str, value: Any = None, **worker: Any
) -> dtfx.OrchestrationState:
    """Run one ``orchestrator`` of ``app`` on ``backend`` to its end, with a worker of these options."""
    client = dtfx.AsyncClient(backend)
    async with dtfx.Worker(backend, app=app, **worker):
        instance_id = await client.schedule_new_orchestration(orchestrator, input=value)
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None
    return state


async def run_chain(backend: ChainBackend, app: dtfx.App, length: int, **worker: Any) -> dtfx.OrchestrationState:
    return await run_to_end(backend, app, "chain", length, **worker)


async def test_a_sequence_of_sync_activities_goes_on_on_the_activity_thread() -> None:
    backend = ChainBackend()
    runs: list[int] = []
    state = await run_chain(backend, chain_app(runs), 10)
    assert state.get_output() == 10
    assert runs == list(range(10))
    # Every step commits on the activity's thread, the first one (the start, the first activity's
    # result, which ran ahead of it, and the second episode) too.
    assert backend.calls == {"orchestration work items": 1, "thread commits": 10}


async def test_without_a_backend_that_commits_on_any_thread_the_steps_stay_on_the_loop() -> None:
    class LoopOnly(ChainBackend):
        blocking_commits = False

    backend = LoopOnly()
    state = await run_chain(backend, chain_app([]), 5)
    assert state.get_output() == 5
    assert backend.calls == {"orchestration work items": 1, "loop commits": 5}


async def test_an_activity_that_outlasts_the_window_is_handed_over_from_the_thread() -> None:
    backend = ChainBackend()
    runs: list[int] = []
    # A window of a third of the lease (50 ms); step 3 runs for six times as long.
    options = dtfx.WorkerOptions(lease_duration=timedelta(milliseconds=150))
    state = await run_chain(backend, chain_app(runs, slow={3: 0.3}), 6, options=options)
    assert state.get_output() == 6
    # It ran once, went on as ordinary activity work, and its result came through the inbox:
    # the orchestration was locked again to take it.
    assert runs == list(range(6))
    assert backend.calls["orchestration work items"] == 2


async def test_a_first_activity_that_outlasts_the_window_ahead_of_the_first_commit_is_handed_over() -> None:
    backend = ChainBackend()
    runs: list[int] = []
    options = dtfx.WorkerOptions(lease_duration=timedelta(milliseconds=150))
    state = await run_chain(backend, chain_app(runs, slow={0: 0.3}), 4, options=options)
    assert state.get_output() == 4
    # The first episode was committed without it, and its result came through the inbox.
    assert runs == list(range(4))
    assert backend.calls["orchestration work items"] == 2
    assert backend.calls["loop commits"] == 1


async def test_a_chain_hands_back_to_the_loop_at_an_async_activity_and_takes_up_again_after() -> None:
    app = dtfx.App()

    @app.activity
    def sync_step(ctx: dtfx.ActivityContext, n: int) -> int:
        return n + 1

    @app.activity
    async def async_step(ctx: dtfx.ActivityContext, n: int) -> int:
        return n + 10

    @app.orchestrator
    def mixed(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        value = yield ctx.call_activity(sync_step, input=0)
        value = yield ctx.call_activity(async_step, input=value)
        value = yield ctx.call_activity(sync_step, input=value)
        return (yield ctx.call_activity(sync_step, input=value))

    backend = ChainBackend()
    state = await run_to_end(backend, app, "mixed")
    assert state.get_output() == 13
    # One work item all along: the async step ran on the loop, the chain took up again after it.
    assert backend.calls["orchestration work items"] == 1
    assert backend.calls["loop commits"] >= 1 and backend.calls["thread commits"] >= 1


async def test_a_chain_whose_first_episode_continues_as_new_commits_it_on_the_loop() -> None:
    app = dtfx.App()

    @app.activity
    def step(ctx: dtfx.ActivityContext, n: int) -> int:
        return n + 1

    @app.orchestrator
    def counter(ctx: dtfx.OrchestrationContext, n: int) -> Any:
        n = yield ctx.call_activity(step, input=n)
        if n < 3:
            ctx.continue_as_new(n)
            return None
        return n

    state = await run_to_end(ChainBackend(), app, "counter", 0)
    assert state.get_output() == 3


async def test_a_message_that_arrives_during_a_chain_ends_it_at_the_next_commit() -> None:
    backend = ChainBackend()
    runs: list[int] = []
    client = dtfx.AsyncClient(backend)
    async with dtfx.Worker(backend, app=chain_app(runs, slow={3: 0.2})):
        instance_id = await client.schedule_new_orchestration("chain_then_wait", input=6)
        while 3 not in runs:
            await asyncio.sleep(0.01)
        await client.raise_orchestration_event(instance_id, "go", data="went")
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == [6, "went"]
    assert runs == list(range(6))
    # The event made the commit after step 3 give the lease back; the queues took over from there.
    assert backend.calls["orchestration work items"] >= 2


async def test_a_lease_lost_during_a_chain_loses_no_result() -> None:
    backend = ChainBackend()
    backend.lose_commit = 3
    runs: list[int] = []
    state = await run_chain(backend, chain_app(runs), 6)
    assert state.get_output() == 6
    # The step whose commit was lost delivered its result through the inbox instead of running again.
    assert runs == list(range(6))
    history = await dtfx.AsyncClient(backend).get_orchestration_history(state.instance_id)
    assert sum(isinstance(event, TaskCompleted) for event in history) == 6


async def test_a_failed_commit_on_the_thread_gives_back_the_activity_slot() -> None:
    backend = ChainBackend()
    backend.fail_commit = 2
    runs: list[int] = []
    # One activity slot: had the failed commit kept it, no activity could run again.
    concurrency = dtfx.ConcurrencyOptions(maximum_concurrent_activity_work_items=1)
    state = await run_chain(backend, chain_app(runs), 5, concurrency=concurrency)
    assert state.get_output() == 5
    assert runs == list(range(5))


@pytest.mark.parametrize("committed", [False, True], ids=["not committed", "committed"])
async def test_a_chain_step_whose_commit_is_in_doubt_goes_on_at_once_and_runs_nothing_again(committed: bool) -> None:
    # The work item's release settles the step either way: the result it held goes to the
    # inbox (not committed), or the task it queued is given back (committed). Nothing waits
    # for a lease to expire (they last an hour here), and no activity runs twice.
    backend = ChainBackend()
    if committed:
        backend.fail_after_commit = 3
    else:
        backend.fail_commit = 3
    runs: list[int] = []
    state = await run_chain(backend, chain_app(runs), 6, options=dtfx.WorkerOptions(lease_duration=timedelta(hours=1)))
    assert state.get_output() == 6
    assert runs == list(range(6))


class LoopChainBackend(ChainBackend):
    """A :class:`ChainBackend` whose eager steps commit through the event loop, where
    ``stall_commit`` and ``fail_commit`` count (and stall or fail) the loop's commits."""

    blocking_commits = False

    async def complete_orchestration_work_items(self, checkpoints: Sequence[OrchestrationCheckpoint]) -> Any:
        number = self.calls.get("loop commits", 0) + 1
        if self.stall_commit is not None and number == self.stall_commit[0]:
            await asyncio.sleep(self.stall_commit[1])
        if number == self.fail_commit:
            self._count("loop commits")
            raise BackendError("the database went away for a moment")
        return await super().complete_orchestration_work_items(checkpoints)


@pytest.mark.parametrize("fails", [False, True], ids=["its lease lost", "failing"])
@pytest.mark.parametrize("stalled", [1, 3], ids=["the first commit", "a later one"])
@pytest.mark.parametrize("backend_class", [ChainBackend, LoopChainBackend], ids=["on its thread", "on the loop"])
async def test_an_instance_taken_up_again_while_a_chain_step_commits_replays_its_history(
    backend_class: type[ChainBackend], stalled: int, fails: bool
) -> None:
    # The step's commit waits past the leases (a database that went away), so the instance and
    # the step's activity are taken up again meanwhile. The live orchestration had gone on with
    # the step's episode, which is not committed: the instance is run again from its history.
    # (Had the live one served again, it would have taken the activity's result for one it had
    # already seen, and scheduled nothing more.)
    backend = backend_class()
    lease = timedelta(seconds=0.2)
    backend.stall_commit = (stalled, 4 * lease.total_seconds())
    if fails:
        backend.fail_commit = stalled
    runs: list[int] = []
    state = await run_chain(backend, chain_app(runs), 6, options=dtfx.WorkerOptions(lease_duration=lease))
    assert state.runtime_status == Status.COMPLETED and state.get_output() == 6
    assert sorted(set(runs)) == list(range(6))  # the stalled step's activity may run twice


@pytest.mark.parametrize("backend_class", [ChainBackend, LoopChainBackend], ids=["on its thread", "on the loop"])
async def test_a_chain_resumed_after_its_lease_ran_out_by_the_clock_runs_no_activity_another_took(
    backend_class: type[ChainBackend],
) -> None:
    # The process stops (SIGSTOP, a paused VM) during a step's commit for longer than the lease:
    # the next activity's task goes back to the queues, which run it. When the chain resumes, no
    # renewal has found the lease lost yet; the clock has (the kept lease runs from the commit's
    # start, not its end). On the loop, the activity runner's own check of an eager claim holds too.
    class Stalling(backend_class):  # type: ignore[misc,valid-type]
        skipped = timedelta(0)

        def now(self) -> datetime:
            return super().now() + self.skipped

        def _stall_after(self, kind: str) -> None:
            if self.calls.get(kind) == 2 and not self.skipped:  # the commit that scheduled step 2
                self.skipped = 2 * lease
                deadline = time.monotonic() + 5
                while 2 not in runs and time.monotonic() < deadline:  # run meanwhile from the queues
                    time.sleep(0.01)

        def complete_orchestration_work_items_blocking(
            self, checkpoints: Sequence[OrchestrationCheckpoint]
        ) -> list[CommitResult]:
            results = super().complete_orchestration_work_items_blocking(checkpoints)
            self._stall_after("thread commits")
            return results

        async def complete_orchestration_work_items(self, checkpoints: Sequence[OrchestrationCheckpoint]) -> Any:
            results = await super().complete_orchestration_work_items(checkpoints)
            await asyncio.to_thread(self._stall_after, "loop commits")
            return results

    lease = timedelta(seconds=30)
    runs: list[int] = []
    state = await run_chain(Stalling(), chain_app(runs), 6, options=dtfx.WorkerOptions(lease_duration=lease))
    assert state.get_output() == 6
    assert runs == list(range(6))


@pytest.mark.parametrize("committed", [False, True], ids=["not committed", "committed"])
@pytest.mark.parametrize("failing", [1, 3], ids=["the first commit", "a later one"])
async def test_an_eager_step_on_the_loop_whose_commit_is_in_doubt_goes_on_at_once_too(
    failing: int, committed: bool
) -> None:
    class LoopInDoubt(ChainBackend):
        blocking_commits = False

        async def complete_orchestration_work_items(self, checkpoints: Sequence[OrchestrationCheckpoint]) -> Any:
            number = self.calls.get("loop commits", 0) + 1
            if number == failing and not committed:
                self._count("loop commits")
                raise BackendUnavailableError("the database went away for a moment")
            results = await super().complete_orchestration_work_items(checkpoints)
            if number == failing:
                raise BackendUnavailableError("the connection dropped during the commit")
            return results

    runs: list[int] = []
    options = dtfx.WorkerOptions(lease_duration=timedelta(hours=1))
    state = await run_chain(LoopInDoubt(), chain_app(runs), 6, options=options)
    assert state.get_output() == 6
    # The first activity runs ahead of the commit that schedules it: had that commit not
    # gone through, the activity was never scheduled, and it runs again (at least once).
    assert runs == ([0] if failing == 1 and not committed else []) + list(range(6))


async def test_other_activity_work_sends_a_chain_back_to_the_loop() -> None:
    app = dtfx.App()
    runs: list[int] = []
    others_running = threading.Semaphore(0)
    step_10_may_end, others_may_end = threading.Event(), threading.Event()

    @app.activity
    def step(ctx: dtfx.ActivityContext, n: int) -> int:
        runs.append(n)
        if n == 10:
            step_10_may_end.wait(10)
        return n + 1

    @app.activity
    def hold(ctx: dtfx.ActivityContext, _: Any) -> str:
        others_running.release()
        others_may_end.wait(10)
        return "held"

    @app.orchestrator
    def chain(ctx: dtfx.OrchestrationContext, length: int) -> Any:
        value = 0
        for _ in range(length):
            value = yield ctx.call_activity(step, input=value)
        return value

    @app.orchestrator
    def other(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(hold))

    backend = ChainBackend()
    client = dtfx.AsyncClient(backend)
    async with dtfx.Worker(backend, app=app):
        long = await client.schedule_new_orchestration(chain, input=30)
        while 10 not in runs:
            await asyncio.sleep(0.005)
        others = [await client.schedule_new_orchestration(other) for _ in range(2)]
        for _ in others:
            await asyncio.to_thread(others_running.acquire)
        thread_commits = backend.calls["thread commits"]
        step_10_may_end.set()  # the others still hold activity slots
        while 15 not in runs:
            await asyncio.sleep(0.005)
        assert backend.calls["thread commits"] == thread_commits  # steps 10 to 14 went through the loop
        others_may_end.set()
        states = [await client.wait_for_orchestration_completion(i, timeout=10) for i in [long, *others]]
    assert [state.get_output() if state else None for state in states] == [30, "held", "held"]
    assert runs == list(range(30))


async def test_a_worker_stopped_during_a_chain_leaves_the_rest_to_the_next_one() -> None:
    backend = ChainBackend()
    runs: list[int] = []
    app = chain_app(runs, slow={2: 0.3})
    client = dtfx.AsyncClient(backend)
    options = dtfx.WorkerOptions(lease_duration=timedelta(seconds=1))
    async with dtfx.Worker(backend, app=app, options=options) as worker:
        instance_id = await client.schedule_new_orchestration("chain", input=5)
        while 2 not in runs:
            await asyncio.sleep(0.01)
        await worker.stop_async(grace_period=0)
    assert runs[-1] == 2  # the chain stopped after the step it was in
    async with dtfx.Worker(backend, app=app, options=options):
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.runtime_status is Status.COMPLETED and state.get_output() == 5


async def test_a_sync_activity_that_returns_an_awaitable_is_awaited_on_the_loop() -> None:
    app = dtfx.App()
    loops: list[asyncio.AbstractEventLoop] = []

    async def later(n: int) -> int:
        loops.append(asyncio.get_running_loop())
        return n + 1

    @app.activity
    def step(ctx: dtfx.ActivityContext, n: int) -> Any:
        return later(n)  # a sync wrapper around async code, as decorators make

    @app.orchestrator
    def chain(ctx: dtfx.OrchestrationContext, length: int) -> Any:
        value = 0
        for _ in range(length):
            value = yield ctx.call_activity(step, input=value)
        return value

    backend = ChainBackend()
    loop = asyncio.get_running_loop()
    state = await run_chain(backend, app, 4)
    assert state.get_output() == 4
    assert loops == [loop] * 4 and backend.calls["thread commits"] == 4
