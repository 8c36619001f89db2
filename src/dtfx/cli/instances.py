"""Commands that start, inspect and manage orchestration instances.

Each opens the task hub, does one thing through :class:`~dtfx.AsyncClient` and
prints the outcome. Terminate, suspend, resume, rewind and raise put a message in
the instance's inbox: a worker running on the same backend carries it out.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from dtfx.backends import default_url
from dtfx.cli.options import (
    BackendUrl,
    InstanceId,
    JsonOutput,
    Timeout,
    Verbosity,
    json_value,
    moment_value,
    non_empty,
    status_value,
)
from dtfx.cli.output import failure_text, print_entity, print_outcome, print_state, print_states
from dtfx.cli.printable import printable
from dtfx.cli.root import CommandError, run_async, stderr
from dtfx.cli.session import connect, shown
from dtfx.client import AsyncClient
from dtfx.core.entities import EntityInstanceId
from dtfx.core.errors import OrchestrationNotFoundError, OrchestrationStateError
from dtfx.core.history import OrchestrationStatus
from dtfx.core.instance_ids import is_entity_id
from dtfx.core.state import OrchestrationQuery, OrchestrationState

JsonInput = Annotated[
    Any,
    typer.Option("--input", "-i", parser=json_value, metavar="JSON", help="The input, as JSON.", show_default=False),
]
Reason = Annotated[str | None, typer.Option("--reason", metavar="TEXT", help="Why; kept in the instance's history.")]
RewindReason = Annotated[
    str | None,
    typer.Option("--reason", metavar="TEXT", help="Why; passed on to the failed sub-orchestrations it rewinds too."),
]


@run_async
async def start(
    name: Annotated[
        str,
        typer.Argument(
            metavar="NAME", help="The orchestrator's registered name.", show_default=False, callback=non_empty
        ),
    ],
    input_value: JsonInput = None,
    instance_id: Annotated[
        str | None,
        typer.Option("--id", metavar="ID", help="The instance id (default: a new random id).", callback=non_empty),
    ] = None,
    version: Annotated[
        str | None, typer.Option("--version", metavar="VERSION", help="The orchestration's version.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", metavar="", help="Wait until it ends and show its state.")] = False,
    timeout: Timeout = 60,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """Start an orchestration, by the name a worker registered it under.

    A worker that runs on the same backend (`dtfx run`) picks it up; if that worker
    has registered no orchestrator named NAME, the orchestration fails with
    NotRegisteredError, which `dtfx status` shows and `--wait` reports.
    """
    async with connect(backend, verbose, creates=True) as client:
        new_id = await client.schedule_new_orchestration(
            name, input=input_value, instance_id=instance_id, version=version
        )
        if not wait:
            print_outcome(f"Started {name} as instance {new_id}.", {"instance_id": new_id}, json_output)
            return
        try:
            state = await _wait_with_progress(client, new_id, timeout, backend or default_url())
        except asyncio.CancelledError:  # Ctrl-C: say which instance goes on (its id may be a new one)
            note = f"Started {name} as instance {new_id}; it goes on, only the wait was interrupted."
            stderr.print(note, soft_wrap=True, markup=False, highlight=False)
            raise
    print_state(state, json_output)
    if state.failure_details is not None:
        raise CommandError(f"Orchestration {new_id} failed: {failure_text(state.failure_details)}")
    if state.runtime_status != OrchestrationStatus.COMPLETED:
        raise CommandError(f"Orchestration {new_id} ended {state.runtime_status.name}.")


@run_async
async def status(
    instance_id: InstanceId,
    history: Annotated[bool, typer.Option("--history", metavar="", help="Show the history events too.")] = False,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """Show an instance's status, input, output and failure (an entity's state and lock)."""
    if is_entity_id(instance_id):
        if history:
            raise typer.BadParameter("an entity keeps no history: leave it out", param_hint="'--history'")
        async with connect(backend, verbose) as client:
            entity = await client.get_entity(EntityInstanceId.parse(instance_id))
        if entity is None:
            raise CommandError(f"No entity with id '{instance_id}' (or it has no state).")
        print_entity(entity, json_output)
        return
    async with connect(backend, verbose) as client:
        state = await _existing(client, instance_id)
        events = await client.get_orchestration_history(instance_id) if history else None
    print_state(state, json_output, events)


@run_async
async def list_instances(
    statuses: Annotated[
        list[OrchestrationStatus] | None,
        typer.Option(
            "--status",
            "-s",
            parser=status_value,
            metavar="STATUS",
            show_default=False,
            help="Only instances with this status (repeat for several): pending, running, completed, failed, ...",
        ),
    ] = None,
    prefix: Annotated[
        str | None, typer.Option("--prefix", metavar="TEXT", help="Only instances whose id starts with this.")
    ] = None,
    created_after: Annotated[
        datetime | None,
        typer.Option(
            "--created-after",
            parser=moment_value,
            metavar="MOMENT",
            help="Only instances created at or after this ISO 8601 date or moment (UTC unless it says).",
        ),
    ] = None,
    created_before: Annotated[
        datetime | None,
        typer.Option(
            "--created-before",
            parser=moment_value,
            metavar="MOMENT",
            help="Only instances created at or before this ISO 8601 date or moment (UTC unless it says).",
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", metavar="N", min=1, max=2**31 - 1, help="Show at most this many.")
    ] = 100,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """List orchestration instances, oldest first."""
    # One more than asked for tells whether there are more.
    query = OrchestrationQuery(
        runtime_status=statuses or None,
        instance_id_prefix=prefix,
        created_time_from=created_after,
        created_time_to=created_before,
        max_instance_count=limit + 1,
        fetch_inputs_and_outputs=json_output,
    )
    async with connect(backend, verbose) as client:
        page = await client.query_orchestrations(query)
    print_states(page.items[:limit], len(page.items) > limit, json_output)


@run_async
async def raise_event(
    instance_id: InstanceId,
    event: Annotated[
        str, typer.Argument(metavar="EVENT", help="The event's name.", show_default=False, callback=non_empty)
    ],
    data: Annotated[
        Any, typer.Option("--data", "-d", parser=json_value, metavar="JSON", help="The event's data, as JSON.")
    ] = None,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """Send an external event to an instance (it waits with wait_for_external_event)."""
    async with connect(backend, verbose) as client:
        await _not_ended(client, instance_id)
        await client.raise_orchestration_event(instance_id, event, data=data)
    print_outcome(
        f"Raised event {event!r} on instance {instance_id}.", {"instance_id": instance_id, "event": event}, json_output
    )


@run_async
async def terminate(
    instance_id: InstanceId,
    output: Annotated[
        Any, typer.Option("--output", parser=json_value, metavar="JSON", help="The output it ends with, as JSON.")
    ] = None,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """End an instance (and its sub-orchestrations) as TERMINATED."""
    async with connect(backend, verbose) as client:
        await _not_ended(client, instance_id)
        await client.terminate_orchestration(instance_id, output=output)
    _print_requested("terminate", instance_id, json_output)


@run_async
async def suspend(
    instance_id: InstanceId,
    reason: Reason = None,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """Pause an instance; events that arrive meanwhile wait for it to resume."""
    async with connect(backend, verbose) as client:
        await _not_ended(client, instance_id)
        await client.suspend_orchestration(instance_id, reason=reason)
    _print_requested("suspend", instance_id, json_output)


@run_async
async def resume(
    instance_id: InstanceId,
    reason: Reason = None,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """Resume a suspended instance."""
    async with connect(backend, verbose) as client:
        await _not_ended(client, instance_id)
        await client.resume_orchestration(instance_id, reason=reason)
    _print_requested("resume", instance_id, json_output)


@run_async
async def restart(
    instance_id: InstanceId,
    new_id: Annotated[bool, typer.Option("--new-id", metavar="", help="Run it under a new instance id.")] = False,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """Start an instance again, with its original name, input and version (under its own id, once it has ended)."""
    async with connect(backend, verbose) as client:
        restarted = await client.restart_orchestration(instance_id, restart_with_new_instance_id=new_id)
    message = f"Restarted instance {instance_id}" + (f" as {restarted}." if restarted != instance_id else ".")
    print_outcome(message, {"instance_id": restarted}, json_output)


@run_async
async def rewind(
    instance_id: InstanceId,
    reason: RewindReason = None,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """Run a FAILED instance again from its last good state (what succeeded is not repeated)."""
    async with connect(backend, verbose) as client:
        await client.rewind_orchestration(instance_id, reason=reason)
    _print_requested("rewind", instance_id, json_output)


@run_async
async def purge(
    instance_id: InstanceId,
    backend: BackendUrl = None,
    json_output: JsonOutput = False,
    verbose: Verbosity = 0,
) -> None:
    """Delete an ended instance and its history (and its sub-orchestrations')."""
    if is_entity_id(instance_id):
        raise CommandError(
            f"'{instance_id}' is an entity's id: entities are not purged; one that deletes its state is"
            " removed by a client's clean_entity_storage()."
        )
    async with connect(backend, verbose) as client:
        state = await _existing(client, instance_id)
        if not state.runtime_status.is_terminal:
            raise OrchestrationStateError(
                instance_id, state.runtime_status, "only ended instances can be purged; terminate it first."
            )
        result = await client.purge_orchestration(instance_id)
    count = result.deleted_instance_count
    print_outcome(f"Purged {count} instance(s).", {"deleted_instance_count": count}, json_output)


async def _existing(client: AsyncClient, instance_id: str) -> OrchestrationState:
    state = await client.get_orchestration_state(instance_id)
    if state is None:
        raise OrchestrationNotFoundError(instance_id)
    return state


async def _not_ended(client: AsyncClient, instance_id: str) -> None:
    """Messages to an ended instance are dropped: say so instead of pretending they were sent."""
    state = await _existing(client, instance_id)
    if state.runtime_status.is_terminal:
        raise OrchestrationStateError(instance_id, state.runtime_status, "it has already ended.")


def _print_requested(operation: str, instance_id: str, json_output: bool) -> None:
    print_outcome(
        f"Asked instance {instance_id} to {operation}.",
        {"instance_id": instance_id, "requested": operation},
        json_output,
    )


async def _wait_with_progress(client: AsyncClient, instance_id: str, timeout: float, url: str) -> OrchestrationState:
    """Wait until the instance ends, with a spinner on stderr that shows its status and elapsed time."""
    latest: OrchestrationState | None = None
    # The description holds the custom status, stored data: shown as written, not as markup.
    columns = (SpinnerColumn(), TextColumn("{task.description}", markup=False), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        task = progress.add_task(f"Waiting for instance {instance_id}", total=None)

        def has_ended(state: OrchestrationState) -> bool:
            nonlocal latest
            latest = state
            progress.update(task, description=printable(_progress_line(state)))
            return state.runtime_status.is_terminal

        try:
            state = await client.backend.wait_for_instance(instance_id, has_ended, timeout)
        except TimeoutError:
            raise CommandError(_timed_out(instance_id, timeout, latest, url)) from None
    if state is None:
        raise OrchestrationNotFoundError(instance_id)
    return state


def _progress_line(state: OrchestrationState) -> str:
    line = f"{state.name} {state.instance_id}: {state.runtime_status.name}"
    if state.runtime_status == OrchestrationStatus.PENDING:
        return line + " (waiting for a worker)"
    if state.serialized_custom_status:
        return f"{line} ({state.serialized_custom_status})"
    return line


def _timed_out(instance_id: str, timeout: float, state: OrchestrationState | None, url: str) -> str:
    status = state.runtime_status if state is not None else OrchestrationStatus.PENDING
    message = f"Instance {instance_id} is still {status.name} after {timeout:g}s"
    if status == OrchestrationStatus.PENDING:
        version = state.version if state is not None else None
        runs = f"version {version}" if version else "instances without a version"  # a --match may refuse them
        registers = f" that registers {state.name!r}" if state is not None else ""  # (--registered-only)
        return message + f": is a worker running on {shown(url)}{registers} and runs {runs} (dtfx run MODULE)?"
    return message + f"; see how far it got with: dtfx status {instance_id} --history"
