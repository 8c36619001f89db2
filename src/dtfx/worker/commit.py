"""Group commit: completions that arrive while a commit is running share the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from dtfx.core.errors import BackendUnavailableError

T = TypeVar("T")
R = TypeVar("R")


class GroupCommitter(Generic[T, R]):
    """Batches ``commit`` calls into calls of ``commit_many``.

    The first completion is committed at once; those that arrive meanwhile wait and
    go together in the next transaction. Latency stays that of one commit, and under
    load the number of transactions drops by the batch size.
    """

    def __init__(self, commit_many: Callable[[Sequence[T]], Awaitable[Sequence[R]]], max_batch: int = 500) -> None:
        self._commit_many = commit_many
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def commit(self, item: T) -> R:
        """Commit ``item`` (with whatever else is waiting); returns what the backend said of it."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                await self._commit_batch(batch)
        finally:
            self._flusher = None
            waiting, self._queue = self._queue, []
            for _, future in waiting:  # only after a cancellation
                if not future.done():
                    future.cancel()

    async def _commit_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Commit ``batch`` in one call; if that fails for a reason the store may not
        share with every item (a value it cannot hold, say), commit each item alone, so
        that only the items at fault get the error."""
        try:
            results = await self._commit_many([item for item, _ in batch])
        except BaseException as error:
            if len(batch) > 1 and isinstance(error, Exception) and not isinstance(error, BackendUnavailableError):
                for one in batch:
                    await self._commit_batch([one])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for (_, future), committed in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(committed)
