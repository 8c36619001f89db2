"""Running a long-lived service (a worker, a server) in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Protocol

from dtfx.cli.root import stderr


class Service(Protocol):
    """What :func:`run_until_signalled` runs: a :class:`~dtfx.Worker`, a server."""

    async def start_async(self) -> None:
        """Start serving on the running event loop."""

    async def stop_async(self) -> None:
        """Stop taking work and let the work in flight finish."""


async def run_until_signalled(service: Service, ready: Callable[[], str]) -> None:
    """Start ``service``, print what ``ready()`` says, and stop it gracefully on SIGINT or SIGTERM.

    ``ready`` is called once the service has started: some details (a port bound
    to 0) are known only then.

    A second signal ends the process at once: leases make that safe, as the work
    left unfinished runs again, on any worker, once its lease expires.
    """
    with _stop_signals() as stop_requested:
        await service.start_async()
        try:
            stderr.print(f"{ready()}\nPress Ctrl-C to stop.", soft_wrap=True)
            received = await stop_requested
            stderr.print(
                f"{received.name}: stopping; work in flight may finish (Ctrl-C again to quit at once).", soft_wrap=True
            )
        finally:
            await service.stop_async()


@contextlib.contextmanager
def _stop_signals() -> Iterator[asyncio.Future[signal.Signals]]:
    """A future that the first SIGINT or SIGTERM sets; a second one ends the process."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(signal_number: signal.Signals) -> None:
        if not first.done():
            first.set_result(signal_number)
            return
        stderr.print(f"{signal_number.name} again: quitting now.", soft_wrap=True)
        sys.stderr.flush()
        os._exit(128 + signal_number)  # an exception would still wait for sync activities' threads

    handled = (signal.SIGINT, signal.SIGTERM)
    for signal_number in handled:
        loop.add_signal_handler(signal_number, on_signal, signal_number)
    try:
        yield first
    finally:
        for signal_number in handled:
            loop.remove_signal_handler(signal_number)
