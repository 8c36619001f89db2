"""Running orchestrator, activity and entity code on SDK workers connected over gRPC.

:class:`RemoteEpisodeRunner`, :class:`RemoteActivityRunner` and
:class:`RemoteEntityRunner` are the remote counterparts of the worker's local
runners: the same processors plan, apply and commit the work item; these only
turn it into an ``OrchestratorRequest``, ``ActivityRequest`` or entity request,
send it on the stream of the connection it was locked for, and wait for the
worker's answer (see :mod:`dtfx.grpc.hub`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from dtfx.backends.base import Backend
from dtfx.core.entities import BatchPlan, BatchResult, OperationRequest
from dtfx.core.history import (
    ExecutionStarted,
    HistoryEvent,
    OrchestrationSpan,
    OrchestratorStarted,
    TaskCompleted,
    TaskFailed,
)
from dtfx.core.workitems import ActivityWorkItem, OrchestrationCheckpoint, OrchestrationWorkItem
from dtfx.grpc.connections import WorkerConnection
from dtfx.grpc.convert import (
    entity_batch_request_to_proto,
    entity_request_to_proto,
    events_to_proto,
    span_to_proto,
    string_value,
    trace_context_to_proto,
)
from dtfx.grpc.hub import DispatchedWorkItem, EntityBatch, Outcome, WorkerHub
from dtfx.grpc.protos import pb
from dtfx.grpc.sizes import oversized_work_item, too_large_failure
from dtfx.worker.cache import InstanceCache
from dtfx.worker.leases import Lease, keep_orchestration_lease
from dtfx.worker.orchestrations import Abandon, EpisodeOutcome, failed_episode


async def _answer(hub: WorkerHub, item: DispatchedWorkItem) -> Outcome:
    """Wait for the worker's answer; a wait that ends otherwise (shutdown) gives the work item up."""
    try:
        return await item.outcome
    finally:
        hub.finish(item, Abandon(), reason="the server stopped waiting for it")


async def _answer_keeping_lease(
    backend: Backend, hub: WorkerHub, item: OrchestrationWorkItem, dispatched: DispatchedWorkItem, lease: timedelta
) -> Outcome:
    """:func:`_answer`, renewing the lease of the orchestration work item meanwhile."""
    async with keep_orchestration_lease(backend, item, lease, f"Orchestration {item.instance_id}"):
        return await _answer(hub, dispatched)


@dataclass
class SentHistory:
    """The history of an instance as last sent to an SDK worker, with what it must match to be reused."""

    started: ExecutionStarted
    events: bytes
    """The events, encoded as an ``OrchestratorRequest`` that holds only its ``pastEvents``:
    a twentieth of the memory of the messages, and merged into the next request by
    protobuf's parser (a message's encodings concatenated are the encoding of its merge)."""
    span: OrchestrationSpan | None
    """The execution's span, as its worker last reported it."""
    execution_id: str | None
    history_size: int


