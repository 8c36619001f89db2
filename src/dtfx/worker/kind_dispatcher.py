"""The dispatcher of one kind of work item, as the native worker and the gRPC sidecar build it.

Both run one :class:`~dtfx.worker.dispatcher.WorkItemDispatcher` per :class:`WorkKind`,
woken by a :class:`~dtfx.worker.waiting.WorkWaiter` on the backend; they differ only in
how they lock work (the sidecar locks for connected SDK workers), how they process it,
and how much of it they hold at once. :func:`dispatcher_for_kind` is the one place that
puts these parts together, so that both name, log and tune their dispatchers alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Protocol, TypeVar

from dtfx.backends.base import WorkKind
from dtfx.core.workitems import ActivityWorkItem, OrchestrationWorkItem
from dtfx.worker.dispatcher import WorkItemDispatcher
from dtfx.worker.waiting import WorkWaiter

WorkItem = TypeVar("WorkItem", bound=ActivityWorkItem | OrchestrationWorkItem)


class DispatcherTuning(Protocol):
    """The dispatcher settings that :class:`~dtfx.WorkerOptions` and
    :class:`~dtfx.grpc.SidecarOptions` both carry."""

    @property
    def fetch_batch_size(self) -> int:
        """Most work items locked in one backend call."""

    @property
    def backoff_initial(self) -> timedelta:
        """First wait after a failed fetch or a failed work item."""

    @property
    def backoff_max(self) -> timedelta:
        """Longest such wait."""


def dispatcher_for_kind(
    kind: WorkKind,
    waiter: WorkWaiter,
    *,
    fetch: Callable[[int], Awaitable[list[WorkItem]]],
    process: Callable[[WorkItem], Awaitable[None]],
    release: Callable[[WorkItem, timedelta | None], Awaitable[None]],
    max_concurrent: int,
    dispatcher_count: int = 1,
    tuning: DispatcherTuning,
    name_prefix: str = "",
) -> WorkItemDispatcher[WorkItem]:
    """A dispatcher for ``kind``'s work items that idles on ``waiter`` (the caller closes it).

    Args:
        kind: The kind of work; it names the dispatcher (``{name_prefix}OrchestrationDispatcher``).
        waiter: Wakes the dispatcher when work of ``kind`` may be available.
        fetch: Locks up to so many work items.
        process: Runs one work item to its end (commit or abandon).
        release: Gives back a work item that will not be processed (shutdown, failure), to be
            offered again after so long (``None``: at once).
        max_concurrent: Work items in flight at once.
        dispatcher_count: Fetch loops.
        tuning: Batch size and back-off.
        name_prefix: Tells this dispatcher's log lines from another run-time's in the same process.
    """
    return WorkItemDispatcher(
        f"{name_prefix}{kind.value.capitalize()}Dispatcher",
        fetch=fetch,
        process=process,
        release=release,
        wait_for_work=waiter,
        before_fetch=waiter.prepare,
        describe=lambda item: describe_work_item(kind, item),
        max_concurrent=max_concurrent,
        dispatcher_count=dispatcher_count,
        max_batch=tuning.fetch_batch_size,
        backoff_initial=tuning.backoff_initial.total_seconds(),
        backoff_max=tuning.backoff_max.total_seconds(),
    )


def describe_work_item(kind: WorkKind, item: ActivityWorkItem | OrchestrationWorkItem) -> str:
    """The work item as log lines name it: ``activity hello of order-1``, ``entity @counter@c1``."""
    if isinstance(item, ActivityWorkItem):
        return f"activity {item.task.event.name} of {item.task.instance_id}"
    return f"{kind.value} {item.instance_id}"
