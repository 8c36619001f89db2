"""New instances from this process's own clients, taken at once (see :class:`~dtfx.backends.base.Intake`).

A client that shares its backend object and event loop with a worker creates an instance
already leased to that worker, whose orchestration dispatcher then processes it without
looking for it: the lease transaction and the dispatcher's wake-up are saved. The worker
takes only instances of orchestrators it has, and only while it has a free slot; the
others are created as usual, for whichever worker looks first.
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

    def offer(self, start: ExecutionStarted) -> timedelta | None:
        # Offered by Backend.create_instance, a coroutine: on the creating client's loop.
        if (
            asyncio.get_running_loop() is not self._loop
            or start.name not in self._orchestrators
            or not self._dispatcher.reserve_slot()
        ):
            return None
        return self._lease

    def accept(self, item: OrchestrationWorkItem) -> None:
        dispatcher = self._dispatcher
        dispatcher.adopt(item, self._process(item) if dispatcher.running else self._release(item))

    def decline(self) -> None:
        self._dispatcher.free_slot()
