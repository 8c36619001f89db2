"""Group commit: completions that arrive while a commit is running share the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommitter(Generic[T]):
    """Batches ``commit`` calls into calls of ``commit_many``.

    The first completion is committed at once; those that arrive meanwhile wait and
    go together in the next transaction. Latency stays that of one commit, and under
    load the number of transactions drops by the batch size.
    """

    def __init__(self, commit_many: Callable[[Sequence[T]], Awaitable[list[bool]]], max_batch: int = 500) -> None:
        self._commit_many = commit_many
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def commit(self, item: T) -> bool:
        """Commit ``item`` (with whatever else is waiting); True if it was committed."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                try:
                    results = await self._commit_many([item for item, _ in batch])
                except BaseException as error:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(error, Exception):
                        raise
                    continue
                for (_, future), committed in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(committed)
        finally:
            self._flusher = None
            waiting, self._queue = self._queue, []
            for _, future in waiting:  # only after a cancellation
                if not future.done():
                    future.cancel()
