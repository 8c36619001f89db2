"""Run coroutines from sync code on a private event loop in a background thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Iterator
from typing import Any, ClassVar, Self, TypeVar

from dtfx._loops import new_event_loop

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread; sync facades submit their coroutines to it."""

    def __init__(self, name: str) -> None:
        self._loop = new_event_loop()
        self._closing = False
        self._ended_by: BaseException | None = None
        """What ended the loop, if it was not :meth:`close` (a ``KeyboardInterrupt`` raised in user code, say)."""
        self._thread = threading.Thread(target=self._run_forever, name=name, daemon=True)
        self._thread.start()

    def _run_forever(self) -> None:
        try:
            self._loop.run_forever()
        except BaseException as error:
            self._ended_by = error
            raise

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has stopped the loop."""
        return not self._thread.is_alive()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result."""
        try:
            return self.submit(coroutine).result()
        except concurrent.futures.CancelledError:
            if self._closing:
                raise RuntimeError("This object was closed while the call waited.") from None
            raise

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coroutine`` on the loop; async callers await ``asyncio.wrap_future(...)`` of the result."""
        if self.closed:
            coroutine.close()
            if self._ended_by is not None:
                ended = self._ended_by
                raise RuntimeError(
                    f"This object's event loop has ended: {type(ended).__name__} was raised on it."
                ) from ended
            raise RuntimeError("This object has been closed.")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def close(self) -> None:
        """Cancel what still runs on the loop and let it end (for up to
        :data:`_CLOSE_PATIENCE` seconds), as :func:`asyncio.run` does, then stop the loop and
        its thread. (A start interrupted by Ctrl-C leaves its task closing a pool, say.)"""
        if self.closed:
            return
        self._closing = True
        ending = asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self._loop)
        with contextlib.suppress(Exception):
            ending.result(timeout=_CLOSE_PATIENCE)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


_CLOSE_PATIENCE = 5.0

_workers_on: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
"""How many workers run on each event loop: sync waits there are refused (:func:`refuse_to_wait_on_a_workers_loop`)."""


def refuse_to_wait_on_a_workers_loop(what: str) -> None:
    """Raise ``RuntimeError`` if the calling thread runs the event loop of a worker: a sync
    ``what`` there would block the worker, which then could not run what is waited for."""
    calling = asyncio._get_running_loop()
    if calling is not None and _workers_on.get(calling):
        raise RuntimeError(
            f"A sync {what} on the event loop a worker runs on would block the worker until it timed out;"
            " use dtfx.AsyncClient there (or run the call in a thread: await asyncio.to_thread(...))."
        )


def worker_started_on(loop: asyncio.AbstractEventLoop) -> None:
    """A worker runs on ``loop`` from now on."""
    _workers_on[loop] = _workers_on.get(loop, 0) + 1


def worker_stopped_on(loop: asyncio.AbstractEventLoop) -> None:
    """A worker that ran on ``loop`` has stopped."""
    left = _workers_on.pop(loop, 0) - 1
    if left > 0:
        _workers_on[loop] = left


async def _cancel_the_rest() -> None:
    """Cancel the loop's other tasks and wait for them to end."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class BackgroundRunnable(ABC):
    """The lifecycle of something that runs on an event loop (a worker, the sidecar server).

    Subclasses write :meth:`start_async` and :meth:`stop_async`; ``async with`` runs
    them on the caller's loop, ``with`` or :meth:`start` on a loop thread of their own.
    """

    _thread_name: ClassVar[str] = "dtfx"

    def __init__(self) -> None:
        self._portal: LoopThread | None = None
        self._lifecycle = threading.RLock()
        """Held by :meth:`start` and :meth:`stop`: a second caller waits for the first."""
        self._lifecycle_busy = False
        """Whether a :meth:`start` or :meth:`stop` holds ``_lifecycle``."""
        self._stopping: asyncio.Task[None] | None = None
        """The stop under way, if one is."""

    @property
    @abstractmethod
    def is_running(self) -> bool:
        """True between start and stop."""

    @abstractmethod
    async def start_async(self) -> None:
        """Start on the running event loop."""

    @abstractmethod
    def _begin_stop(self, grace_period: float | None) -> Coroutine[Any, Any, None]:
        """Stop taking new work, at once, and return what ends the stop; :meth:`stop_async`
        calls it once per start."""

    async def stop_async(self, grace_period: float | None = None) -> None:
        """Stop; in-flight work gets ``grace_period`` seconds (``None``: the configured default).

        A stop once begun runs to its end: a caller cancelled meanwhile (by a timeout around
        it, say) leaves it running, and a second caller waits for it.
        """
        if self._stopping is None:
            if not self.is_running:
                return
            stopping = self._stopping = asyncio.ensure_future(self._begin_stop(grace_period))
            stopping.add_done_callback(self._stopped)
        await asyncio.shield(self._stopping)

    def _stopped(self, stopping: asyncio.Task[None]) -> None:
        if self._stopping is stopping:
            self._stopping = None

    async def _after_the_last_stop(self) -> None:
        """Wait for a stop still under way (one whose caller was cancelled): a start meanwhile
        would have that stop close what it opened."""
        stopping = self._stopping
        if stopping is None:
            return
        if stopping.get_loop().is_closed():  # it will never end: nothing of it is left to wait for
            self._stopping = None
            return
        if stopping.get_loop() is not asyncio.get_running_loop():
            raise RuntimeError("The last stop is still under way, on another event loop: wait for it there first.")
        await asyncio.wait([stopping])  # (how it ended is its callers' to hear)

    async def __aenter__(self) -> Self:
        await self.start_async()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_async()

    def start(self) -> None:
        """Start on a background thread; nothing more if it runs there already (the official
        SDK's workers start in ``start()``, after ``with``, which starts a dtfx one)."""
        with self._holding_the_lifecycle() as holding:
            if not holding or self._portal is not None:
                return
            self._portal = LoopThread(self._thread_name)
            try:
                self._portal.run(self.start_async())
            except BaseException:
                self._portal.close()
                self._portal = None
                raise

    def stop(self, grace_period: float | None = None) -> None:
        """Stop what :meth:`start` started; a second caller meanwhile waits for the stop, but
        one on the thread that is starting or stopping it (a signal handler's) returns at once,
        having done nothing."""
        with self._holding_the_lifecycle() as holding:
            portal = self._portal
            if not holding or portal is None:
                return
            try:
                portal.run(self.stop_async(grace_period))
            finally:
                self._portal = None
                portal.close()

    @contextlib.contextmanager
    def _holding_the_lifecycle(self) -> Iterator[bool]:
        """Hold ``_lifecycle``; ``False`` for a caller on the thread that holds it already, a
        signal handler's say, which would otherwise wait for itself (the lock lets it in)."""
        with self._lifecycle:
            if self._lifecycle_busy:
                yield False
                return
            self._lifecycle_busy = True
            try:
                yield True
            finally:
                self._lifecycle_busy = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
