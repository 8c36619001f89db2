"""The worker's threads: sync activities, eager chains and entity batches run on them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class WorkerThreads(ThreadPoolExecutor):
    """A thread pool that can drop the work still waiting for a thread (:meth:`drop_waiting`)."""

    def __init__(self, max_workers: int | None) -> None:
        self._members: set[threading.Thread] = set()
        """The pool's threads, each added before it runs any work (the pool's own set, after it starts)."""
        super().__init__(max_workers=max_workers, thread_name_prefix="dtfx-activity", initializer=self._joined)
        self._submitted: set[Future[Any]] = set()
        """What was submitted and has not ended (the set's changes are atomic under the GIL)."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future = super().submit(fn, *args, **kwargs)
        self._submitted.add(future)
        future.add_done_callback(self._submitted.discard)
        return future

    def _joined(self) -> None:
        self._members.add(threading.current_thread())

    def runs_this_thread(self) -> bool:
        """Whether the calling thread is one of the pool's."""
        return threading.current_thread() in self._members

    @property
    def unfinished(self) -> int:
        """What was submitted and has not ended (after :meth:`drop_waiting`: what runs)."""
        return len(self._submitted)

    def drop_waiting(self) -> int:
        """Cancel what has not started on a thread yet (its caller gets ``CancelledError``, and
        the work item goes back to the store); returns how many. What runs goes on."""
        return sum(future.cancel() for future in list(self._submitted))
