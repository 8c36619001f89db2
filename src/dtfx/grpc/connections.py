"""One SDK worker's ``GetWorkItems`` stream: what it asked for, and what it holds.

A worker says in its ``GetWorkItemsRequest`` how many orchestrations, activities
and entity batches it runs at once and, optionally, which ones (work-item filters). The
server only locks work for a connection with a free slot, and only work its
filters accept, so a hub shared by native workers and SDK workers with different
registrations routes each work item to a worker that can run it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

from dtfx.backends.base import WorkKind
from dtfx.grpc.convert import InvalidMessageError
from dtfx.grpc.protos import pb

NameVersions = Mapping[str, frozenset[str]]
"""Accepted names, each with its accepted versions (empty: any version)."""


@dataclass(frozen=True)
class WorkerFilters:
    """Which orchestrations, activities and entities a worker accepts (``None``: all of that kind)."""

    orchestrations: NameVersions | None = None
    activities: NameVersions | None = None
    entities: NameVersions | None = None
    """Entity names (lower case, as in entity ids); entities have no versions."""

    @classmethod
    def from_request(cls, request: pb.GetWorkItemsRequest) -> WorkerFilters:
        """The filters of a ``GetWorkItemsRequest``.

        No filters, or filters with every list empty, accept everything. Otherwise
        each list is complete: a worker whose filters name no activity gets none
        (that is what the SDKs send when they derive filters from a registry).
        """
        if not request.HasField("workItemFilters"):
            return cls()
        filters = request.workItemFilters
        if not (filters.orchestrations or filters.activities or filters.entities):
            return cls()
        return cls(
            _name_versions(filters.orchestrations),
            _name_versions(filters.activities),
            {_filter_name(entry).lower(): frozenset() for entry in filters.entities},
        )

    def names(self, kind: WorkKind) -> frozenset[str] | None:
        """The names of ``kind`` the worker accepts, or ``None`` for all."""
        table = self._table(kind)
        return None if table is None else frozenset(table)

    def accepts(self, kind: WorkKind, name: str, version: str | None) -> bool:
        """Whether the worker takes work of ``kind`` named ``name`` at ``version``.

        An unversioned filter takes every version, and unversioned work matches
        every filter: the Python SDK puts its version on activity filters but
        never on the activities it schedules.
        """
        table = self._table(kind)
        if table is None:
            return True
        versions = table.get(name)
        if versions is None:
            return False
        return not versions or not version or version in versions

    def _table(self, kind: WorkKind) -> NameVersions | None:
        if kind is WorkKind.ORCHESTRATION:
            return self.orchestrations
        return self.activities if kind is WorkKind.ACTIVITY else self.entities


def _filter_name(entry: pb.OrchestrationFilter | pb.ActivityFilter | pb.EntityFilter) -> str:
    if not entry.name:
        raise InvalidMessageError("A work-item filter needs a name.")
    return entry.name


def _name_versions(filters: Iterable[pb.OrchestrationFilter | pb.ActivityFilter]) -> dict[str, frozenset[str]]:
    table: dict[str, frozenset[str]] = {}
    for entry in filters:
        name = _filter_name(entry)
        table[name] = table.get(name, frozenset()) | frozenset(entry.versions)
    return table


class WorkerConnection:
    """An open ``GetWorkItems`` stream: its limits, filters, free slots and outgoing work items."""

    def __init__(self, connection_id: int, request: pb.GetWorkItemsRequest, default_concurrency: int) -> None:
        self.id = connection_id
        self.filters = WorkerFilters.from_request(request)
        self.capabilities = frozenset(int(capability) for capability in request.capabilities)
        """What the worker says it supports (logged; history is always sent inline, which every SDK reads)."""
        self._limits = {
            WorkKind.ORCHESTRATION: _limit(request.maxConcurrentOrchestrationWorkItems, default_concurrency),
            WorkKind.ACTIVITY: _limit(request.maxConcurrentActivityWorkItems, default_concurrency),
            # The Python SDK (1.12) does not send its entity limit: the default applies.
            WorkKind.ENTITY: _limit(request.maxConcurrentEntityWorkItems, default_concurrency),
        }
        self._in_use = dict.fromkeys(self._limits, 0)
        self._outbox: asyncio.Queue[pb.WorkItem | None] = asyncio.Queue()
        self.pending_tokens: set[str] = set()
        """Completion tokens of the work items sent on this stream and not answered yet."""
        self.closed = False

    def __repr__(self) -> str:
        return f"<WorkerConnection {self.id}>"

    def free_slots(self, kind: WorkKind) -> int:
        """How many more work items of ``kind`` this worker takes now."""
        if self.closed or kind not in self._limits or self.filters.names(kind) == frozenset():
            return 0
        return self._limits[kind] - self._in_use[kind]

    def take_slot(self, kind: WorkKind) -> None:
        """Count one more work item of ``kind`` as held by this worker."""
        self._in_use[kind] += 1

    def return_slot(self, kind: WorkKind) -> None:
        """The inverse of :meth:`take_slot`."""
        self._in_use[kind] -= 1

    def send(self, work_item: pb.WorkItem) -> None:
        """Queue ``work_item`` for the stream (never blocks: the slots bound the queue)."""
        self._outbox.put_nowait(work_item)

    def close(self) -> None:
        """End the stream; the worker will reconnect (or not)."""
        self.closed = True
        self._outbox.put_nowait(None)

    async def work_items(self, health_ping_interval: float) -> AsyncIterator[pb.WorkItem]:
        """What the stream sends: queued work items, and a health ping whenever it has been quiet."""
        while True:
            try:
                work_item = await asyncio.wait_for(self._outbox.get(), health_ping_interval)
            except TimeoutError:
                work_item = pb.WorkItem(healthPing=pb.HealthPing())
            if work_item is None:
                return
            yield work_item


def _limit(requested: int, default: int) -> int:
    if requested < 0:
        raise InvalidMessageError(f"A concurrency limit cannot be negative ({requested}).")
    return requested or default
