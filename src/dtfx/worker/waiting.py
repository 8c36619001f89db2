"""How an idle dispatcher waits for work: notifications first, the store only now and then."""

from __future__ import annotations

from datetime import datetime

from dtfx.backends.base import Backend, WorkKind
from dtfx.backends.signals import Waiter

_TIMER_SLACK = 0.002
"""Seconds a wait for due work lasts past the due moment. An event loop's timer may fire a
little early (uvloop counts whole milliseconds); a fetch then finds the work not yet
visible, and the moment, passed by then, is forgotten: the work would wait for the next
poll interval."""


class WorkWaiter:
    """Waits until work of one kind may be available.

    Work this process makes (a commit, a message) wakes it through the backend's
    notifications; work this process delays (a timer, a retry) wakes it when due,
    without asking the store. Only after a quiet poll interval, or once the backend has
    seen other processes change the store (:attr:`Backend.outside_changes`), does it ask
    the store when delayed work of other processes is due (:meth:`Backend.next_visible_at`).
    """

    def __init__(self, backend: Backend, kind: WorkKind, waiter: Waiter | None = None) -> None:
        self._backend = backend
        self._kind = kind
        self._waiter = waiter or backend.subscribe(kind)
        self._store_due: datetime | None = None
        self._looked_at: datetime | None = None
        """When :meth:`prepare` was last called: when the dispatcher last looked for work."""
        self._checked_at: int | None = None
        """The backend's count of other processes' changes when the store was last asked
        (``None``: ask it, never asked or a wait has timed out since)."""

    def prepare(self) -> None:
        """Forget notifications received so far: call it before looking for work."""
        self._waiter.clear()
        self._looked_at = self._backend.now()

    async def __call__(self) -> None:
        """Wait for a notification, the next due time, or the poll interval."""
        backend = self._backend
        if self._fell_due():
            return  # due while the dispatcher was looking for work, perhaps after its fetch read
        outside_changes = backend.outside_changes
        if self._checked_at != outside_changes:
            self._store_due = await backend.next_visible_at(self._kind)
            self._checked_at = outside_changes
            if self._fell_due():  # while the store was asked
                return
        now = backend.now()
        if self._store_due is not None and self._store_due <= now:  # the store's, while it answered
            self._store_due = None
            return
        timeout = backend.poll_interval
        for due in (backend.local_due(self._kind), self._store_due):
            if due is not None:
                timeout = min(timeout, (due - now).total_seconds() + _TIMER_SLACK)
        if not await self._waiter.wait(timeout):
            self._checked_at = None

    def _fell_due(self) -> bool:
        """Whether work this process knew of fell due since the dispatcher last looked for work."""
        return self._looked_at is not None and self._backend.due_since(self._kind, self._looked_at)

    def wake(self) -> None:
        """End the current (or next) wait at once."""
        self._waiter.set()

    def close(self) -> None:
        """Stop receiving notifications."""
        self._waiter.close()
