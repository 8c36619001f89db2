"""Commands on the task hub itself."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from dtfx.backends import MemoryBackend, default_url, open_backend
from dtfx.backends.sql.schema import MIGRATIONS
from dtfx.backends.urls import redact
from dtfx.cli.options import BackendUrl, JsonOutput, Verbosity
from dtfx.cli.output import print_outcome
from dtfx.cli.root import CommandError, configure_logging, run_async
from dtfx.cli.session import refuse_memory, started_backend

Roles = Annotated[
    list[str] | None,
    typer.Option(
        "--grant",
        metavar="ROLE",
        show_default=False,
        help="A PostgreSQL role to let use the task hub (read and write its rows, nothing more); repeatable.",
    ),
]


@run_async
async def migrate(
    grant: Roles = None, backend: BackendUrl = None, json_output: JsonOutput = False, verbose: Verbosity = 0
) -> None:
    """Create the task hub, or migrate it to this version of dtfx, and exit.

    Workers and clients do this themselves when they start, if their database
    role may. Where the application's role may only read and write rows, run
    this once (and after each upgrade of dtfx) as a role that may change the
    schema, the owner of the database or of the schema, with --grant naming
    the application's role.
    """
    configure_logging(verbose, quiet=logging.ERROR)
    url = backend or default_url()
    roles = grant or []
    if roles and await _has_no_roles(url):  # said before a task hub is made
        raise CommandError("--grant needs a PostgreSQL task hub: only PostgreSQL has roles.")
    async with started_backend(url) as store:
        refuse_memory(store)
        if roles:
            from dtfx.backends.postgres import PostgresBackend  # the postgres extra, needed only here

            assert isinstance(store, PostgresBackend)
            for role in roles:
                await store.grant(role)
    version = len(MIGRATIONS)
    message = f"The task hub on {redact(url)} is ready (schema version {version})."
    if roles:
        message += f" Granted its use to {', '.join(roles)}."
    print_outcome(message, {"schema_version": version, "granted": roles}, json_output)


async def _has_no_roles(url: str) -> bool:
    """Whether the store at ``url`` is one without database roles (SQLite, memory); nothing is made."""
    from dtfx.backends.sqlite import SqliteBackend

    unstarted = open_backend(url)
    try:
        return isinstance(unstarted, SqliteBackend | MemoryBackend)
    finally:
        await unstarted.close()