class RemoteEpisodeRunner:
    """Runs orchestration episodes on SDK workers (an :class:`~dtfx.worker.orchestrations.EpisodeRunner`).

    Every ``OrchestratorRequest`` carries the instance's whole history. The runner keeps
    the history it sent, encoded, for the ``cached_instances`` instances it ran last, and
    adds each committed episode's events to it: the next episode of such an instance
    neither reads the history from the store nor converts it again.
    """

    def __init__(
        self,
        backend: Backend,
        hub: WorkerHub,
        *,
        lease_duration: timedelta,
        retry_delay: timedelta,
        max_message_bytes: int,
        cached_instances: int = 0,
    ) -> None:
        self._backend = backend
        self._hub = hub
        self._lease_duration = lease_duration
        self._retry_delay = retry_delay
        self._max_message_bytes = max_message_bytes
        self._cache = InstanceCache[SentHistory](cached_instances)
        self._running: dict[str, SentHistory] = {}
        """The histories sent for the episodes out with workers, by instance id (without the new events)."""

    def cached_start(self, item: OrchestrationWorkItem) -> ExecutionStarted | None:
        entry = self._cache.lookup(item)
        return entry.started if entry is not None else None

    async def run(
        self,
        item: OrchestrationWorkItem,
        started: ExecutionStarted,
        past_events: Sequence[HistoryEvent] | None,
        new_events: list[HistoryEvent],
    ) -> EpisodeOutcome | Abandon:
        connection = self._hub.worker_for(item.lock_token, started.name, item.state.version)
        if connection is None:  # no open stream asked for this version: leave it for later
            return Abandon(self._retry_delay)
        sent = self._cache.lookup(item) if past_events is None else None
        if sent is None:
            if past_events is None:  # evicted since cached_start said otherwise
                past_events = await self._backend.get_history(item.instance_id) if item.history_size else []
            sent = SentHistory(
                started,
                _encoded(past_events),
                _execution_span(past_events),
                item.state.execution_id,
                item.history_size,
            )
        # The plan's new events start with OrchestratorStarted and hold nothing internal
        # (the wake-up GenericEvent after a rewind is dropped by plan_episode).
        request = pb.OrchestratorRequest(
            instanceId=item.instance_id,
            executionId=string_value(item.state.execution_id),
            newEvents=events_to_proto(new_events),
            orchestrationTraceContext=span_to_proto(sent.span),
        )
        size = oversized_work_item(request, self._max_message_bytes, more=len(sent.events))
        if size is not None:
            what = f"The work item of orchestration '{item.instance_id}' (its history and new events)"
            return failed_episode(too_large_failure(what, size, self._max_message_bytes, history=True))
        request.MergeFromString(sent.events)  # its pastEvents
        self._running[item.instance_id] = sent
        dispatched = self._hub.dispatch(connection, pb.WorkItem(orchestratorRequest=request), item.instance_id)
        outcome = await _answer_keeping_lease(self._backend, self._hub, item, dispatched, self._lease_duration)
        if not isinstance(outcome, EpisodeOutcome | Abandon):
            raise TypeError(f"An orchestration work item came back as {type(outcome).__name__}")
        if isinstance(outcome, EpisodeOutcome) and outcome.span == sent.span:  # recorded already
            outcome = dataclasses.replace(outcome, span=None)
        return outcome

    def finished(
        self, item: OrchestrationWorkItem, checkpoint: OrchestrationCheckpoint | None, committed: bool
    ) -> None:
        sent = self._running.pop(item.instance_id, None)
        if sent is None or checkpoint is None or not committed:
            self._cache.evict(item.instance_id)
        elif self._cache.keep(item, sent, checkpoint):
            sent.events += _encoded(checkpoint.new_history)
            sent.span = _execution_span(checkpoint.new_history) or sent.span


def _encoded(events: Sequence[HistoryEvent]) -> bytes:
    """``events`` as the encoding of an ``OrchestratorRequest`` with them as its ``pastEvents``."""
    encoded: bytes = pb.OrchestratorRequest(pastEvents=events_to_proto(events)).SerializeToString()
    return encoded


def _execution_span(past_events: Sequence[HistoryEvent]) -> OrchestrationSpan | None:
    """The execution's span as its worker last reported it (recorded on an episode's start)."""
    for event in reversed(past_events):
        if isinstance(event, OrchestratorStarted) and event.span is not None:
            return event.span
    return None


