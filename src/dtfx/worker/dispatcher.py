"""The generic work-item dispatcher (DurableTask.Core's ``WorkItemDispatcher``).

A dispatcher runs ``dispatcher_count`` fetch loops. Each loop waits for a free
concurrency slot, fetches as many work items as there are free slots (one backend
call), and starts one task per item. When a fetch finds fewer items than it asked
for, the queue is drained, and the loop waits for a wake-up (``before_fetch``
resets the wake-up flag, so that nothing that arrives during the fetch is missed).
Fetch errors back off exponentially. A work item whose processing failed is released: for
the item's own reason, to be offered again after a back-off of its own (a poison instance
delays no other work); because the store could not be reached (a database restart), at
once, and while the store cannot be reached the release is tried again with back-off, so
that the item is taken up again once the store is back rather than when its lease
expires. A work item fetched after :meth:`stop` began is released at once; on stop,
in-flight items get a grace period to finish, and the ones still running are cancelled and
released. Slots reserved
for work from outside the fetch loop (:meth:`reserve_slot`) are waited for too, within the
same grace period: work adopted once the stop began is in flight like the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

from dtfx.core.errors import BackendUnavailableError
from dtfx.worker.recent import remember_latest

T = TypeVar("T")

logger = logging.getLogger(__name__)


_FETCH_AT_STOP_PATIENCE = 15.0
"""Seconds at least that a stop waits for a fetch under way: a store's transactions wait about
this long for a connection or a lock (a pool's timeout, SQLite's busy timeout) before they fail."""

_RELEASE_AT_STOP_PATIENCE = 2.0
"""Seconds a stop waits for one release of a work item (a store that does not answer, as it
waits for a connection: the stop would wait as long as the pool's timeout)."""


async def _within(work: Awaitable[None], seconds: float) -> bool:
    """Await ``work`` for up to ``seconds`` (then cancel it); whether it ended in time."""
    try:
        await asyncio.wait_for(work, seconds)
    except TimeoutError:
        return False
    return True


_MAX_FAILING = 10_000
"""Most failing work items whose back-off a dispatcher remembers (the oldest is forgotten)."""


@dataclass
class Backoff:
    """Exponential back-off: ``initial``, doubling up to ``maximum``; reset by successes."""

    initial: float
    maximum: float
    failures: int = 0
    successes_to_reset: int = 5
    _successes: int = 0

    def failed(self) -> float:
        """Record a failure; return how long to wait."""
        self.failures += 1
        self._successes = 0
        return float(min(self.maximum, self.initial * 2 ** (self.failures - 1)))

    def succeeded(self) -> None:
        """Record a success; enough of them in a row clear the back-off."""
        if self.failures:
            self._successes += 1
            if self._successes >= self.successes_to_reset:
                self.failures = self._successes = 0


class WorkItemDispatcher(Generic[T]):
    """Fetches and processes work items of one kind with bounded concurrency."""

    def __init__(
        self,
        name: str,
        *,
        fetch: Callable[[int], Awaitable[list[T]]],
        process: Callable[[T], Awaitable[None]],
        release: Callable[[T, timedelta | None], Awaitable[None]],
        wait_for_work: Callable[[], Awaitable[None]],
        describe: Callable[[T], str],
        before_fetch: Callable[[], None] | None = None,
        max_concurrent: int,
        dispatcher_count: int = 1,
        max_batch: int = 100,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        release_patience: float = 60.0,
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._process = process
        self._release = release
        self._wait_for_work = wait_for_work
        self._before_fetch = before_fetch
        self._describe = describe
        self._max_concurrent = max_concurrent
        self._dispatcher_count = dispatcher_count
        self._max_batch = max_batch
        self._fetch_backoff = Backoff(backoff_initial, backoff_max)
        self._release_backoff = (backoff_initial, backoff_max)
        self._failing: dict[str, Backoff] = {}
        """By :attr:`_describe`, the back-off of work items whose processing failed (not for the
        store being away) since they last went through: each is offered again after its own
        back-off, while the others go on (at most :data:`_MAX_FAILING` are remembered)."""
        self._release_patience = release_patience
        """Seconds a failed work item's release is tried again while the store is unavailable:
        about a lease (a minute by default), after which the item is taken up again anyway."""
        self._last_unavailable: BackendUnavailableError | None = None
        """The store's failure last logged for a work item (see :meth:`_run`)."""
        self._running = False
        self._in_flight: dict[asyncio.Task[None], T] = {}
        self._reserved = 0
        self._reserving = threading.Lock()  # slots are reserved on any thread (see reserve_slot)
        self._slot_freed = asyncio.Event()
        self._reservation_ended = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []

    @property
    def in_flight(self) -> int:
        """Work items being processed right now."""
        return len(self._in_flight)

    @property
    def running(self) -> bool:
        """Whether it fetches work: from :meth:`start` until :meth:`stop` begins."""
        return self._running

    @property
    def reserved(self) -> int:
        """Slots taken with :meth:`reserve_slot` and not given back or used yet."""
        return self._reserved

    def reserve_slot(self) -> bool:
        """Take a concurrency slot for work done outside the fetch loop; False if none is free
        or :meth:`stop` has begun. Unlike the other methods, it may be called on any thread."""
        with self._reserving:
            if not self._running or len(self._in_flight) + self._reserved >= self._max_concurrent:
                return False
            self._reserved += 1
            return True

    def free_slot(self) -> None:
        """Give back a slot taken with :meth:`reserve_slot`."""
        with self._reserving:
            self._reserved -= 1
        self._slot_freed.set()
        self._reservation_ended.set()

    def adopt(self, item: T, work: Awaitable[None]) -> None:
        """Process ``item`` with ``work`` in a slot taken with :meth:`reserve_slot`, as if
        this dispatcher had fetched it (errors, back-off and shutdown alike)."""
        with self._reserving:
            self._reserved -= 1
        task = asyncio.create_task(self._run(item, work))
        self._in_flight[task] = item
        self._reservation_ended.set()

    def start(self) -> None:
        """Start the fetch loops on the running event loop."""
        if self._loops:
            raise RuntimeError(f"Dispatcher {self.name} has already started")
        self._running = True
        self._stopping.clear()
        self._loops = [
            asyncio.create_task(self._dispatch(index), name=f"{self.name}-{index}")
            for index in range(self._dispatcher_count)
        ]
        logger.debug("%s started with %d fetch loop(s)", self.name, self._dispatcher_count)

    def begin_stop(self) -> None:
        """Stop fetching and reserving slots: the start of :meth:`stop`, which work then
        cancelled (a thread's queue dropped, say) takes for the stop's."""
        with self._reserving:  # no slot is reserved from here on (see reserve_slot)
            self._running = False
        self._stopping.set()
        self._slot_freed.set()

    async def stop(self, grace_period: float) -> None:
        """Stop fetching; give in-flight items ``grace_period`` seconds, then cancel and release
        them. A fetch under way is waited for, its items released at once (cancelled, it could
        still commit the leases it takes: SQLite's transaction runs on), for up to the grace
        period or :data:`_FETCH_AT_STOP_PATIENCE`, whichever is longer; then given up (a store
        that has stopped answering)."""
        loops, self._loops = self._loops, []
        if not loops:  # not started, or stopped
            return
        self.begin_stop()
        _ended, fetching = await asyncio.wait(loops, timeout=max(grace_period, _FETCH_AT_STOP_PATIENCE))
        for task in fetching:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_period
        await self._settle_reservations(deadline)
        # Not the task that stops it, if it is one of its work items (an activity that stops its worker).
        in_flight = [task for task in self._in_flight if task is not asyncio.current_task()]
        if in_flight:
            _done, pending = await asyncio.wait(in_flight, timeout=max(0.0, deadline - loop.time()))
            for task in pending:
                task.cancel()
            if pending:
                logger.warning("%s: cancelled %d work item(s) still running at shutdown", self.name, len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        logger.debug("%s stopped", self.name)

    @staticmethod
    async def stop_together(dispatchers: Sequence[WorkItemDispatcher[Any]], grace_period: float) -> None:
        """:meth:`stop` ``dispatchers`` within one grace period: they all stop fetching at once,
        and their in-flight work shares the period (stopped one after another, each would have
        had a period of its own, and a stop could take several)."""
        for dispatcher in dispatchers:
            dispatcher.begin_stop()
        stops = await asyncio.gather(
            *(dispatcher.stop(grace_period) for dispatcher in dispatchers), return_exceptions=True
        )
        failed = next((stop for stop in stops if isinstance(stop, BaseException)), None)
        if failed is not None:  # once every one has stopped
            raise failed

    async def _settle_reservations(self, deadline: float) -> None:
        """Wait until every reserved slot has been used (:meth:`adopt`) or given back, or ``deadline``."""
        loop = asyncio.get_running_loop()
        while self._reserved:
            self._reservation_ended.clear()
            left = deadline - loop.time()
            if left <= 0:
                logger.warning("%s: %d reserved slot(s) still unused at shutdown", self.name, self._reserved)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reservation_ended.wait(), left)

    async def _dispatch(self, index: int) -> None:
        while self._running:
            free = self._max_concurrent - len(self._in_flight) - self._reserved
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            wanted = min(free, self._max_batch)
            if self._before_fetch is not None:
                self._before_fetch()
            try:
                items = await self._fetch(wanted)
            except Exception as error:
                if not self._running:
                    break
                delay = self._fetch_backoff.failed()
                if isinstance(error, BackendUnavailableError):  # the store is away: what it said is all there is
                    logger.warning("%s: fetching work items failed (%s); retrying in %.1fs", self.name, error, delay)
                else:
                    logger.warning("%s: fetching work items failed; retrying in %.1fs", self.name, delay, exc_info=True)
                await self._sleep(delay)
                continue
            self._fetch_backoff.succeeded()
            if not self._running:
                await asyncio.gather(*(self._release_once_possible(item) for item in items))
                break
            for item in items:
                task = asyncio.create_task(self._run(item, self._process(item)))
                self._in_flight[task] = item
            if len(items) < wanted:  # drained: wait until something new arrives
                await self._idle()

    async def _run(self, item: T, work: Awaitable[None]) -> None:
        try:
            await work
            self._last_unavailable = None
            if self._failing:
                self._failing.pop(self._describe(item), None)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._running and task is not None and (not task.cancelling() or task.uncancel() == 0):
                await self._failed(item)  # no stop cancelled it: the work item's own code did, its task or a future
            else:  # a stop: cancelled, or its work was still waiting for a thread
                await self._release_once_possible(item)
                raise
        except BackendUnavailableError as error:
            # The store failed, not the item: the release waits until the store answers again,
            # and fetches back off while it does not. A group commit's failure reaches each of
            # its items as the same error, which is worth one warning, not one per item.
            level = logging.DEBUG if error is self._last_unavailable else logging.WARNING
            self._last_unavailable = error
            logger.log(level, "%s: processing %s failed (%s)", self.name, self._describe(item), error)
            await self._release_once_possible(item)
        except Exception:
            await self._failed(item)
        finally:
            self._in_flight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._slot_freed.set()

    async def _failed(self, item: T) -> None:
        """Release a work item whose processing failed for a reason of its own (logged with its
        traceback) to be offered again after its back-off."""
        described = self._describe(item)
        backoff = self._failing.get(described) or Backoff(*self._release_backoff)
        remember_latest(self._failing, described, backoff, _MAX_FAILING)
        delay = backoff.failed()
        logger.exception("%s: processing %s failed; offering it again in %.1fs", self.name, described, delay)
        await self._release_once_possible(item, timedelta(seconds=delay))

    async def _release_once_possible(self, item: T, retry_after: timedelta | None = None) -> None:
        """Release ``item`` (to be offered again after ``retry_after``; ``None``: at once), trying
        again while the store is unavailable, for as long as the dispatcher runs and
        :attr:`_release_patience` allows: once a stop has begun (work fetched after it, work
        cancelled by it), once only; a failure is logged."""
        backoff = Backoff(*self._release_backoff)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._release_patience
        while True:
            try:
                if self._running:
                    await self._release(item, retry_after)
                elif not await _within(self._release(item, retry_after), _RELEASE_AT_STOP_PATIENCE):
                    logger.warning(
                        "%s: releasing %s took longer than %.0f s at shutdown; its lease will run out instead",
                        self.name,
                        self._describe(item),
                        _RELEASE_AT_STOP_PATIENCE,
                    )
                return
            except BackendUnavailableError as error:
                if not self._running or loop.time() >= deadline:
                    logger.warning("%s: releasing %s failed (%s)", self.name, self._describe(item), error)
                    return
                delay = backoff.failed()
                logger.warning(
                    "%s: releasing %s failed (%s); retrying in %.1fs", self.name, self._describe(item), error, delay
                )
                await self._sleep(delay)
            except Exception:
                logger.warning("%s: releasing %s failed", self.name, self._describe(item), exc_info=True)
                return

    async def _idle(self) -> None:
        waiting = asyncio.ensure_future(self._wait_for_work())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (waiting, stopping):
                future.cancel()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
