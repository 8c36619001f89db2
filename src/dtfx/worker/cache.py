"""What a worker keeps of an instance between episodes, so that it need not read it again.

A native worker keeps live orchestrations, so a cached instance is never replayed; the
gRPC sidecar keeps the history it last sent an SDK worker. An entry is valid for a work
item only if the instance is still on the same execution and its history has exactly
the size this worker left it at: any other writer (another worker after a lost lease, a
rewind, continue-as-new) changes one of the two, and the entry is dropped in favour of
the history in the store. Within an execution the size only grows (a rewind, which
rewrites the history shorter, counts on from the old size: see
``OrchestrationCheckpoint.history_size_after``), so no entry of another worker, left
behind at an older size, matches a later history.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from dtfx.core.history import ExecutionStarted
from dtfx.core.replay import OrchestrationExecutor
from dtfx.core.workitems import OrchestrationCheckpoint, OrchestrationWorkItem


class CacheEntry(Protocol):
    """What an entry must match to be reused."""

    execution_id: str | None
    history_size: int


Entry = TypeVar("Entry", bound=CacheEntry)


@dataclass
class CachedExecution:
    """An executor and what it must match to be reused."""

    executor: OrchestrationExecutor
    started: ExecutionStarted
    execution_id: str | None
    history_size: int


class InstanceCache(Generic[Entry]):
    """A least-recently-used map of instance id to what a worker keeps of the instance."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, item: OrchestrationWorkItem) -> Entry | None:
        """The entry for the work item's instance if it is still valid; a stale one is dropped."""
        entry = self._entries.get(item.instance_id)
        if entry is None:
            return None
        if entry.execution_id != item.state.execution_id or entry.history_size != item.history_size:
            del self._entries[item.instance_id]
            return None
        self._entries.move_to_end(item.instance_id)
        return entry

    def take(self, item: OrchestrationWorkItem) -> Entry | None:
        """:meth:`lookup`, taking the entry out: its taker changes it as the episode runs, and
        keeps it again once the episode is committed. Until then, another work item of the
        instance (after the lease expired) does not find it, changed ahead of its history."""
        entry = self.lookup(item)
        if entry is not None:
            del self._entries[item.instance_id]
        return entry

    def keep(
        self,
        item: OrchestrationWorkItem,
        entry: Entry,
        checkpoint: OrchestrationCheckpoint,
        *,
        ended: bool = False,
    ) -> bool:
        """After ``item``'s ``checkpoint`` is committed: keep ``entry``, moved on to match the
        instance as the checkpoint leaves it, for its next episode; or forget the instance when
        the checkpoint replaced its history or ended it (or the caller says it ``ended``).
        Whether ``entry`` is kept."""
        if ended or checkpoint.replace_history or checkpoint.status.is_terminal:
            self.evict(item.instance_id)
            return False
        entry.history_size = checkpoint.history_size_after(item.history_size)
        entry.execution_id = checkpoint.execution_id
        self.store(item.instance_id, entry)
        return True

    def store(self, instance_id: str, entry: Entry) -> None:
        """Keep ``entry``, evicting the least recently used one beyond capacity."""
        if self._capacity <= 0:
            return
        self._entries[instance_id] = entry
        self._entries.move_to_end(instance_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def evict(self, instance_id: str) -> None:
        """Forget the instance."""
        self._entries.pop(instance_id, None)
