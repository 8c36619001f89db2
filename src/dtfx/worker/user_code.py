"""Running user code (activities, entity operations) on the worker's threads and event loop.

What the code raises that is no ``Exception`` (:data:`~dtfx.core.errors.USER_CODE_ERRORS`:
``sys.exit()``, a ``CancelledError`` of its own, ``GeneratorExit``) fails it like an error
of its own: it travels as :class:`EscapedError`, because on the loop a ``SystemExit`` would
end the loop, and a ``CancelledError`` would read as the worker's own cancellation. The
other way round, the worker's cancellation of a task running user code (a stop) stays a
cancellation, whatever the code turned it into.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from dtfx.core.errors import USER_CODE_ERRORS


class EscapedError(Exception):
    """What user code raised that is no ``Exception``, carried as one (:func:`escaped` unwraps it)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def escaped(error: BaseException) -> BaseException:
    """What the user code raised: ``error``, unwrapped if it is an :class:`EscapedError`."""
    return error.error if isinstance(error, EscapedError) else error


def called(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, on a thread: none of what it raises is the worker's."""
    try:
        return function(*args)
    except Exception:
        raise
    except USER_CODE_ERRORS as error:
        raise EscapedError(error) from None


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
        if isinstance(error, Exception) or not isinstance(error, USER_CODE_ERRORS):  # KeyboardInterrupt
            raise
        raise EscapedError(error) from None
