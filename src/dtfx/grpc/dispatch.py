"""Locking work for connected SDK workers, and running it through the native machinery.

The server runs one orchestration, one activity and one entity
:class:`~dtfx.worker.dispatcher.WorkItemDispatcher`, built as a native worker builds
its own (:func:`~dtfx.worker.kind_dispatcher.dispatcher_for_kind`, batch size and
back-off from :class:`~dtfx.grpc.SidecarOptions`), with the worker's
:class:`~dtfx.worker.orchestrations.OrchestrationProcessor`,
:class:`~dtfx.worker.activities.ActivityProcessor` and
:class:`~dtfx.worker.entities.EntityProcessor` (plan, ``core.apply``, group commit)
around the remote runners. A fetch locks work only for connections with a free
slot, and only what their filters accept, so nothing is locked while no SDK
worker can take it (native workers on the same hub keep it flowing). There is one fetch
loop per kind: the slots a fetch counts free are taken only once its lock returns, so a
second loop could lock more than the connections have room for.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from dtfx.backends.base import Backend, WorkKind
from dtfx.core.workitems import (
    ActivityResult,
    ActivityWorkItem,
    CommitResult,
    OrchestrationCheckpoint,
    OrchestrationWorkItem,
)
from dtfx.grpc.hub import WorkerHub
from dtfx.grpc.options import SidecarOptions
from dtfx.grpc.remote import RemoteActivityRunner, RemoteEntityRunner, RemoteEpisodeRunner
from dtfx.worker.activities import ActivityProcessor
from dtfx.worker.commit import GroupCommitter
from dtfx.worker.dispatcher import WorkItemDispatcher
from dtfx.worker.entities import EntityProcessor
from dtfx.worker.kind_dispatcher import dispatcher_for_kind
from dtfx.worker.orchestrations import OrchestrationProcessor
from dtfx.worker.waiting import WorkWaiter

logger = logging.getLogger(__name__)


class _Processor(Protocol):
    async def process(self, item: Any) -> None: ...

    async def release(self, item: Any, retry_after: timedelta | None = None) -> None: ...


Item = TypeVar("Item", bound=ActivityWorkItem | OrchestrationWorkItem)
Arguments = ParamSpec("Arguments")
Locker = Callable[[int, Collection[str] | None], Awaitable[list[Item]]]
"""Locks up to so many work items, of these names only (``None``: any)."""


class RemoteDispatchers:
    """The dispatchers that feed SDK workers."""

    def __init__(self, backend: Backend, hub: WorkerHub, options: SidecarOptions) -> None:
        self._backend = backend
        self._hub = hub
        self._options = options
        self._lease = options.lease_duration
        retry_delay = options.abandon_retry_delay
        checkpoints = GroupCommitter[OrchestrationCheckpoint, CommitResult](backend.complete_orchestration_work_items)
        orchestrations = OrchestrationProcessor(
            backend,
            RemoteEpisodeRunner(
                backend,
                hub,
                lease_duration=self._lease,
                retry_delay=retry_delay,
                max_message_bytes=options.max_message_bytes,
                cached_instances=options.cached_instances,
            ),
            checkpoints,
        )
        entity_runner = RemoteEntityRunner(
            hub,
            retry_delay=retry_delay,
            max_message_bytes=options.max_message_bytes,
            legacy_requests=options.legacy_entity_requests,
        )
        entities = EntityProcessor(backend, entity_runner, checkpoints, lease_duration=self._lease)
        activities = ActivityProcessor(
            backend,
            RemoteActivityRunner(backend, hub, retry_delay=retry_delay, max_message_bytes=options.max_message_bytes),
            GroupCommitter[ActivityResult, bool](backend.complete_activity_work_items),
            lease_duration=self._lease,
        )
        self._waiters = {kind: WorkWaiter(backend, kind) for kind in WorkKind}
        hub.on_capacity(self._wake)

        async def lock_orchestrations(count: int) -> list[OrchestrationWorkItem]:
            return await self._lock_for_workers(
                WorkKind.ORCHESTRATION,
                count,
                lambda wanted, names: backend.lock_orchestration_work_items(wanted, self._lease, names=names),
            )

        async def lock_activities(count: int) -> list[ActivityWorkItem]:
            return await self._lock_for_workers(
                WorkKind.ACTIVITY,
                count,
                lambda wanted, names: backend.lock_activity_work_items(wanted, self._lease, names=names),
            )

        async def lock_entities(count: int) -> list[OrchestrationWorkItem]:
            return await self._lock_for_workers(
                WorkKind.ENTITY,
                count,
                lambda wanted, names: backend.lock_orchestration_work_items(
                    wanted, self._lease, entities=True, names=names
                ),
            )

        self._dispatchers: list[WorkItemDispatcher[Any]] = [
            self._dispatcher(WorkKind.ORCHESTRATION, lock_orchestrations, orchestrations),
            self._dispatcher(WorkKind.ACTIVITY, lock_activities, activities),
            self._dispatcher(WorkKind.ENTITY, lock_entities, entities),
        ]

    def _dispatcher(
        self,
        kind: WorkKind,
        fetch: Callable[[int], Awaitable[list[Item]]],
        processor: _Processor,
    ) -> WorkItemDispatcher[Item]:
        return dispatcher_for_kind(
            kind,
            self._waiters[kind],
            fetch=fetch,
            process=self._holding_slot(processor.process),
            release=self._holding_slot(processor.release),
            max_concurrent=self._options.max_work_items_in_flight,
            tuning=self._options,
            name_prefix="Sidecar",
        )

    def start(self) -> None:
        """Start fetching (on the running event loop)."""
        for dispatcher in self._dispatchers:
            dispatcher.start()

    def begin_stop(self) -> None:
        """Stop fetching, at once: the start of :meth:`stop`."""
        for dispatcher in self._dispatchers:
            dispatcher.begin_stop()

    async def stop(self, grace_period: float) -> None:
        """Stop fetching; give work out with workers ``grace_period`` seconds, then give it back."""
        await WorkItemDispatcher.stop_together(self._dispatchers, grace_period)
        for waiter in self._waiters.values():
            waiter.close()

    def _wake(self, kinds: Collection[WorkKind]) -> None:
        # Only the fetch loops of those kinds: a freed activity slot, say, makes no room for
        # orchestrations or entities, and their loops would lock nothing new.
        for kind in kinds:
            self._waiters[kind].wake()

    async def _lock_for_workers(self, kind: WorkKind, count: int, lock: Locker[Item]) -> list[Item]:
        """Lock up to ``count`` work items, each for a connection with a free slot whose filters accept it.

        A lock that fails once others have locked work for other connections ends the fetch with
        what they locked (the failure logged): raising would leave that work leased, and its
        slots taken, with nobody to run it or give it back."""
        items: list[Item] = []
        for connection in self._hub.with_free_slots(kind):
            wanted = min(connection.free_slots(kind), count - len(items))
            if wanted <= 0:
                break
            try:
                locked = await lock(wanted, connection.filters.names(kind))
            except Exception:
                if not items:
                    raise
                logger.warning(
                    "Sidecar: locking %s work failed; the %d item(s) locked before go out",
                    kind.value,
                    len(items),
                    exc_info=True,
                )
                break
            for item in locked:
                self._hub.assign(item.lock_token, connection, kind)
            items.extend(locked)
        return items

    def _holding_slot(
        self, handle: Callable[Concatenate[Item, Arguments], Awaitable[None]]
    ) -> Callable[Concatenate[Item, Arguments], Awaitable[None]]:
        """``handle`` (a processor's ``process`` or ``release``), then give the work item's
        connection slot back, whatever happened."""

        async def handle_then_release(item: Item, /, *args: Arguments.args, **kwargs: Arguments.kwargs) -> None:
            try:
                await handle(item, *args, **kwargs)
            finally:
                self._hub.release(item.lock_token)

        return handle_then_release
