"""What the commands print: readable tables on a terminal, or JSON with ``--json``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import typer
from rich.table import Table
from rich.text import Text

from dtfx.cli.options import not_json
from dtfx.cli.printable import cell
from dtfx.cli.root import stderr, stdout
from dtfx.core.entities import EntityMetadata
from dtfx.core.history import FailureDetails, HistoryEvent, OrchestrationStatus
from dtfx.core.state import OrchestrationState

_STATUS_STYLES = {
    OrchestrationStatus.PENDING: "yellow",
    OrchestrationStatus.RUNNING: "cyan",
    OrchestrationStatus.SUSPENDED: "magenta",
    OrchestrationStatus.COMPLETED: "green",
    OrchestrationStatus.CONTINUED_AS_NEW: "blue",
    OrchestrationStatus.FAILED: "bold red",
    OrchestrationStatus.TERMINATED: "red",
    OrchestrationStatus.CANCELED: "red",
}
_DETAIL_WIDTH = 160


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout."""
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def print_outcome(message: str, result: dict[str, Any], json_output: bool) -> None:
    """The outcome of a command that changes something: a sentence, or ``result`` as JSON."""
    if json_output:
        print_json(result)
    else:
        stdout.print(message, soft_wrap=True)


def print_entity(entity: EntityMetadata, json_output: bool) -> None:
    """One entity: its state and lock, as a two-column table or JSON."""
    if json_output:
        print_json(
            {
                "entity_id": str(entity.id),
                "name": entity.id.entity,
                "key": entity.id.key,
                "last_modified": _iso(entity.last_modified),
                "locked_by": entity.locked_by,
                "backlog_queue_size": entity.backlog_queue_size,
                "state": _decoded(entity.serialized_state),
            }
        )
        return
    _print_rows(
        [
            ("Entity", str(entity.id)),
            ("Name", entity.id.entity),
            ("Key", entity.id.key),
            ("Last modified", _readable_time(entity.last_modified)),
            ("Locked by", entity.locked_by),
            ("Waiting", str(entity.backlog_queue_size) if entity.backlog_queue_size else None),
            ("State", entity.serialized_state),
        ]
    )


def _print_rows(rows: list[tuple[str, str | Text | None]]) -> None:
    """A two-column table of the rows that have a value."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows:
        if value is not None:
            table.add_row(label, cell(value) if isinstance(value, str) else value)
    stdout.print(table)


def state_json(state: OrchestrationState) -> dict[str, Any]:
    """The instance's state as JSON-ready data, payloads decoded."""
    failure = state.failure_details
    return {
        "instance_id": state.instance_id,
        "name": state.name,
        "version": state.version,
        "runtime_status": state.runtime_status.name,
        "created_at": _iso(state.created_at),
        "last_updated_at": _iso(state.last_updated_at),
        "completed_at": _iso(state.completed_at),
        "scheduled_start_at": _iso(state.scheduled_start_at),
        "input": _decoded(state.serialized_input),
        "output": _decoded(state.serialized_output),
        "custom_status": _decoded(state.serialized_custom_status),
        "failure_details": msgspec.to_builtins(failure) if failure is not None else None,
        "execution_id": state.execution_id,
        "parent_instance_id": state.parent_instance_id,
        "tags": state.tags,
    }


def print_state(state: OrchestrationState, json_output: bool, history: list[HistoryEvent] | None = None) -> None:
    """One instance: a two-column table (and its history), or JSON."""
    if json_output:
        data = state_json(state)
        if history is not None:
            data["history"] = [event_json(event) for event in history]
        print_json(data)
        return
    rows: list[tuple[str, str | Text | None]] = [
        ("Instance", state.instance_id),
        ("Name", state.name),
        ("Version", state.version),
        ("Status", status_text(state.runtime_status)),
        ("Created", _readable_time(state.created_at)),
        ("Scheduled start", _readable_time(state.scheduled_start_at)),
        ("Last updated", _readable_time(state.last_updated_at)),
        ("Completed", _readable_time(state.completed_at)),
        ("Parent", state.parent_instance_id),
        ("Tags", _compact(state.tags) if state.tags else None),
        ("Input", state.serialized_input),
        ("Custom status", state.serialized_custom_status),
        ("Output", state.serialized_output),
        ("Failure", failure_text(state.failure_details) if state.failure_details else None),
    ]
    _print_rows(rows)
    if history is not None:
        stdout.print()
        stdout.print(history_table(history))


