"""Eager activities: the worker that schedules an activity runs it at once.

When an episode leaves its orchestration waiting for exactly one thing, an activity
this worker has registered, and an activity slot is free, the checkpoint queues the
task already leased to this worker and keeps the orchestration's lease (Temporal
calls the idea eager activity dispatch). The activity then runs here without a trip
through the queue, and its result, the next episode and the next eager task go into
one transaction. Every step is still committed before the next one starts, and a
crash is recovered like any other: the leases expire and the queues take over. A step
whose commit fails with its outcome unknown (the store went away) is settled when the
worker gives its work item back (:meth:`OrchestrationProcessor.release
<dtfx.worker.orchestrations.OrchestrationProcessor.release>`), without waiting for leases.

An orchestration that waits for anything else as well (a timer, an external event,
another task) is left to the queues: whichever answer arrives first must win, and a
kept lease would hold back the others. And the lease is kept only for a short
*window*: an activity still running after it goes on as ordinary work of the
activity dispatcher, and the orchestration's lease goes back, so that a message for
the instance (a termination, say) waits at most that long, and a long activity does
not hold an orchestration slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from datetime import datetime, timedelta

from dtfx.core.history import TaskCompleted, TaskFailed
from dtfx.core.tokens import new_token
from dtfx.core.workitems import ActivityResult, ActivityTask, ActivityWorkItem, OrchestrationCheckpoint
from dtfx.worker.activities import ActivityProcessor, LocalActivityRunner
from dtfx.worker.dispatcher import WorkItemDispatcher
from dtfx.worker.orchestrations import Abandon
from dtfx.worker.registry import Registry


class EagerActivities:
    """The :class:`~dtfx.worker.orchestrations.EagerLane` of a native worker.

    A claim holds a slot of the activity ``dispatcher`` until the activity has finished
    within the window, is handed over to the dispatcher, or is dropped; or, in a chain run
    on the activity's thread (:mod:`dtfx.worker.chains`), until the next step's claim takes
    the slot over.
    """

    def __init__(
        self,
        registry: Registry,
        activities: ActivityProcessor,
        runner: LocalActivityRunner,
        dispatcher: WorkItemDispatcher[ActivityWorkItem],
        *,
        lease_duration: timedelta,
        window: timedelta,
        clock: Callable[[], datetime],
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._activities = activities
        self._runner = runner
        self._dispatcher = dispatcher
        self._lease_duration = lease_duration
        # Within the window nothing needs renewing: it ends before the first renewal is due.
        self.window = min(window, lease_duration / 3).total_seconds()
        """How long, in seconds, an orchestration's lease waits for its eager activity."""
        self._claims: dict[str, Awaitable[TaskCompleted | TaskFailed | Abandon] | None] = {}
        """The claims holding a slot, by lock token, with the activity once it runs."""

    @property
    def thread_pool(self) -> Executor | None:
        """Where sync activities run (``None``: the event loop's default executor)."""
        return self._runner.thread_pool

    def eager_task(self, checkpoint: OrchestrationCheckpoint, awaited: int | None) -> ActivityTask | None:
        """The checkpoint's task this worker would run eagerly: the one task ``awaited``, an activity it has."""
        if len(checkpoint.activity_tasks) != 1 or checkpoint.status.is_terminal:
            return None
        task = checkpoint.activity_tasks[0]
        if task.event.event_id != awaited or task.event.name not in self._registry.activities:
            return None
        return task

    def claim(
        self, checkpoint: OrchestrationCheckpoint, awaited: int | None, *, replacing: ActivityWorkItem | None = None
    ) -> ActivityWorkItem | None:
        """Take the checkpoint's :meth:`eager_task` for this worker, in a free slot, or in the
        slot of the claim it is ``replacing`` (whose activity has run: a chain's next step)."""
        task = self.eager_task(checkpoint, awaited)
        if task is None:
            return None
        if replacing is not None:
            del self._claims[replacing.lock_token]
        elif not self._dispatcher.reserve_slot():
            return None
        task.lock_token = new_token()
        task.locked_until = self._clock() + self._lease_duration
        checkpoint.keep_lease_for = self._lease_duration
        self._claims[task.lock_token] = None
        return ActivityWorkItem(None, task.lock_token, task.locked_until, task, dequeue_count=1)

    def alone(self) -> bool:
        """Whether one claim's activity is all the activity work of this worker."""
        return self._dispatcher.in_flight + self._dispatcher.reserved == 1

    def now(self) -> datetime:
        return self._clock()

    def runs_here(self, name: str) -> bool:
        """Whether :meth:`run_here` can run the activity ``name`` (a sync one)."""
        return self._runner.runs_here(name)

    def run_here(self, item: ActivityWorkItem, loop: asyncio.AbstractEventLoop) -> TaskCompleted | TaskFailed:
        """Run the claim's sync activity on the calling thread (see :meth:`LocalActivityRunner.run_here`)."""
        return self._runner.run_here(item, loop)

    async def run(self, item: ActivityWorkItem) -> TaskCompleted | TaskFailed | None:
        running = asyncio.create_task(self._runner.run(item))
        self._claims[item.lock_token] = running
        try:
            await asyncio.wait((running,), timeout=self.window)
        except asyncio.CancelledError:
            self.drop(item)
            raise
        if not running.done():
            return None
        try:
            ran = running.result()
        except asyncio.CancelledError:  # it still waited for a thread as the worker stopped: it goes back
            self.drop(item)
            raise
        if isinstance(ran, Abandon):  # its lease ran out before it began: handed over, it is given back
            return None
        self.finish(item)
        return ran

    def finish(self, item: ActivityWorkItem) -> None:
        """The claim's activity has run and its result is the orchestration's: give its slot back."""
        del self._claims[item.lock_token]
        self._dispatcher.free_slot()

    def track(self, item: ActivityWorkItem, running: Awaitable[TaskCompleted | TaskFailed]) -> None:
        """The claim's activity runs as ``running`` (elsewhere than :meth:`run`), for :meth:`hand_over`."""
        self._claims[item.lock_token] = running

    def hand_over(self, item: ActivityWorkItem) -> None:
        """The claimed activity's task is committed: let it run (or go on running) as ordinary
        work, its result going through the orchestration's inbox."""
        running = self._claims.pop(item.lock_token)
        self._dispatcher.adopt(item, self._activities.process(item, running))

    def drop(self, item: ActivityWorkItem) -> None:
        if item.lock_token not in self._claims:
            return
        running = self._claims.pop(item.lock_token)
        if isinstance(running, asyncio.Task):
            running.cancel()
        self._dispatcher.free_slot()

    async def deliver(self, item: ActivityWorkItem, result: TaskCompleted | TaskFailed) -> None:
        await self._activities.deliver(ActivityResult(item, result))
