"""Chains of eager steps on the activity's thread.

With eager activities (:mod:`dtfx.worker.eager`) a sequence of activities runs in one
work item, each step being its activity, the episode that follows and one commit. On the
event loop, a step with a sync activity crosses between threads twice: the loop hands
the activity to a pool thread, and the thread hands the result back, each a thread
wake-up that costs as much as the rest of the step's work outside the commit.

So when the worker has no other activity work and its backend can commit on any thread
(:attr:`~dtfx.backends.base.Backend.blocking_commits`), a chain of sync activities goes
on *on the activity's thread*: activity, episode, commit, next activity, and so on,
without going back to the loop. It is the same work in the same order, each step
committed before the next one starts; only the thread differs. The chain goes back to
the loop as soon as a step is anything but the plain case: other activity work in the
worker (whose commits then share transactions again), an async activity, a commit that
gives the lease back, an episode that cannot go on.

The loop keeps watch meanwhile: an activity that outlasts the eager window is handed over
to the activity dispatcher, as on the loop, and a cancelled work item (a worker stopping)
stops the chain after the step it is in.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtfx._loops import in_context_on
from dtfx.core.history import TaskCompleted, TaskFailed
from dtfx.core.workitems import ActivityWorkItem, CommitResult, OrchestrationCheckpoint, OrchestrationWorkItem

if TYPE_CHECKING:
    from dtfx.worker.orchestrations import Abandon, EagerLane


@dataclass
class Stepped:
    """The chain ran ``eager``'s activity (its result ``ran``) after ``item``'s kept lease, and
    the episode that follows (``following``), and stopped short of committing it: the processor
    goes on from there."""

    item: OrchestrationWorkItem
    eager: ActivityWorkItem
    ran: TaskCompleted | TaskFailed
    following: tuple[OrchestrationCheckpoint, int | None] | Abandon


@dataclass
class RanAhead:
    """The chain ran its first activity ahead of the commit that queues it (its result ``ran``)
    and the episode that follows (``following``), and stopped there: the processor goes on."""

    ran: TaskCompleted | TaskFailed
    following: tuple[OrchestrationCheckpoint, int | None] | Abandon


@dataclass
class Settled:
    """The chain's last commit gave the lease back, or was lost (``result``): it held
    ``recorded``, the result of the chain's last activity (``None``: that result was merged
    into the commit of the episode it ran ahead of), and queued ``claimed``, the next eager
    activity (``None``: none, and the chain's claim still holds the slot)."""

    result: CommitResult
    recorded: tuple[ActivityWorkItem, TaskCompleted | TaskFailed] | None
    claimed: ActivityWorkItem | None


class Taken:
    """The loop took the chain's running activity over: it outlasted the window."""


TAKEN_OVER = Taken()

ChainEnd = Stepped | RanAhead | Settled | Taken | None
"""Where a chain stopped; ``None``: it was stopped (its work item cancelled)."""


class ThreadChain:
    """One chain on an activity thread: what the thread and the loop share, and the loop's watch.

    ``item`` is the work item as of the chain's last commit, ``eager`` the claim holding the
    chain's activity slot; they change only under the lock, as the chain steps on. A chain
    that starts ahead of a commit has that commit's checkpoint as ``pending`` until it has
    committed it.
    """

    def __init__(
        self,
        lane: EagerLane,
        item: OrchestrationWorkItem,
        eager: ActivityWorkItem,
        pending: OrchestrationCheckpoint | None = None,
    ) -> None:
        self.lane = lane
        self.item = item
        self.eager = eager
        self.pending = pending
        self._lock = threading.Lock()
        self._activity_since: float | None = None
        """When the activity running now started (``time.monotonic()``)."""
        self.taken_over = False
        """Whether the loop took the running activity over."""
        self.ran_out = False
        """Whether the chain stopped because its lease had run out by the clock."""
        self._stopped = False
        self._handed: TaskCompleted | TaskFailed | None = None
        """The result of the activity the loop took over, once it has finished."""

    # -- on the activity thread ----------------------------------------------------------------

    def run_activity(self, loop: asyncio.AbstractEventLoop) -> TaskCompleted | TaskFailed | None:
        """Run the claimed activity; ``None`` if the loop took it over or stopped the chain
        meanwhile, or if the lease has run out by the clock (the process was stopped past it,
        and another worker may have run the activity since: the queues have it)."""
        with self._lock:
            if self._stopped:
                return None
            if self.item.locked_until <= self.lane.now():
                self._stopped = self.ran_out = True
                return None
            self._activity_since = time.monotonic()
        ran = self.lane.run_here(self.eager, loop)
        with self._lock:
            self._activity_since = None
            if self.taken_over or self._stopped:
                self._handed = ran
                return None
        return ran

    def claim(self, checkpoint: OrchestrationCheckpoint, awaited: int | None) -> ActivityWorkItem | None:
        """Claim the checkpoint's eager activity in the slot of the chain's claim, which has run."""
        with self._lock:
            claimed = None if self._stopped else self.lane.claim(checkpoint, awaited, replacing=self.eager)
            if claimed is not None:
                self.eager = claimed
            return claimed

    def stepped(self, item: OrchestrationWorkItem) -> None:
        """A step has been committed keeping the lease (with ``pending``, if any): the chain goes on from ``item``."""
        with self._lock:
            self.item = item
            self.pending = None

    # -- on the event loop ---------------------------------------------------------------------

    async def run(self, steps: Callable[[ThreadChain, asyncio.AbstractEventLoop], ChainEnd]) -> ChainEnd:
        """Run ``steps`` on the activity thread and watch them. An activity that outlasts the
        window is taken over (:data:`TAKEN_OVER`): it goes on running as the claim's activity
        (:meth:`EagerLane.track`), for the caller to hand over."""
        loop = asyncio.get_running_loop()
        chain = in_context_on(loop, self.lane.thread_pool, steps, self, loop)
        try:
            while not (await asyncio.wait((chain,), timeout=self._until_overdue()))[0]:
                if self._take_over():
                    self.lane.track(self.eager, asyncio.ensure_future(self._handed_result(chain)))
                    return TAKEN_OVER
        except asyncio.CancelledError:
            with self._lock:
                self._stopped = True
                self.lane.drop(self.eager)
            raise
        try:
            end = chain.result()
        except BaseException:
            self.lane.drop(self.eager)
            raise
        if end is None:  # stopped: the claim's slot is free again
            self.lane.drop(self.eager)
        return end

    def _until_overdue(self) -> float:
        with self._lock:
            since = self._activity_since
        if since is None:
            return self.lane.window
        return max(0.0, since + self.lane.window - time.monotonic())

    def _take_over(self) -> bool:
        with self._lock:
            since = self._activity_since
            self.taken_over = since is not None and time.monotonic() - since >= self.lane.window
            return self.taken_over

    async def _handed_result(self, chain: asyncio.Future[ChainEnd]) -> TaskCompleted | TaskFailed:
        await chain
        assert self._handed is not None
        return self._handed