class RemoteActivityRunner:
    """Runs activities on SDK workers (an :class:`~dtfx.worker.activities.ActivityRunner`)."""

    def __init__(self, backend: Backend, hub: WorkerHub, *, retry_delay: timedelta, max_message_bytes: int) -> None:
        self._backend = backend
        self._hub = hub
        self._retry_delay = retry_delay
        self._max_message_bytes = max_message_bytes

    async def run(self, item: ActivityWorkItem, lease: Lease | None = None) -> TaskCompleted | TaskFailed | Abandon:
        scheduled = item.task.event  # sent at once: none waits for a thread here
        connection = self._hub.worker_for(item.lock_token, scheduled.name, scheduled.version)
        if connection is None:
            return Abandon(self._retry_delay)
        request = pb.ActivityRequest(
            name=scheduled.name,
            version=string_value(scheduled.version),
            input=string_value(scheduled.input),
            orchestrationInstance=pb.OrchestrationInstance(
                instanceId=item.task.instance_id, executionId=string_value(item.task.execution_id)
            ),
            taskId=scheduled.event_id,
            parentTraceContext=trace_context_to_proto(scheduled.trace_context),
            tags=scheduled.tags,
        )
        size = oversized_work_item(request, self._max_message_bytes)
        if size is not None:
            what = f"The work item of activity task {scheduled.event_id} of instance '{item.task.instance_id}'"
            failure = too_large_failure(what, size, self._max_message_bytes)
            now = self._backend.now()
            return TaskFailed(timestamp=now, task_scheduled_id=scheduled.event_id, failure_details=failure)
        dispatched = self._hub.dispatch(
            connection, pb.WorkItem(activityRequest=request), item.task.instance_id, scheduled.event_id
        )
        outcome = await _answer(self._hub, dispatched)
        if not isinstance(outcome, TaskCompleted | TaskFailed | Abandon):
            raise TypeError(f"An activity work item came back as {type(outcome).__name__}")
        return outcome


class RemoteEntityRunner:
    """Runs entity batches on SDK workers (an :class:`~dtfx.worker.entities.EntityRunner`).

    A batch goes out as ``EntityRequest`` (V2: the operations as the history events
    they arrived as), or as the older ``EntityBatchRequest`` if ``legacy_requests``.
    The Python SDK reads both (it looks at which of the two the work item holds); the
    results are matched to the operations by position either way.
    """

    def __init__(
        self,
        hub: WorkerHub,
        *,
        retry_delay: timedelta,
        max_message_bytes: int,
        legacy_requests: bool = False,
    ) -> None:
        self._hub = hub
        self._retry_delay = retry_delay
        self._max_message_bytes = max_message_bytes
        self._legacy_requests = legacy_requests

    async def run(self, item: OrchestrationWorkItem, plan: BatchPlan) -> BatchResult | Abandon:
        connection = self._hub.worker_for(item.lock_token, plan.entity_id.entity, None)
        if connection is None:
            return Abandon(self._retry_delay)
        return await self._run_in_parts(connection, item, item.state.serialized_output, plan.operations)

    async def _run_in_parts(
        self,
        connection: WorkerConnection,
        item: OrchestrationWorkItem,
        state: str | None,
        operations: Sequence[OperationRequest],
    ) -> BatchResult | Abandon:
        """Run ``operations`` on ``state`` as one work item, or, if that is too large to send,
        as two halves one after the other (an operation too large on its own fails)."""
        if self._legacy_requests:
            work_item = pb.WorkItem(entityRequest=entity_batch_request_to_proto(item.instance_id, state, operations))
        else:
            request = entity_request_to_proto(item.instance_id, item.state.execution_id, state, operations)
            work_item = pb.WorkItem(entityRequestV2=request)
        size = oversized_work_item(work_item, self._max_message_bytes)
        if size is not None:
            if len(operations) == 1:
                what = f"The work item of entity '{item.instance_id}' (its state and an operation)"
                return BatchResult.failing(state, operations, too_large_failure(what, size, self._max_message_bytes))
            half = len(operations) // 2
            first = await self._run_in_parts(connection, item, state, operations[:half])
            if isinstance(first, Abandon):
                return first
            rest = await self._run_in_parts(connection, item, first.state, operations[half:])
            if isinstance(rest, Abandon):
                return rest
            return BatchResult(rest.state, first.results + rest.results, first.actions + rest.actions)
        dispatched = self._hub.dispatch(
            connection, work_item, item.instance_id, entity_batch=EntityBatch(state, operations)
        )
        outcome = await _answer(self._hub, dispatched)  # the processor keeps the lease meanwhile
        if not isinstance(outcome, BatchResult | Abandon):
            raise TypeError(f"An entity work item came back as {type(outcome).__name__}")
        return outcome
