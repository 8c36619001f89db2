"""Keeping a work item's lease alive while something slow (an activity, a remote worker) runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dtfx.backends.base import Backend
    from dtfx.core.workitems import OrchestrationWorkItem

logger = logging.getLogger(__name__)


class Lease:
    """What :func:`keep_lease` has found out about a work item's lease."""

    lost = False
    """Whether a renewal found the lease lost (another worker may hold the work item now)."""


@asynccontextmanager
async def keep_lease(
    renew: Callable[[], Awaitable[bool]], lease_duration: timedelta, what: str
) -> AsyncIterator[Lease]:
    """Call ``renew`` every third of ``lease_duration`` while the block runs.

    ``renew`` extends the lease and returns False once it was lost; renewing then
    stops (the work item's commit will fail and another worker redoes it) and the
    :class:`Lease` the block gets says so. A renewal that fails (raises) is tried again at
    the next third, until a whole lease has passed since the last one went through.
    ``what`` names the work item in log messages. A block that ends within the first third
    costs only a timer: most work items never need a renewal.
    """
    loop = asyncio.get_running_loop()
    interval = lease_duration.total_seconds() / 3
    renewer: asyncio.Task[None] | None = None
    lease = Lease()

    async def renew_periodically() -> None:
        renewed = loop.time()
        while True:
            try:
                if not await renew():
                    lease.lost = True
                    logger.warning("%s: lease lost while running", what)
                    return
                renewed = loop.time()
            except Exception as error:  # the store away for a moment, say: the lease may hold still
                if loop.time() - renewed >= lease_duration.total_seconds():
                    lease.lost = True
                    logger.warning("%s: lease lost while running: it could not be renewed (%s)", what, error)
                    return
                logger.warning("%s: renewing the lease failed (%s); trying again", what, error)
            await asyncio.sleep(interval)

    def start_renewing() -> None:
        nonlocal renewer
        renewer = loop.create_task(renew_periodically())

    timer = loop.call_later(interval, start_renewing)
    try:
        yield lease
    finally:
        timer.cancel()
        if renewer is not None:
            renewer.cancel()
            try:
                await renewer
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.warning("Renewing the lease of %s failed", what, exc_info=True)


def keep_orchestration_lease(
    backend: Backend, item: OrchestrationWorkItem, lease_duration: timedelta, what: str
) -> AbstractAsyncContextManager[Lease]:
    """:func:`keep_lease` for an orchestration or entity work item."""

    async def renew() -> bool:
        return await backend.renew_orchestration_lease(item, lease_duration)

    return keep_lease(renew, lease_duration, what)
