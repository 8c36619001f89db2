"""Processing activity work items: run the activity, commit its result.

:class:`ActivityProcessor` is the same for every executor; what runs the activity
is an :class:`ActivityRunner`: :class:`LocalActivityRunner` here (registered Python
functions in this process), or the gRPC sidecar's runner that sends the task to an
SDK worker.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from dtfx._loops import in_context_on
from dtfx._tracing import activity_span
from dtfx.backends.base import Backend
from dtfx.core.activity import ActivityContext
from dtfx.core.apply import unstorable_failure
from dtfx.core.errors import (
    BackendUnavailableError,
    NonRetriableError,
    NotRegisteredError,
    SerializationError,
    UnstorableValueError,
)
from dtfx.core.history import FailureDetails, TaskCompleted, TaskFailed
from dtfx.core.serialization import DataConverter, input_type_of
from dtfx.core.workitems import ActivityResult, ActivityWorkItem
from dtfx.worker.commit import GroupCommitter
from dtfx.worker.leases import Lease, keep_lease
from dtfx.worker.orchestrations import Abandon
from dtfx.worker.registry import Registry
from dtfx.worker.user_code import awaited, called, escaped

logger = logging.getLogger(__name__)


class ActivityRunner(Protocol):
    """Runs the activity of one work item."""

    async def run(self, item: ActivityWorkItem, lease: Lease | None = None) -> TaskCompleted | TaskFailed | Abandon:
        """The activity's result event, or :class:`Abandon` to give the task back unrun (an
        activity that waits for a thread does not start once its ``lease`` is lost)."""


class ActivityProcessor:
    """Takes an activity work item from lock to commit, renewing its lease while it runs."""

    def __init__(
        self,
        backend: Backend,
        runner: ActivityRunner,
        committer: GroupCommitter[ActivityResult, bool],
        *,
        lease_duration: timedelta,
    ) -> None:
        self._backend = backend
        self._runner = runner
        self._committer = committer
        self._lease_duration = lease_duration
        self._in_doubt: dict[str, ActivityResult] = {}
        """By lock token, the results whose commit failed with its outcome unknown (the store
        became unreachable, say), for the work item's release to commit (:meth:`release`)."""

    async def process(
        self, item: ActivityWorkItem, running: Awaitable[TaskCompleted | TaskFailed | Abandon] | None = None
    ) -> None:
        """Run the activity (or wait for it, when it is already ``running``) and commit its result."""

        async def renew() -> bool:
            return await self._backend.renew_activity_lease(item, self._lease_duration)

        scheduled = item.task.event
        what = f"Activity {scheduled.name} #{scheduled.event_id} of {item.task.instance_id}"
        async with keep_lease(renew, self._lease_duration, what) as lease:
            outcome = await (running if running is not None else self._runner.run(item, lease))
        if isinstance(outcome, Abandon):
            await self._backend.abandon_activity_work_item(item, retry_at=outcome.retry_at(self._backend.now()))
            return
        result = ActivityResult(item, outcome)
        try:
            await self.deliver(result)
        except (BackendUnavailableError, asyncio.CancelledError):  # it may or may not have gone through
            self._in_doubt[item.lock_token] = result
            raise

    async def deliver(self, result: ActivityResult) -> None:
        """Commit an activity's result: the task goes, the result joins its orchestration's inbox.
        A result the store refuses (too large for it, say) fails the task instead: it would be
        refused every time the activity ran."""
        try:
            committed = await self._committer.commit(result)
        except UnstorableValueError as error:
            result = ActivityResult(result.work_item, _refused(result, error, self._backend.now()))
            committed = await self._committer.commit(result)
        if not committed:
            scheduled = result.work_item.task.event
            logger.warning(
                "Activity %s #%d of %s: the lease was lost; its result was discarded",
                scheduled.name,
                scheduled.event_id,
                result.work_item.task.instance_id,
            )

    async def release(self, item: ActivityWorkItem, retry_after: timedelta | None = None) -> None:
        """Give the task back after a failure or at shutdown (to be offered again after
        ``retry_after``; ``None``: at once).

        If the activity ran and the commit of its result failed with its outcome unknown, the
        result is committed again instead, and the activity does not run again: had the
        first commit gone through, the task's lease is gone and this one changes nothing.
        Safe to try again.
        """
        result = self._in_doubt.get(item.lock_token)
        if result is None:
            retry_at = Abandon(retry_after).retry_at(self._backend.now())
            await self._backend.abandon_activity_work_item(item, retry_at=retry_at)
            return
        await self._committer.commit(result)
        del self._in_doubt[item.lock_token]


