"""Running user code (activities, entity operations) on the worker's threads and event loop.

What the code raises that is no ``Exception`` (all but ``KeyboardInterrupt``: ``sys.exit()``,
a ``CancelledError`` of its own, ``GeneratorExit``, a test framework's outcome) fails it like
an error of its own: it travels as :class:`EscapedError`, because on the loop a ``SystemExit``
would end the loop, and a ``CancelledError`` would read as the worker's own cancellation. So
do the exceptions that a future cannot carry back from a thread as they are (:data:`_UNCARRIED`).
The other way round, the worker's cancellation of a task running user code (a stop) stays a
cancellation, whatever the code turned it into.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any

_UNCARRIED = (StopIteration, concurrent.futures.CancelledError)
"""Exceptions that a future does not carry across threads as they are: asyncio refuses a
``StopIteration`` (the future is never done), and makes its own ``CancelledError``, a
cancellation, of ``concurrent.futures``' (the result of ``.result()`` on a cancelled future)."""


class EscapedError(Exception):
    """What user code raised that is no ``Exception``, carried as one (:func:`escaped` unwraps it)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def escaped(error: BaseException) -> BaseException:
    """What the user code raised: ``error``, unwrapped if it is an :class:`EscapedError`."""
    return error.error if isinstance(error, EscapedError) else error


def _escapes(error: BaseException) -> bool:
    """Whether ``error``, which user code raised, travels as :class:`EscapedError`."""
    if isinstance(error, Exception):
        return isinstance(error, _UNCARRIED)
    return not isinstance(error, KeyboardInterrupt)


def called(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, on a thread: none of what it raises is the worker's."""
    try:
        return function(*args)
    except BaseException as error:
        if _escapes(error):
            raise EscapedError(error) from None
        raise


async def awaited(awaitable: Awaitable[Any]) -> Any:
    """``await awaitable`` (user code) on the loop; a cancellation of the awaiting task comes
    out as a ``CancelledError``, whatever the code made of it."""
    try:
        return await awaitable
    except BaseException as error:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the worker's (a stop), or the code's of its own task
            if isinstance(error, asyncio.CancelledError):
                raise
            raise asyncio.CancelledError from error
        if _escapes(error):
            raise EscapedError(error) from None
        raise
