"""New instances from this process's own clients, taken at once (see :class:`~dtfx.backends.base.Intake`).

A client that shares its backend object with a worker creates an instance already leased
to that worker, whose orchestration dispatcher then processes it without looking for it:
the lease transaction and the dispatcher's wake-up are saved. The worker takes only
instances of orchestrators it has, and only while it has a free slot; the others are
created as usual, for whichever worker looks first.

The client may run on the worker's event loop or on another one (a sync
:class:`~dtfx.Client`'s, on its own thread): then the work item goes to the worker's loop
with ``call_soon_threadsafe``. A worker that stops takes no more offers, and its stop
waits, within its grace period, for those it took: one accepted after the stop began is
released at once (its lease given back), for any worker to take. One that arrives once
the worker's loop has closed is abandoned by the creating backend
(:meth:`~dtfx.backends.base.Backend.create_instance`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from datetime import timedelta

from dtfx.core.history import ExecutionStarted
from dtfx.core.workitems import OrchestrationWorkItem
from dtfx.worker.dispatcher import WorkItemDispatcher


class NewInstanceIntake:
    """The :class:`~dtfx.backends.base.Intake` of a worker's orchestration dispatcher."""

    def __init__(
        self,
        dispatcher: WorkItemDispatcher[OrchestrationWorkItem],
        process: Callable[[OrchestrationWorkItem], Awaitable[None]],
        release: Callable[[OrchestrationWorkItem], Awaitable[None]],
        orchestrators: Collection[str],
        lease: timedelta,
    ) -> None:
        self._dispatcher = dispatcher
        self._process = process
        self._release = release
        self._orchestrators = orchestrators
        self._lease = lease
        self._loop = asyncio.get_running_loop()

    # Called by Backend.create_instance, a coroutine: on the creating client's loop, this
    # worker's or another.

    def offer(self, start: ExecutionStarted) -> timedelta | None:
        if (
            start.name not in self._orchestrators
            or not self._loop.is_running()
            or not self._dispatcher.reserve_slot()  # safe on any thread
        ):
            return None
        return self._lease

    def accept(self, item: OrchestrationWorkItem) -> bool:
        return self._on_workers_loop(self._adopt, item)

    def decline(self) -> None:
        self._on_workers_loop(self._dispatcher.free_slot)  # a closed loop has no slots to give back

    def _on_workers_loop(self, callback: Callable[..., None], *args: object) -> bool:
        """Run ``callback`` on the worker's loop: at once if this is it, else handed over;
        False if that loop has closed since the offer."""
        if asyncio.get_running_loop() is self._loop:
            callback(*args)
            return True
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    def _adopt(self, item: OrchestrationWorkItem) -> None:
        dispatcher = self._dispatcher
        dispatcher.adopt(item, self._process(item) if dispatcher.running else self._release(item))