class LocalActivityRunner:
    """Runs registered Python activities (sync ones in a thread pool); an exception becomes a ``TaskFailed``."""

    def __init__(
        self,
        registry: Registry,
        converter: DataConverter,
        *,
        thread_pool: Executor | None,
        clock: Callable[[], datetime],
    ) -> None:
        self._registry = registry
        self._converter = converter
        self.thread_pool = thread_pool
        self._clock = clock
        self._kinds: dict[str, tuple[Any, bool]] = {}
        """Activity name -> (function, whether it is a coroutine function): looked up once."""
        self.running_tasks: set[asyncio.Task[Any] | None] = set()
        """The tasks running activities now (whose code, on the loop, must not await the worker's stop)."""

    async def run(self, item: ActivityWorkItem, lease: Lease | None = None) -> TaskCompleted | TaskFailed | Abandon:
        """Run the activity; :class:`Abandon` if its lease was lost, or has run out by the clock,
        before its code began (an eager activity's, which ``lease`` does not renew, is its
        orchestration's: see :mod:`dtfx.worker.eager`)."""
        try:
            return await self._run(item, _Held(item, lease, self._clock))
        except _LeaseLostError:
            scheduled = item.task.event
            logger.info(
                "Activity %s #%d of %s: not started, its lease was lost (or ran out) before it could begin",
                scheduled.name,
                scheduled.event_id,
                item.task.instance_id,
            )
            return Abandon()  # its lease is another worker's: the task is left to it

    async def _run(self, item: ActivityWorkItem, held: _Held) -> TaskCompleted | TaskFailed:
        try:
            # The span covers what can fail the task: finding the activity, its input and output too.
            with activity_span(item.task.event, item.task.instance_id):
                activity, context, value = self._prepare(item)
                result = await self._call(activity, context, value, held)
                return self._completed(item, result)
        except _LeaseLostError:
            raise
        except Exception as error:
            return _failed(item, escaped(error), self._clock())

    def runs_here(self, name: str) -> bool:
        """Whether :meth:`run_here` can run the activity ``name``: a registered function that is
        not a coroutine function."""
        activity = self._registry.activities.get(name)
        return activity is not None and not self._is_async(name, activity)

    def run_here(self, item: ActivityWorkItem, loop: asyncio.AbstractEventLoop) -> TaskCompleted | TaskFailed:
        """Run a sync activity (see :meth:`runs_here`) on the calling thread, a worker thread:
        what :meth:`run` does on ``loop`` (an awaitable it returns is awaited there)."""
        try:
            with activity_span(item.task.event, item.task.instance_id):  # as in _run
                activity, context, value = self._prepare(item)
                result = called(activity, context, value)
                if inspect.isawaitable(result):
                    result = asyncio.run_coroutine_threadsafe(awaited(result), loop).result()
                return self._completed(item, result)
        except Exception as error:
            return _failed(item, escaped(error), self._clock())

    def _prepare(self, item: ActivityWorkItem) -> tuple[Any, ActivityContext, Any]:
        """The activity, its context and its input."""
        scheduled = item.task.event
        activity = self._registry.activities.get(scheduled.name)
        if activity is None:
            raise NotRegisteredError("activity", scheduled.name)
        context = ActivityContext(item.task.instance_id, scheduled.event_id, scheduled.name, item.dequeue_count)
        try:
            value = self._converter.deserialize(scheduled.input, input_type_of(activity))
        except SerializationError as error:  # the same for every attempt: a retry policy would only wait
            raise NonRetriableError(f"The input of activity '{scheduled.name}' cannot be read: {error}") from error
        return activity, context, value

    def _completed(self, item: ActivityWorkItem, result: Any) -> TaskCompleted:
        output = called(self._converter.serialize, result)  # its hooks are user code
        return TaskCompleted(timestamp=self._clock(), task_scheduled_id=item.task.event.event_id, result=output)

    def _is_async(self, name: str, activity: Any) -> bool:
        known = self._kinds.get(name)
        if known is None or known[0] is not activity:
            known = self._kinds[name] = (activity, inspect.iscoroutinefunction(activity))
        return known[1]

    async def _call(self, activity: Any, context: ActivityContext, value: Any, held: _Held) -> Any:
        if self._is_async(context.name, activity):
            held.check()
            return await self._awaited_here(activity(context, value))
        loop = asyncio.get_running_loop()
        result = await in_context_on(loop, self.thread_pool, _unless_lost, held, activity, context, value)
        return await self._awaited_here(result) if inspect.isawaitable(result) else result

    async def _awaited_here(self, awaitable: Awaitable[Any]) -> Any:
        """Await the activity's code on the loop, its task in :attr:`running_tasks` meanwhile."""
        task = asyncio.current_task()
        self.running_tasks.add(task)
        try:
            return await awaited(awaitable)
        finally:
            self.running_tasks.discard(task)


class _LeaseLostError(Exception):
    """The activity's lease was lost before its code began."""


@dataclass(frozen=True)
class _Held:
    """What tells whether an activity's lease still holds as its code is about to begin."""

    item: ActivityWorkItem
    lease: Lease | None
    clock: Callable[[], datetime]
    """The store's clock, to see the lease run out by."""

    def check(self) -> None:
        """Raise :class:`_LeaseLostError` if a renewal found the lease lost, or if it has run
        out by the clock: the process may have been stopped (SIGSTOP, a paused VM) while the
        activity waited, and another worker may have run it and committed its result meanwhile."""
        if (self.lease is not None and self.lease.lost) or self.item.locked_until <= self.clock():
            raise _LeaseLostError


def _unless_lost(held: _Held, activity: Any, context: ActivityContext, value: Any) -> Any:
    """Run the activity on this thread, unless its lease was lost while it waited for one."""
    held.check()
    return called(activity, context, value)


def _refused(result: ActivityResult, error: UnstorableValueError, now: datetime) -> TaskFailed:
    """The failure of the task whose result ``result`` the store refused with ``error``."""
    scheduled = result.work_item.task.event
    instance_id = result.work_item.task.instance_id
    logger.warning(
        "Activity %s #%d of %s: the store refused its result (%s); failing its task",
        scheduled.name,
        scheduled.event_id,
        instance_id,
        error,
    )
    details = unstorable_failure(f"The activity's result cannot be stored: {error}")
    return TaskFailed(timestamp=now, task_scheduled_id=scheduled.event_id, failure_details=details)


def _failed(item: ActivityWorkItem, error: BaseException, now: datetime) -> TaskFailed:
    scheduled = item.task.event
    instance_id = item.task.instance_id
    logger.debug("Activity %s #%d of %s failed", scheduled.name, scheduled.event_id, instance_id, exc_info=True)
    return TaskFailed(
        timestamp=now,
        task_scheduled_id=scheduled.event_id,
        failure_details=FailureDetails.from_exception(error),
    )
