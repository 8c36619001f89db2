"""Processing activity work items: run the function, commit its result."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from dtfx.backends.base import Backend, utc_now
from dtfx.core.activity import ActivityContext
from dtfx.core.errors import NotRegisteredError
from dtfx.core.history import FailureDetails, TaskCompleted, TaskFailed
from dtfx.core.serialization import DataConverter, input_type_of
from dtfx.core.workitems import ActivityResult, ActivityWorkItem
from dtfx.worker.commit import GroupCommitter
from dtfx.worker.registry import Registry

logger = logging.getLogger(__name__)


class ActivityProcessor:
    """Runs activities (sync ones in a thread pool) and commits their results."""

    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        converter: DataConverter,
        committer: GroupCommitter[ActivityResult],
        *,
        thread_pool: Executor | None,
        lease_duration: timedelta,
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._converter = converter
        self._committer = committer
        self._thread_pool = thread_pool
        self._lease_duration = lease_duration

    async def process(self, item: ActivityWorkItem) -> None:
        """Run the activity and commit its result; an exception becomes a ``TaskFailed``."""
        scheduled = item.task.event
        async with self._keep_lease(item):
            event = await self._execute(item)
        if not await self._committer.commit(ActivityResult(item, event)):
            logger.warning(
                "Activity %s #%d of %s: the lease was lost; its result was discarded",
                scheduled.name,
                scheduled.event_id,
                item.task.instance_id,
            )

    async def release(self, item: ActivityWorkItem) -> None:
        """Give the task back after a failure or at shutdown."""
        await self._backend.abandon_activity_work_item(item)

    async def _execute(self, item: ActivityWorkItem) -> TaskCompleted | TaskFailed:
        scheduled = item.task.event
        task_id = scheduled.event_id
        activity = self._registry.activities.get(scheduled.name)
        try:
            if activity is None:
                raise NotRegisteredError("activity", scheduled.name)
            context = ActivityContext(item.task.instance_id, task_id, scheduled.name, item.dequeue_count)
            value = self._converter.deserialize(scheduled.input, input_type_of(activity))
            result = await self._call(activity, context, value)
            output = self._converter.serialize(result)
        except Exception as error:
            logger.debug("Activity %s #%d failed", scheduled.name, task_id, exc_info=True)
            return TaskFailed(
                timestamp=utc_now(), task_scheduled_id=task_id, failure_details=FailureDetails.from_exception(error)
            )
        return TaskCompleted(timestamp=utc_now(), task_scheduled_id=task_id, result=output)

    async def _call(self, activity: Any, context: ActivityContext, value: Any) -> Any:
        if inspect.iscoroutinefunction(activity):
            return await activity(context, value)
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, activity, context, value)
        result = await loop.run_in_executor(self._thread_pool, call)
        if inspect.isawaitable(result):
            result = await result
        return result

    @asynccontextmanager
    async def _keep_lease(self, item: ActivityWorkItem) -> AsyncIterator[None]:
        """Renew the task's lease while the activity runs longer than a third of it."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self._lease_duration.total_seconds() / 3)
                if not await self._backend.renew_activity_lease(item, self._lease_duration):
                    logger.warning("Activity task %s: lease lost while running", item.id)
                    return

        renewer = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewer.cancel()
            try:
                await renewer
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.warning("Renewing the lease of activity task %s failed", item.id, exc_info=True)