def history_table(history: list[HistoryEvent]) -> Table:
    """One row per history event: id, type, time and the event's own fields."""
    table = Table("#", "Event", "Time", "Details", title="History", title_justify="left", show_edge=False)
    for event in history:
        table.add_row(
            str(event.event_id) if event.event_id >= 0 else "",
            type(event).__name__,
            _readable_time(event.timestamp),
            cell(_event_details(event)),
        )
    return table


def print_states(states: list[OrchestrationState], more: bool, json_output: bool) -> None:
    """A list of instances: a table (noting when more exist), or a JSON array (noting it on stderr)."""
    if json_output:
        print_json([state_json(state) for state in states])
        if more:  # stdout holds the JSON alone
            stderr.print(f"(the first {len(states)}, oldest first; raise --limit to see more)")
        return
    if not states:
        stdout.print("No orchestration instances.")
        return
    versioned = any(state.version for state in states)  # a column only where a deploy uses versions
    table = Table(
        "Instance", "Name", *(("Version",) if versioned else ()), "Status", "Created", "Last updated", show_edge=False
    )
    table.columns[0].no_wrap = True
    for state in states:
        table.add_row(
            cell(state.instance_id),
            cell(state.name),
            *((cell(state.version or ""),) if versioned else ()),
            status_text(state.runtime_status),
            _readable_time(state.created_at),
            _readable_time(state.last_updated_at),
        )
    stdout.print(table)
    if more:
        stdout.print(f"(the first {len(states)}, oldest first; raise --limit to see more)", style="dim")


def failure_text(failure: FailureDetails) -> str:
    """``Type: message``, followed by the root cause when the failure wraps another."""
    cause = failure
    while cause.inner_failure is not None:
        cause = cause.inner_failure
    return str(failure) if cause is failure else f"{failure} (caused by {cause})"


def status_text(status: OrchestrationStatus) -> Text:
    """A runtime status, coloured."""
    return Text(status.name, style=_STATUS_STYLES[status])


def event_json(event: HistoryEvent) -> dict[str, Any]:
    """A history event as JSON-ready data, with its ``type`` and statuses by name."""
    data: dict[str, Any] = msgspec.to_builtins(event)
    status = getattr(event, "status", None)
    if isinstance(status, OrchestrationStatus):
        data["status"] = status.name
    return data


def _event_details(event: HistoryEvent) -> str:
    fields = event_json(event)
    for key in ("type", "event_id", "timestamp"):
        fields.pop(key, None)
    failure = getattr(event, "failure_details", None)
    if failure is not None:
        fields["failure_details"] = str(failure)
    details = ", ".join(
        f"{key}={value if isinstance(value, str) else _compact(value)}" for key, value in fields.items()
    )
    return details if len(details) <= _DETAIL_WIDTH else details[: _DETAIL_WIDTH - 1] + "…"


def _decoded(payload: str | None) -> Any:
    """A stored payload as JSON data; a payload that is not strict JSON stays a string (one
    holding ``NaN`` or ``Infinity``, as Python's ``json`` writes them, would make the output
    invalid JSON), and so does one nested too deep to read (one instance's, which would
    fail the listing of all)."""
    if payload is None:
        return None
    try:
        return json.loads(payload, parse_constant=not_json)
    except (ValueError, RecursionError):  # nested deeper than Python reads
        return payload


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _readable_time(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
