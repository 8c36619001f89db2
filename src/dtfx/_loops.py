"""The event loops dtfx creates itself: uvloop's when it is installed (the ``fast`` extra), asyncio's otherwise.

Those are the loops of the command line (``dtfx worker``, ``dtfx serve``, ...) and the
private loops behind the sync :class:`~dtfx.Client` and the PostgreSQL driver. uvloop
wakes a loop from another thread (a finished activity, a SQLite commit) faster and runs
callbacks with less overhead: a worker's throughput rises by about a fifth with it
(BENCHMARKS.md). A loop the application runs the worker on is the application's choice.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop, of uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """:func:`asyncio.run` on a loop from :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)


def in_context_on(
    loop: asyncio.AbstractEventLoop, executor: Executor | None, fn: Callable[..., T], *args: Any
) -> asyncio.Future[T]:
    """``fn(*args)`` run by ``executor`` in a copy of the caller's context (as :func:`asyncio.to_thread`)."""
    return loop.run_in_executor(executor, _run_in, contextvars.copy_context(), fn, *args)


def _run_in(context: contextvars.Context, fn: Callable[..., T], *args: Any) -> T:
    # A plain function: uvloop checks that what it runs is no coroutine function, which
    # takes a few microseconds for a context's bound ``run``, and none for a function.
    return context.run(fn, *args)
