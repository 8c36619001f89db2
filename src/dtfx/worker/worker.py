"""The worker: registries plus one dispatcher per kind of work item."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dtfx._portal import LoopThread
from dtfx.backends import open_backend
from dtfx.backends.base import Backend, WorkKind, utc_now
from dtfx.backends.signals import Waiter
from dtfx.core.serialization import DEFAULT_CONVERTER, DataConverter
from dtfx.core.workitems import ActivityResult, ActivityWorkItem, OrchestrationCheckpoint, OrchestrationWorkItem
from dtfx.worker.activities import ActivityProcessor
from dtfx.worker.commit import GroupCommitter
from dtfx.worker.dispatcher import WorkItemDispatcher
from dtfx.worker.options import ConcurrencyOptions, VersioningOptions, WorkerOptions
from dtfx.worker.orchestrations import LocalRunner, OrchestrationProcessor
from dtfx.worker.registry import Registry

logger = logging.getLogger(__name__)


class Worker:
    """Runs the orchestrators and activities registered with it against a backend.

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
        self._owns_backend = not isinstance(backend, Backend)
        self.backend: Backend = backend if isinstance(backend, Backend) else open_backend(backend)
        self.registry = Registry()
        if app is not None:
            self.registry.update(app)
        self.concurrency = concurrency or ConcurrencyOptions()
        self.versioning = versioning
        self.options = options or WorkerOptions()
        self.converter = data_converter or DEFAULT_CONVERTER
        self._dispatchers: list[WorkItemDispatcher[Any]] = []
        self._waiters: list[Waiter] = []
        self._thread_pool: ThreadPoolExecutor | None = None
        self._portal: LoopThread | None = None
        self._runner: LocalRunner | None = None
        self._started = False

    # -- registration ---------------------------------------------------------------------

    def add_orchestrator(self, fn: Callable[..., Any], name: str | None = None) -> str:
        """Register an orchestrator; returns the name it is registered under."""
        return self.registry.add_orchestrator(fn, name)

    def add_activity(self, fn: Callable[..., Any], name: str | None = None) -> str:
        """Register an activity; returns the name it is registered under."""
        return self.registry.add_activity(fn, name)

    def use_versioning(self, versioning: VersioningOptions) -> None:
        """Set the versioning options (before starting)."""
        self.versioning = versioning

    @property
    def is_running(self) -> bool:
        """True between start and stop."""
        return self._started

    # -- async lifecycle ----------------------------------------------------------------------

    async def start_async(self) -> None:
        """Start the dispatchers on the running event loop."""
        if self._started:
            raise RuntimeError("The worker is already running.")
        await self.backend.start()
        options = self.options
        lease = options.lease_duration
        self._thread_pool = ThreadPoolExecutor(
            max_workers=self.concurrency.maximum_thread_pool_workers, thread_name_prefix="dtfx-activity"
        )
        self._runner = LocalRunner(
            self.registry,
            self.converter,
            cache_capacity=options.cached_instances,
            versioning=self.versioning,
            reject_retry_delay=options.reject_retry_delay,
        )
        orchestrations = OrchestrationProcessor(
            self.backend,
            self._runner,
            GroupCommitter[OrchestrationCheckpoint](self.backend.complete_orchestration_work_items),
        )
        activities = ActivityProcessor(
            self.backend,
            self.registry,
            self.converter,
            GroupCommitter[ActivityResult](self.backend.complete_activity_work_items),
            thread_pool=self._thread_pool,
            lease_duration=lease,
        )

        async def lock_orchestrations(count: int) -> list[OrchestrationWorkItem]:
            return await self.backend.lock_orchestration_work_items(count, lease)

        async def lock_activities(count: int) -> list[ActivityWorkItem]:
            return await self.backend.lock_activity_work_items(count, lease)

        self._dispatchers = [
            WorkItemDispatcher[OrchestrationWorkItem](
                "OrchestrationDispatcher",
                fetch=lock_orchestrations,
                process=orchestrations.process,
                release=orchestrations.release,
                wait_for_work=self._work_waiter(WorkKind.ORCHESTRATION),
                describe=lambda item: f"orchestration {item.instance_id}",
                max_concurrent=self.concurrency.maximum_concurrent_orchestration_work_items,
                dispatcher_count=self.concurrency.orchestration_dispatcher_count,
                max_batch=options.fetch_batch_size,
                backoff_initial=options.backoff_initial.total_seconds(),
                backoff_max=options.backoff_max.total_seconds(),
            ),
            WorkItemDispatcher[ActivityWorkItem](
                "ActivityDispatcher",
                fetch=lock_activities,
                process=activities.process,
                release=activities.release,
                wait_for_work=self._work_waiter(WorkKind.ACTIVITY),
                describe=lambda item: f"activity {item.task.event.name} of {item.task.instance_id}",
                max_concurrent=self.concurrency.maximum_concurrent_activity_work_items,
                dispatcher_count=self.concurrency.activity_dispatcher_count,
                max_batch=options.fetch_batch_size,
                backoff_initial=options.backoff_initial.total_seconds(),
                backoff_max=options.backoff_max.total_seconds(),
            ),
        ]
        for dispatcher in self._dispatchers:
            dispatcher.start()
        self._started = True
        logger.info(
            "Worker started on %s with %d orchestrator(s) and %d activity(ies)",
            type(self.backend).__name__,
            len(self.registry.orchestrators),
            len(self.registry.activities),
        )

    def _work_waiter(self, kind: WorkKind) -> Callable[[], Any]:
        waiter = self.backend.subscribe(kind)
        self._waiters.append(waiter)
        backend = self.backend

        async def wait_for_work() -> None:
            timeout = backend.poll_interval
            due = await backend.next_visible_at(kind)
            if due is not None:
                timeout = max(0.0, min(timeout, (due - utc_now()).total_seconds()))
            await waiter.wait(timeout)

        return wait_for_work

    async def stop_async(self, grace_period: float | None = None) -> None:
        """Stop fetching, let in-flight work finish (up to the grace period), release the rest."""
        if not self._started:
            return
        self._started = False
        grace = self.options.shutdown_grace_period.total_seconds() if grace_period is None else grace_period
        for dispatcher in self._dispatchers:
            await dispatcher.stop(grace)
        for waiter in self._waiters:
            waiter.close()
        self._waiters.clear()
        if self._thread_pool is not None:
            self._thread_pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_backend:
            await self.backend.close()
        logger.info("Worker stopped")

    async def __aenter__(self) -> Worker:
        await self.start_async()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_async()

    # -- sync lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker on a background thread."""
        if self._portal is not None:
            raise RuntimeError("The worker is already running.")
        self._portal = LoopThread("dtfx-worker")
        try:
            self._portal.run(self.start_async())
        except BaseException:
            self._portal.close()
            self._portal = None
            raise

    def stop(self, grace_period: float | None = None) -> None:
        """Stop the worker started with :meth:`start`."""
        portal, self._portal = self._portal, None
        if portal is None:
            return
        try:
            portal.run(self.stop_async(grace_period))
        finally:
            portal.close()

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
