"""The records a backend and a worker exchange: work items, and what completing them writes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from dtfx.core.history import (
    FailureDetails,
    HistoryEvent,
    OrchestrationStatus,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
)
from dtfx.core.state import OrchestrationState

MessageId = int | str
"""Backend-assigned identity of an inbox message or activity task (opaque to the worker)."""


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """An event waiting in an instance's inbox."""

    id: MessageId
    event: HistoryEvent
    execution_id: str | None = None
    """The execution it is addressed to; ``None`` means whichever execution is current."""
    visible_at: datetime | None = None
    """When it became visible: when it was written, or, for a timer's, when the timer fired
    (``None``: unknown, its event's timestamp stands for it)."""


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """An event to put in an instance's inbox when a work item completes.

    An ``ExecutionStarted`` event creates the instance (a sub-orchestration, or the
    next execution after continue-as-new); any other event to an instance that does
    not exist is dropped.
    """

    instance_id: str
    event: HistoryEvent
    execution_id: str | None = None
    visible_at: datetime | None = None
    """Not delivered before this moment (timers); ``None`` means now."""


@dataclass(slots=True)
class ActivityTask:
    """An activity to run, as queued when its orchestration schedules it."""

    instance_id: str
    execution_id: str | None
    event: TaskScheduled
    """Its ``event_id`` is the task id the result refers to."""
    lock_token: str | None = None
    """Set by a worker that runs the task itself (an eager activity): the task is queued
    already leased with this token, until ``locked_until``."""
    locked_until: datetime | None = None


@dataclass(slots=True)
class OrchestrationWorkItem:
    """A locked orchestration instance with the new events it should process."""

    instance_id: str
    lock_token: str
    locked_until: datetime
    state: OrchestrationState
    messages: list[InboxMessage]
    history_size: int
    """How many events the instance's history holds (lets a cached executor skip loading it)."""
    history: list[HistoryEvent] | None = None
    """The history, once loaded (``Backend.load_history``)."""


@dataclass(slots=True)
class OrchestrationCheckpoint:
    """Everything completing one orchestration work item writes, in one transaction."""

    instance_id: str
    lock_token: str
    consumed: list[MessageId]
    """Inbox messages to delete."""
    new_history: list[HistoryEvent]
    """Events to append (or, with ``replace_history``, the whole new history)."""
    status: OrchestrationStatus
    execution_id: str | None
    input: str | None
    output: str | None
    custom_status: str | None
    failure_details: FailureDetails | None
    version: str | None
    completed_at: datetime | None
    updated_at: datetime
    replace_history: bool = False
    counts_on: bool = False
    """With ``replace_history``, for a rewind: the history's size counts on from the old one's
    instead of from 0, so that it only grows within an execution (see :meth:`history_size_after`)."""
    activity_tasks: list[ActivityTask] = field(default_factory=list)
    messages: list[OutboundMessage] = field(default_factory=list)
    finished_tasks: list[str] = field(default_factory=list)
    """Lock tokens of eager activity tasks whose results ``new_history`` records: the tasks
    still leased with those tokens are deleted."""
    keep_lease_for: timedelta | None = None
    """Keep the lease (extended by this much) instead of releasing it, unless visible
    inbox messages are left once ``consumed`` is deleted."""

    def history_size_after(self, previous_size: int) -> int:
        """The history's size once this checkpoint is committed: how many events have been
        written to it in this execution, which only grows. A worker's cached instance matches
        a work item by this size (:mod:`dtfx.worker.cache`): a rewind, which rewrites the history
        of the execution with fewer events, counts them on from the old size (``counts_on``),
        so that no cache holds an older state of that size."""
        if self.replace_history and not self.counts_on:
            return len(self.new_history)
        return previous_size + len(self.new_history)


class CommitResult(enum.IntEnum):
    """What committing one checkpoint did; false only when nothing was written."""

    LOST = 0
    """The lease was lost: nothing was written."""
    COMMITTED = 1
    """Written, and the lease released."""
    LEASE_KEPT = 2
    """Written, and the lease kept as ``keep_lease_for`` asked."""


@dataclass(slots=True)
class ActivityWorkItem:
    """A locked activity task."""

    id: MessageId | None
    """The backend's id of the task; ``None`` for an eager task, which its lock token identifies."""
    lock_token: str
    locked_until: datetime
    task: ActivityTask
    dequeue_count: int = 1


@dataclass(slots=True)
class ActivityResult:
    """Completing an activity: the result goes to the instance's inbox and the task is deleted."""

    work_item: ActivityWorkItem
    event: TaskCompleted | TaskFailed
