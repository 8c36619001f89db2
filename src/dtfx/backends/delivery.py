"""Delivery rules every backend applies when it puts a message in an inbox.

They are pure functions, so the rules are written once; backends only carry out
what :func:`route` decides, inside their transaction.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime

from dtfx.backends.base import WorkKind
from dtfx.core.apply import REFUSED_START
from dtfx.core.errors import OrchestrationAlreadyExistsError
from dtfx.core.history import (
    EntityLockRequested,
    EntityOperationCalled,
    EntityOperationSignaled,
    EntityUnlockSent,
    ExecutionRewound,
    ExecutionStarted,
    ExecutionTerminated,
    FailureDetails,
    HistoryEvent,
    OrchestrationStatus,
    SubOrchestrationInstanceFailed,
)
from dtfx.core.instance_ids import is_entity_id
from dtfx.core.state import OrchestrationState
from dtfx.core.workitems import OrchestrationCheckpoint, OutboundMessage


class Route(enum.Enum):
    """What to do with one outbound message."""

    CREATE = "create"
    """Create (or replace) the target instance from the message's ``ExecutionStarted``, then deliver it."""
    CREATE_ENTITY = "create_entity"
    """Create the target entity instance (:func:`new_entity_state`), then deliver the message."""
    DELIVER = "deliver"
    """Insert the message into the target's inbox."""
    DROP = "drop"
    """Discard the message."""
    REFUSE = "refuse"
    """Discard it and send :func:`refusal` to the parent instead."""


def work_kind_of(instance_id: str) -> WorkKind:
    """The queue an instance's inbox feeds."""
    return WorkKind.ENTITY if is_entity_id(instance_id) else WorkKind.ORCHESTRATION


ENTITY_REQUESTS = (EntityOperationSignaled, EntityOperationCalled, EntityLockRequested, EntityUnlockSent)
"""Events addressed to entities. An entity that is empty is stored as COMPLETED (so that
cleaning up can purge it); a request makes it RUNNING again."""


def _is_entity_request(target: OrchestrationState, event: HistoryEvent) -> bool:
    """An entity request sent to an entity (one sent to an orchestration is an ordinary event)."""
    return isinstance(event, ENTITY_REQUESTS) and is_entity_id(target.instance_id)


def accepts(target: OrchestrationState, event: HistoryEvent) -> bool:
    """Whether the existing instance ``target`` takes ``event`` into its inbox.

    A rewind from a parent reaches its child whatever the child's status: a FAILED child is
    rewound, one that ended otherwise tells the parent again how it ended.
    """
    status = target.runtime_status
    if not status.is_terminal or _is_entity_request(target, event):
        return True
    if isinstance(event, ExecutionRewound):
        return status == OrchestrationStatus.FAILED or event.parent is not None
    return False


def status_on_delivery(target: OrchestrationState, event: HistoryEvent) -> OrchestrationStatus:
    """The status of ``target`` once ``event`` sits in its inbox.

    Rewinding a failed instance makes it RUNNING at once, so a client that rewinds
    and then waits for completion waits for the new outcome, not the old failure.
    A request to an empty (COMPLETED) entity makes it RUNNING, so that it is not purged
    with the request in its inbox.
    """
    status = target.runtime_status
    if isinstance(event, ExecutionRewound) and status == OrchestrationStatus.FAILED:
        return OrchestrationStatus.RUNNING
    if status.is_terminal and _is_entity_request(target, event):
        return OrchestrationStatus.RUNNING
    return status


def ends_wait(event: HistoryEvent) -> bool:
    """Whether ``event``, delivered, ends the wait of an instance no worker holds: the back-off
    after a failed episode, or the deferral of events that came before its scheduled start
    (the work item given back with a ``retry_at``). A terminate takes effect at once."""
    return isinstance(event, ExecutionTerminated)


def brings_the_start_forward(target: OrchestrationState, history_size: int, event: HistoryEvent) -> bool:
    """Whether ``event``, delivered, makes the instance's messages visible at once: a terminate
    for an instance whose scheduled start has not run. The start then comes with the terminate
    to the worker, which records both (the history of the execution it ends holds its start)."""
    return ends_wait(event) and history_size == 0 and target.runtime_status == OrchestrationStatus.PENDING


