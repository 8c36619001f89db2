"""The worker: registries plus one dispatcher per kind of work item."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from dtfx import _collector as collector
from dtfx._portal import BackgroundRunnable, worker_started_on, worker_stopped_on
from dtfx.backends import open_backend
from dtfx.backends.base import Backend, WorkKind
from dtfx.core.serialization import DEFAULT_CONVERTER, DataConverter
from dtfx.core.workitems import (
    ActivityResult,
    ActivityWorkItem,
    CommitResult,
    OrchestrationCheckpoint,
    OrchestrationWorkItem,
)
from dtfx.worker.activities import ActivityProcessor, LocalActivityRunner
from dtfx.worker.commit import GroupCommitter
from dtfx.worker.dispatcher import WorkItemDispatcher
from dtfx.worker.eager import EagerActivities
from dtfx.worker.entities import EntityProcessor, LocalEntityRunner
from dtfx.worker.intake import NewInstanceIntake
from dtfx.worker.kind_dispatcher import WorkItem, dispatcher_for_kind
from dtfx.worker.options import ConcurrencyOptions, VersioningOptions, WorkerOptions
from dtfx.worker.orchestrations import LocalRunner, OrchestrationProcessor
from dtfx.worker.registry import Registry
from dtfx.worker.threads import WorkerThreads
from dtfx.worker.waiting import WorkWaiter

logger = logging.getLogger(__name__)

T_contra = TypeVar("T_contra", contravariant=True)


class _Processor(Protocol[T_contra]):
    async def process(self, item: T_contra) -> None: ...

    async def release(self, item: T_contra, retry_after: timedelta | None = None) -> None: ...


class Worker(BackgroundRunnable):
    """Runs the orchestrators, activities and entities registered with it against a backend.

    Use it as a context manager (``with`` runs it on a background thread, ``async
    with`` on the running event loop), or call :meth:`start` / :meth:`stop`.

    Args:
        backend: A backend object, or a URL (``memory://``, ``sqlite:///...``,
            ``postgresql://...``); default ``DTFX_BACKEND`` or the SQLite file
            ``./.dtfx/taskhub.db``. A backend given as a URL is closed with the worker.
        app: An :class:`~dtfx.App` whose registrations the worker takes.
        concurrency: Concurrency limits and dispatcher counts.
        versioning: Which orchestration versions this worker runs.
        options: Dispatcher tuning.
        data_converter: How payloads are (de)serialized.
    """

    _thread_name = "dtfx-worker"

    def __init__(
        self,
        backend: Backend | str | None = None,
        app: Registry | None = None,
        *,
        concurrency: ConcurrencyOptions | None = None,
        versioning: VersioningOptions | None = None,
        options: WorkerOptions | None = None,
        data_converter: DataConverter | None = None,
    ) -> None:
        super().__init__()
        self._owns_backend = not isinstance(backend, Backend)
        self._url = None if isinstance(backend, Backend) else backend
        """The URL of the backend the worker opens (and closes when it stops), if it opens one."""
        self.backend: Backend = backend if isinstance(backend, Backend) else open_backend(backend)
        self._backend_closed = False
        self.registry = Registry()
        if app is not None:
            self.registry.update(app)
        self.concurrency = concurrency or ConcurrencyOptions()
        self.versioning = versioning
        self.options = options or WorkerOptions()
        self.converter = data_converter or DEFAULT_CONVERTER
        self._dispatchers: list[WorkItemDispatcher[Any]] = []
        self._waiters: list[WorkWaiter] = []
        self._thread_pool: WorkerThreads | None = None
        self._runner: LocalRunner | None = None
        self._intake: NewInstanceIntake | None = None
        self._gc_pace = collector.Hold()
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop the worker runs on, while it runs."""
        self._started = False
        self._activity_runner: LocalActivityRunner | None = None

    # -- registration ---------------------------------------------------------------------

    def add_orchestrator(self, fn: Callable[..., Any], name: str | None = None) -> str:
        """Register an orchestrator; returns the name it is registered under."""
        return self.registry.add_orchestrator(fn, name)

    def add_activity(self, fn: Callable[..., Any], name: str | None = None) -> str:
        """Register an activity; returns the name it is registered under."""
        return self.registry.add_activity(fn, name)

    def add_entity(self, entity: Callable[..., Any] | type[Any], name: str | None = None) -> str:
        """Register an entity function or :class:`~dtfx.DurableEntity` class; returns its name."""
        return self.registry.add_entity(entity, name)

    def use_versioning(self, versioning: VersioningOptions) -> None:
        """Set the versioning options (before starting)."""
        self.versioning = versioning

    @property
    def is_running(self) -> bool:
        """True between start and stop."""
        return self._started

    @property
    def threads_busy(self) -> int:
        """Sync activities, eager chains and entity batches still running on the worker's threads:
        after a stop, those that outlasted the grace period (their work items went back to the
        store), which the process waits for as it exits (Python joins a thread pool's threads)."""
        return self._thread_pool.unfinished if self._thread_pool is not None else 0

    # -- async lifecycle ----------------------------------------------------------------------

    async def start_async(self) -> None:
        """Start the dispatchers on the running event loop (once the last stop has ended)."""
        await self._after_the_last_stop()
        if self._started:
            raise RuntimeError("The worker is already running.")
        if self._backend_closed:  # a restart of a worker that opened its backend from a URL: a new one
            self.backend, self._backend_closed = open_backend(self._url), False
        await self.backend.start()
        options = self.options
        lease = options.lease_duration
        self._thread_pool = WorkerThreads(self.concurrency.maximum_thread_pool_workers)
        self._runner = LocalRunner(
            self.registry,
            self.converter,
            cache_capacity=options.cached_instances,
            versioning=self.versioning,
            reject_retry_delay=options.reject_retry_delay,
        )
        checkpoints = GroupCommitter[OrchestrationCheckpoint, CommitResult](
            self.backend.complete_orchestration_work_items
        )
        orchestrations = OrchestrationProcessor(self.backend, self._runner, checkpoints)
        entities = EntityProcessor(
            self.backend,
            LocalEntityRunner(self.registry, self.converter, thread_pool=self._thread_pool),
            checkpoints,
            lease_duration=lease,
        )
        activity_runner = self._activity_runner = LocalActivityRunner(
            self.registry, self.converter, thread_pool=self._thread_pool, clock=self.backend.now
        )
        activities = ActivityProcessor(
            self.backend,
            activity_runner,
            GroupCommitter[ActivityResult, bool](self.backend.complete_activity_work_items),
            lease_duration=lease,
        )

        def names(registered: dict[str, Any]) -> Collection[str] | None:
            return registered.keys() if options.registered_only else None

        async def lock_orchestrations(count: int) -> list[OrchestrationWorkItem]:
            return await self.backend.lock_orchestration_work_items(
                count, lease, names=names(self.registry.orchestrators)
            )

        async def lock_entities(count: int) -> list[OrchestrationWorkItem]:
            return await self.backend.lock_orchestration_work_items(
                count, lease, entities=True, names=names(self.registry.entities)
            )

        async def lock_activities(count: int) -> list[ActivityWorkItem]:
            return await self.backend.lock_activity_work_items(count, lease, names=names(self.registry.activities))

        concurrency = self.concurrency
        activity_dispatcher = self._dispatcher(
            WorkKind.ACTIVITY,
            lock_activities,
            activities,
            concurrency.maximum_concurrent_activity_work_items,
            concurrency.activity_dispatcher_count,
        )
        # An orchestration that finishes during the grace period may still hand an eager activity
        # over to the activity dispatcher, whose stop waits for that (its reserved slot).
        self._dispatchers = [
            self._dispatcher(
                WorkKind.ORCHESTRATION,
                lock_orchestrations,
                orchestrations,
                concurrency.maximum_concurrent_orchestration_work_items,
                concurrency.orchestration_dispatcher_count,
            ),
            activity_dispatcher,
            self._dispatcher(
                WorkKind.ENTITY, lock_entities, entities, concurrency.maximum_concurrent_entity_work_items, 1
            ),
        ]
        if options.eager_activities:
            orchestrations.eager = EagerActivities(
                self.registry,
                activities,
                activity_runner,
                activity_dispatcher,
                lease_duration=lease,
                window=options.eager_activity_window,
                clock=self.backend.now,
            )
        for dispatcher in self._dispatchers:
            dispatcher.start()
        intake = NewInstanceIntake(
            self._dispatchers[0], orchestrations.process, orchestrations.release, self.registry.orchestrators, lease
        )
        if self.backend.attach_intake(intake):
            self._intake = intake
        if options.tune_gc:
            self._gc_pace.take()
        self._loop = asyncio.get_running_loop()
        worker_started_on(self._loop)
        self._started = True
        logger.info(
            "Worker started on %s with %d orchestrator(s), %d activity(ies) and %d entity(ies)",
            type(self.backend).__name__,
            len(self.registry.orchestrators),
            len(self.registry.activities),
            len(self.registry.entities),
        )

    def _dispatcher(
        self,
        kind: WorkKind,
        fetch: Callable[[int], Awaitable[list[WorkItem]]],
        processor: _Processor[WorkItem],
        max_concurrent: int,
        dispatcher_count: int,
    ) -> WorkItemDispatcher[WorkItem]:
        waiter = WorkWaiter(self.backend, kind)
        self._waiters.append(waiter)
        return dispatcher_for_kind(
            kind,
            waiter,
            fetch=fetch,
            process=processor.process,
            release=processor.release,
            max_concurrent=max_concurrent,
            dispatcher_count=dispatcher_count,
            tuning=self.options,
        )

    def stop(self, grace_period: float | None = None) -> None:
        """Stop the worker: what :meth:`start` started, or one started with :meth:`start_async`
        on an event loop of another thread, which this thread waits for."""
        loop = self._loop
        self._refuse_a_stop_from_its_threads()
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not None and here is loop:  # (an async activity's, say) it would wait on the loop it blocks
            raise RuntimeError("The worker runs on this thread's event loop: stop it with `await worker.stop_async()`.")
        if self._portal is not None or loop is None:
            super().stop(grace_period)
            return
        if not loop.is_running():
            raise RuntimeError("The event loop the worker runs on is not running: nothing there could stop it.")
        asyncio.run_coroutine_threadsafe(self.stop_async(grace_period), loop).result()

    def _refuse_a_stop_from_its_threads(self) -> None:
        if self._stops_ahead() and self._thread_pool is not None and self._thread_pool.runs_this_thread():
            raise RuntimeError(
                "An activity cannot wait for the stop of the worker that runs it: the stop would wait for the"
                " activity. Stop it from another thread (threading.Thread(target=worker.stop).start())."
            )

    async def stop_async(self, grace_period: float | None = None) -> None:
        """Stop fetching, let in-flight work finish (up to the grace period), release the rest.

        A stop once begun runs to its end: a caller cancelled meanwhile (by a timeout around
        it, say) leaves it running, and a second caller waits for it. One of the worker's own
        async activities cannot await it: it would wait for itself (start it as a task of its
        own instead, or call :meth:`stop` from a thread). A worker that runs on another event
        loop (started with :meth:`start`, on its own thread) is stopped there.
        """
        if self._loop is not None and self._loop is not asyncio.get_running_loop():  # stopped there (see stop)
            self._refuse_a_stop_from_its_threads()  # (asyncio.run(worker.stop_async()) in a sync activity)
            await asyncio.to_thread(self.stop, grace_period)
            return
        running = self._activity_runner
        if self._stops_ahead() and running is not None and asyncio.current_task() in running.running_tasks:
            raise RuntimeError(
                "An activity cannot await the stop of the worker that runs it: the stop would wait for the"
                " activity. Start it as a task of its own (asyncio.create_task(worker.stop_async())), not awaited."
            )
        await super().stop_async(grace_period)

    def _stops_ahead(self) -> bool:
        """Whether a stop is still to come or under way: one that an activity would wait for."""
        return self._loop is not None or self._stopping is not None

    def _begin_stop(self, grace_period: float | None) -> Coroutine[Any, Any, None]:
        self._started = False
        self._gc_pace.give_back()
        if self._loop is not None:
            worker_stopped_on(self._loop)
        if self._intake is not None:
            self.backend.detach_intake(self._intake)
            self._intake = None
        grace = self.options.shutdown_grace_period.total_seconds() if grace_period is None else grace_period
        for dispatcher in self._dispatchers:
            dispatcher.begin_stop()
        if self._thread_pool is not None:
            # Work items that wait for a thread would be new work: they go back to the store at
            # once, for other workers, rather than start during the grace period.
            waiting = self._thread_pool.drop_waiting()
            if waiting:
                logger.info("Worker stopping: %d work item(s) still waiting for a thread go back", waiting)
        return self._end_stop(grace)

    async def _end_stop(self, grace: float) -> None:
        try:
            await WorkItemDispatcher.stop_together(self._dispatchers, grace)
            for waiter in self._waiters:
                waiter.close()
            self._waiters.clear()
            if self._thread_pool is not None:
                self._thread_pool.shutdown(wait=False, cancel_futures=True)
            if self._owns_backend:
                await self.backend.close()
                self._backend_closed = True
        finally:
            self._loop = None  # (kept so far: a stop from another loop meanwhile waits for this one there)
        logger.info("Worker stopped")
