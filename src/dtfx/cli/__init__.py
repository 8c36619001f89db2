"""The ``dtfx`` command line: run workers, start and manage orchestrations (``dtfx --help``).

:data:`COMMANDS` is the command table, in the order ``dtfx --help`` lists them. To
add a command, write its function (in this package, or beside what it serves, as
:mod:`dtfx.grpc.cli`; ``async def`` commands take ``@run_async``) and add a row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dtfx.cli import hub, instances, worker
from dtfx.cli.root import cli
from dtfx.grpc.cli import serve

COMMANDS: list[tuple[str, Callable[..., Any]]] = [
    ("run", worker.run),
    ("serve", serve),
    ("start", instances.start),
    ("status", instances.status),
    ("list", instances.list_instances),
    ("raise", instances.raise_event),
    ("terminate", instances.terminate),
    ("suspend", instances.suspend),
    ("resume", instances.resume),
    ("restart", instances.restart),
    ("rewind", instances.rewind),
    ("purge", instances.purge),
    ("migrate", hub.migrate),
]

for _name, _function in COMMANDS:
    cli.command(_name)(_function)


def main() -> None:
    """The ``dtfx`` console script."""
    cli()


__all__ = ["COMMANDS", "cli", "main"]