def route(message: OutboundMessage, sender_id: str, target: OrchestrationState | None) -> Route:
    """Decide the fate of ``message`` sent by ``sender_id`` to ``target`` (``None``: no such instance)."""
    event = message.event
    if isinstance(event, ExecutionStarted) and (message.instance_id != sender_id or _is_own_child(event)):
        if target is None or target.runtime_status.is_terminal:
            return Route.CREATE
        return Route.REFUSE
    if isinstance(event, ExecutionRewound) and event.parent is not None:
        if target is None or target.parent_instance_id != event.parent.instance_id:
            return Route.REFUSE  # purged, or its id reused since: nothing of the child is left
    if target is None:
        return Route.CREATE_ENTITY if is_entity_id(message.instance_id) else Route.DROP
    return Route.DELIVER if accepts(target, event) else Route.DROP


def _is_own_child(start: ExecutionStarted) -> bool:
    """A sub-orchestration an orchestration asked for under its own id (its next execution's
    start, which it also sends itself, names its parent, if any, as the parent)."""
    return start.parent is not None and start.parent.instance_id == start.instance.instance_id


def refusal(message: OutboundMessage, target: OrchestrationState | None, now: datetime) -> OutboundMessage | None:
    """The failure a parent receives when its sub-orchestration's id is taken, or when the
    sub-orchestration it rewinds is gone."""
    event = message.event
    details: FailureDetails
    if isinstance(event, ExecutionRewound):
        parent = event.parent
        details = FailureDetails(
            error_type="SubOrchestrationGone",
            message=f"Sub-orchestration '{message.instance_id}' cannot be rewound: it was purged"
            + ("." if target is None else ", and its id has been used again since."),
            is_non_retriable=True,
        )
    else:
        assert isinstance(event, ExecutionStarted) and target is not None
        parent = event.parent
        error = OrchestrationAlreadyExistsError(message.instance_id, target.runtime_status)
        details = FailureDetails(error_type=REFUSED_START, message=str(error), is_non_retriable=True)
    if parent is None:
        return None
    failure = SubOrchestrationInstanceFailed(
        timestamp=now, task_scheduled_id=parent.task_scheduled_id, failure_details=details
    )
    return OutboundMessage(parent.instance_id, failure, parent.execution_id)


def new_instance_state(
    start: ExecutionStarted, now: datetime, scheduled_start_at: datetime | None = None
) -> OrchestrationState:
    """The row of an instance created from ``start``: created at ``start``'s timestamp (as in
    DTFx), which tells this creation apart from any other of the same id for good, whatever
    execution the instance has reached since."""
    return OrchestrationState(
        instance_id=start.instance.instance_id,
        name=start.name,
        runtime_status=OrchestrationStatus.PENDING,
        created_at=start.timestamp,
        last_updated_at=now,
        serialized_input=start.input,
        version=start.version,
        execution_id=start.instance.execution_id,
        parent_instance_id=start.parent.instance_id if start.parent else None,
        scheduled_start_at=scheduled_start_at,
        tags=start.tags,
    )


def new_entity_state(instance_id: str, now: datetime) -> OrchestrationState:
    """The row of an entity instance created by its first message."""
    name = instance_id[1 : instance_id.index("@", 1)]
    return OrchestrationState(
        instance_id=instance_id,
        name=name,
        runtime_status=OrchestrationStatus.RUNNING,
        created_at=now,
        last_updated_at=now,
    )


def with_pending_requests(state: OrchestrationState) -> OrchestrationState:
    """The row of an instance whose inbox still holds messages once a commit is written.

    An entity the commit left empty (COMPLETED) stays RUNNING while requests wait for
    it, as :func:`status_on_delivery` makes it when they arrive: cleaning entity storage
    must not purge it with them.
    """
    if is_entity_id(state.instance_id) and state.runtime_status.is_terminal:
        return dataclasses.replace(state, runtime_status=OrchestrationStatus.RUNNING, completed_at=None)
    return state


def checkpointed_state(state: OrchestrationState, checkpoint: OrchestrationCheckpoint) -> OrchestrationState:
    """The instance's row once ``checkpoint`` is committed."""
    return dataclasses.replace(
        state,
        runtime_status=checkpoint.status,
        execution_id=checkpoint.execution_id,
        serialized_input=checkpoint.input,
        serialized_output=checkpoint.output,
        serialized_custom_status=checkpoint.custom_status,
        failure_details=checkpoint.failure_details,
        version=checkpoint.version,
        completed_at=checkpoint.completed_at,
        last_updated_at=checkpoint.updated_at,
    )
