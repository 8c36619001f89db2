"""Eager activities: the worker that schedules an activity runs it at once.

When an episode schedules exactly one activity that this worker has registered,
and an activity slot is free, the checkpoint queues the task already leased to this
worker and keeps the orchestration's lease (Temporal calls the idea eager activity
dispatch). The activity then runs here without a trip through the queue, and its
result, the next episode and the next eager task go into one transaction. Every
step is still committed before the next one starts, and a crash is recovered like
any other: the leases expire and the queues take over.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

from dtfx.backends.base import Backend, utc_now
from dtfx.core.history import TaskCompleted, TaskFailed
from dtfx.core.workitems import ActivityResult, ActivityWorkItem, OrchestrationCheckpoint, OrchestrationWorkItem
from dtfx.worker.activities import ActivityProcessor, LocalActivityRunner
from dtfx.worker.leases import keep_lease
from dtfx.worker.registry import Registry


class EagerActivities:
    """The :class:`~dtfx.worker.orchestrations.EagerLane` of a native worker."""

    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        activities: ActivityProcessor,
        runner: LocalActivityRunner,
        *,
        reserve_slot: Callable[[], bool],
        free_slot: Callable[[], None],
        lease_duration: timedelta,
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._activities = activities
        self._runner = runner
        self._reserve_slot = reserve_slot
        self._free_slot = free_slot
        self._lease_duration = lease_duration

    def claim(self, checkpoint: OrchestrationCheckpoint) -> ActivityWorkItem | None:
        if len(checkpoint.activity_tasks) != 1 or checkpoint.status.is_terminal:
            return None
        task = checkpoint.activity_tasks[0]
        if task.event.name not in self._registry.activities or not self._reserve_slot():
            return None
        task.lock_token = uuid.uuid4().hex
        task.locked_until = utc_now() + self._lease_duration
        checkpoint.keep_lease_for = self._lease_duration
        return ActivityWorkItem(None, task.lock_token, task.locked_until, task, dequeue_count=1)

    def unclaim(self, item: ActivityWorkItem) -> None:
        self._free_slot()

    async def run(
        self, item: ActivityWorkItem, orchestration: OrchestrationWorkItem, *, queued: bool = True
    ) -> TaskCompleted | TaskFailed:
        backend, lease = self._backend, self._lease_duration

        async def renew() -> bool:
            held = await backend.renew_activity_lease(item, lease) if queued else True
            return await backend.renew_orchestration_lease(orchestration, lease) and held

        try:
            async with keep_lease(
                renew, lease, f"Eager activity {item.task.event.name} of {orchestration.instance_id}"
            ):
                return await self._runner.run(item)
        finally:
            self._free_slot()

    async def process(self, item: ActivityWorkItem) -> None:
        try:
            await self._activities.process(item)
        finally:
            self._free_slot()

    async def deliver(self, item: ActivityWorkItem, result: TaskCompleted | TaskFailed) -> None:
        await self._activities.deliver(ActivityResult(item, result))
