"""A worker's cached instances are reused only while the store holds the instance as the worker left it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import dtfx
from dtfx.backends.sqlite import SqliteBackend
from dtfx.core.history import ExecutionRewound, HistoryEvent, TaskScheduled
from dtfx.core.workitems import CommitResult, OrchestrationCheckpoint, OrchestrationWorkItem


class PausedAfterItsFirstCommit(SqliteBackend):
    """A worker's own backend object, whose worker fetches no orchestration work after its
    first commit until :meth:`resume`: a worker paused (SIGSTOP, a VM) with what it cached."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._running = asyncio.Event()
        self._running.set()
        self._committed = False

    def resume(self) -> None:
        self._running.set()

    async def lock_orchestration_work_items(self, *args: Any, **kwargs: Any) -> list[OrchestrationWorkItem]:
        await self._running.wait()
        return await super().lock_orchestration_work_items(*args, **kwargs)

    async def complete_orchestration_work_items(
        self, checkpoints: Sequence[OrchestrationCheckpoint]
    ) -> list[CommitResult]:
        results = await super().complete_orchestration_work_items(checkpoints)
        if not self._committed:
            self._committed = True
            self._running.clear()
        return results


async def test_an_instance_rewound_by_another_worker_is_replayed_not_taken_from_the_cache(tmp_path: Path) -> None:
    # The paused worker cached the instance at 10 events; the rewind rewrote its history to 10
    # events as well, on the same execution: taken for the cached one, it ran an empty episode
    # and the instance stayed RUNNING for good.
    url = f"sqlite:///{tmp_path}/hub.db"
    app = dtfx.App()

    @app.activity
    async def ok(ctx: dtfx.ActivityContext, n: int) -> int:
        return n

    @app.activity
    async def bad(ctx: dtfx.ActivityContext, _: Any) -> None:
        raise RuntimeError("bad")

    @app.activity
    async def slow(ctx: dtfx.ActivityContext, _: Any) -> None:
        await asyncio.sleep(600)

    @app.orchestrator
    def fan(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_activity(ok, input=0)
        first = yield dtfx.when_any([ctx.call_activity(bad), ctx.call_activity(slow), ctx.call_activity(slow)])
        return first.get_result()

    def app_of(*functions: Any) -> dtfx.App:
        part = dtfx.App()
        for function in functions:
            (part.orchestrator if function is fan else part.activity)(function)
        return part

    def options(**changes: Any) -> dtfx.WorkerOptions:
        return dtfx.WorkerOptions(registered_only=True, shutdown_grace_period=timedelta(seconds=0.1), **changes)

    rejects = dtfx.VersioningOptions(
        version="2.0",
        match_strategy=dtfx.VersionMatchStrategy.STRICT,
        failure_strategy=dtfx.VersionFailureStrategy.REJECT,
    )
    paused = PausedAfterItsFirstCommit(url)
    async with dtfx.AsyncClient(url) as client, dtfx.Worker(paused, app=app_of(fan, ok), options=options()):
        instance_id = await client.schedule_new_orchestration(fan)
        await until_history(  # the paused worker ran the first two episodes: 10 events, which it keeps
            client, instance_id, lambda events: sum(isinstance(event, TaskScheduled) for event in events) == 4
        )
        async with dtfx.Worker(url, app=app, options=options()):  # runs the failure
            failed = await client.wait_for_orchestration_completion(instance_id, timeout=10)
        assert failed is not None and failed.runtime_status == dtfx.OrchestrationStatus.FAILED
        async with dtfx.Worker(url, app=app_of(fan), versioning=rejects, options=options()):
            await client.rewind_orchestration(instance_id, reason="again")  # carried out, what follows rejected
            await until_history(client, instance_id, lambda events: isinstance(events[-1], ExecutionRewound))
        paused.resume()
        await until_history(client, instance_id, lambda events: not isinstance(events[-1], ExecutionRewound))
        async with dtfx.Worker(url, app=app_of(bad, slow), options=options()):  # the activities asked for again
            again = await client.wait_for_orchestration_completion(instance_id, timeout=10)
        history = await client.get_orchestration_history(instance_id)
    assert again is not None and again.runtime_status == dtfx.OrchestrationStatus.FAILED  # bad failed again
    rewound = next(index for index, event in enumerate(history) if isinstance(event, ExecutionRewound))
    assert sum(isinstance(event, TaskScheduled) for event in history[rewound:]) == 3


async def until_history(client: dtfx.AsyncClient, instance_id: str, done: Callable[[list[HistoryEvent]], bool]) -> None:
    for _ in range(1000):
        if done(await client.get_orchestration_history(instance_id)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the history did not come to that")
