"""Columns, timestamps and the row <-> :class:`~dtfx.OrchestrationState` mapping.

Timestamps are stored as integer microseconds since the Unix epoch (UTC): exact,
cheap to compare and index, and the same in every dialect. Events, failure details
and tags are stored as JSON text.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from dtfx.core.history import FailureDetails, OrchestrationStatus, decode_failure, encode_failure
from dtfx.core.instance_ids import is_entity_id
from dtfx.core.state import OrchestrationState

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

STATE_COLUMNS = (
    "instance_id",
    "name",
    "status",
    "created_at",
    "last_updated_at",
    "input",
    "output",
    "custom_status",
    "failure_details",
    "version",
    "execution_id",
    "parent_instance_id",
    "scheduled_start_at",
    "completed_at",
    "tags",
)
"""The columns an :class:`OrchestrationState` is read from, in :func:`state_from_row` order."""

PAYLOAD_COLUMNS = frozenset({"input", "output", "custom_status"})

_tags_decoder = msgspec.json.Decoder(dict[str, str])


def state_columns(*, payloads: bool, table: str = "") -> str:
    """The select list of a state; without ``payloads`` the payload columns read as NULL."""
    prefix = f"{table}." if table else ""
    return ", ".join(
        f"{prefix}{column}" if payloads or column not in PAYLOAD_COLUMNS else "NULL" for column in STATE_COLUMNS
    )


def to_micros(moment: datetime) -> int:
    """A timezone-aware moment as stored."""
    return (moment - EPOCH) // _MICROSECOND


def optional_micros(moment: datetime | None) -> int | None:
    """:func:`to_micros`, keeping ``None``."""
    return None if moment is None else to_micros(moment)


def from_micros(value: int) -> datetime:
    """The inverse of :func:`to_micros`."""
    return EPOCH + timedelta(microseconds=value)


def optional_moment(value: int | None) -> datetime | None:
    """:func:`from_micros`, keeping ``None``."""
    return None if value is None else EPOCH + timedelta(microseconds=value)


def failure_text(details: FailureDetails | None) -> str | None:
    """Failure details as stored."""
    return None if details is None else encode_failure(details).decode()


def state_from_row(row: Sequence[Any]) -> OrchestrationState:
    """The state in the first ``len(STATE_COLUMNS)`` values of ``row``."""
    failure, tags = row[8], row[14]
    return OrchestrationState(
        instance_id=row[0],
        name=row[1],
        runtime_status=OrchestrationStatus(row[2]),
        created_at=from_micros(row[3]),
        last_updated_at=from_micros(row[4]),
        serialized_input=row[5],
        serialized_output=row[6],
        serialized_custom_status=row[7],
        failure_details=None if failure is None else decode_failure(failure),
        version=row[9],
        execution_id=row[10],
        parent_instance_id=row[11],
        scheduled_start_at=optional_moment(row[12]),
        completed_at=optional_moment(row[13]),
        tags=None if tags is None else _tags_decoder.decode(tags),
    )


def state_values(state: OrchestrationState) -> tuple[Any, ...]:
    """The values of :data:`STATE_COLUMNS` for ``state``, followed by ``is_entity``."""
    return (
        state.instance_id,
        state.name,
        int(state.runtime_status),
        to_micros(state.created_at),
        to_micros(state.last_updated_at),
        state.serialized_input,
        state.serialized_output,
        state.serialized_custom_status,
        failure_text(state.failure_details),
        state.version,
        state.execution_id,
        state.parent_instance_id,
        optional_micros(state.scheduled_start_at),
        optional_micros(state.completed_at),
        None if state.tags is None else msgspec.json.encode(state.tags).decode(),
        int(is_entity_id(state.instance_id)),
    )
