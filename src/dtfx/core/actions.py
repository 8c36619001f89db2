"""Orchestrator actions: what an orchestrator asks the engine to do in one episode.

Every executor (the local replay engine, a remote SDK worker over gRPC) produces
these; :mod:`dtfx.core.apply` is the one place that turns them into history events
and outbound messages. They mirror the protocol's ``OrchestratorAction``.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from dtfx.core.history import FailureDetails, HistoryEvent, OrchestrationStatus, TraceContext


class OrchestratorAction(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every action; ``id`` becomes the event id of the history event it creates."""

    id: int


class ScheduleTask(OrchestratorAction, frozen=True, kw_only=True):
    name: str
    version: str | None = None
    input: str | None = None
    tags: dict[str, str] | None = None
    trace_context: TraceContext | None = None


class CreateSubOrchestration(OrchestratorAction, frozen=True, kw_only=True):
    instance_id: str
    name: str
    version: str | None = None
    input: str | None = None
    tags: dict[str, str] | None = None
    trace_context: TraceContext | None = None


class CreateTimer(OrchestratorAction, frozen=True, kw_only=True):
    fire_at: datetime
    retry_of: int | None = None


class SendEvent(OrchestratorAction, frozen=True, kw_only=True):
    instance_id: str
    name: str
    data: str | None = None


class CompleteOrchestration(OrchestratorAction, frozen=True, kw_only=True):
    status: OrchestrationStatus
    result: str | None = None
    failure_details: FailureDetails | None = None
    new_version: str | None = None
    carryover_events: list[HistoryEvent] = msgspec.field(default_factory=list)


class TerminateOrchestration(OrchestratorAction, frozen=True, kw_only=True):
    instance_id: str
    reason: str | None = None
    recurse: bool = False


class RewindOrchestration(OrchestratorAction, frozen=True, kw_only=True):
    """Replace the history of a failed instance with ``new_history`` and run it again."""

    new_history: list[HistoryEvent]


class SendEntityMessage(OrchestratorAction, frozen=True, kw_only=True):
    """An entity operation signal, call, lock request or unlock, as a history event."""

    event: HistoryEvent
