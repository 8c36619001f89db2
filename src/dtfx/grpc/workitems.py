# ruff: noqa: N802 - RPC handlers carry the protocol's method names
"""The worker side of the service: the ``GetWorkItems`` stream, and completing or abandoning work items.

A completion is honoured once, by its token (see :mod:`dtfx.grpc.hub`); a retry
of an accepted completion is accepted again. A completion the server cannot read
(an unknown action, a response for another instance) is answered
``INVALID_ARGUMENT`` and its work item is given back to be dispatched again, so a
misbehaving worker never loses an instance. A completion over the size limit fails the
work it carries and is answered ``RESOURCE_EXHAUSTED`` (see :mod:`dtfx.grpc.sizes`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from datetime import datetime
from typing import Any

import grpc
from dtfx.backends.base import Backend, WorkKind
from dtfx.core.entities import BatchResult
from dtfx.core.history import TaskCompleted, TaskFailed
from dtfx.grpc.convert import (
    InvalidMessageError,
    actions_from_proto,
    batch_result_from_proto,
    failure_from_proto,
    optional_span,
    optional_string,
)
from dtfx.grpc.hub import DispatchedWorkItem, Outcome, WorkerHub
from dtfx.grpc.options import SidecarOptions
from dtfx.grpc.protos import pb
from dtfx.grpc.sizes import too_large, too_large_failure, too_large_in_parts
from dtfx.grpc.status import Context, RpcStatusError, streaming, unary, unary_any_size
from dtfx.worker.orchestrations import Abandon, EpisodeOutcome, failed_episode


class WorkItemRpcs:
    """The work-item RPCs of ``TaskHubSidecarService``."""

    _backend: Backend
    _hub: WorkerHub
    _options: SidecarOptions

    @streaming
    async def GetWorkItems(
        self, request: pb.GetWorkItemsRequest, context: Context
    ) -> AsyncGenerator[pb.WorkItem, None]:
        connection = self._hub.connect(request)
        try:
            async for work_item in connection.work_items(self._options.health_ping_interval.total_seconds()):
                yield work_item
        finally:
            self._hub.disconnect(connection)

    @unary_any_size
    async def CompleteOrchestratorTask(
        self, request: pb.OrchestratorResponse, context: Context
    ) -> pb.CompleteTaskResponse:
        item = self._hub.lookup(request.completionToken, WorkKind.ORCHESTRATION, completing=True)
        if item is None:
            return pb.CompleteTaskResponse()
        self._refuse_oversized(item, request)
        try:
            _check_instance(item, request.instanceId)
            actions = actions_from_proto(request.actions, item.instance_id, self._backend.now())
            span = optional_span(request)
        except InvalidMessageError as error:
            self._give_back(item, error)
            raise
        index = request.chunkIndex.value if request.HasField("chunkIndex") else len(item.partial_actions)
        if request.isPartial or item.partial_actions:  # a large response in chunks (.NET)
            item.part_sizes[index] = request.ByteSize()
            self._refuse_too_large_in_parts(item)
        if request.isPartial:  # kept until the last one
            item.partial_actions[index] = actions
            return pb.CompleteTaskResponse()
        earlier = [action for _, chunk in sorted(item.partial_actions.items()) for action in chunk]
        status = optional_string(request, "customStatus")
        self._hub.finish(item, EpisodeOutcome(earlier + actions, status, span=span))
        return pb.CompleteTaskResponse()

    @unary_any_size
    async def CompleteActivityTask(self, request: pb.ActivityResponse, context: Context) -> pb.CompleteTaskResponse:
        return self._complete(
            request.completionToken,
            WorkKind.ACTIVITY,
            request,
            lambda item: _activity_result(item, request, self._backend.now()),
        )

    @unary_any_size
    async def CompleteEntityTask(self, request: pb.EntityBatchResult, context: Context) -> pb.CompleteTaskResponse:
        return self._complete(
            request.completionToken, WorkKind.ENTITY, request, lambda item: _batch_result(item, request)
        )

    def _complete(
        self, token: str, kind: WorkKind, request: Any, read: Callable[[DispatchedWorkItem], Outcome]
    ) -> pb.CompleteTaskResponse:
        """Finish the work item of ``token`` with what ``read`` makes of the worker's response."""
        item = self._hub.lookup(token, kind, completing=True)
        if item is not None:
            self._refuse_oversized(item, request)
            try:
                outcome = read(item)
            except InvalidMessageError as error:
                self._give_back(item, error)
                raise
            self._hub.finish(item, outcome)
        return pb.CompleteTaskResponse()

    @unary
    async def AbandonTaskOrchestratorWorkItem(
        self, request: pb.AbandonOrchestrationTaskRequest, context: Context
    ) -> pb.AbandonOrchestrationTaskResponse:
        self._abandon(request.completionToken, WorkKind.ORCHESTRATION)
        return pb.AbandonOrchestrationTaskResponse()

    @unary
    async def AbandonTaskActivityWorkItem(
        self, request: pb.AbandonActivityTaskRequest, context: Context
    ) -> pb.AbandonActivityTaskResponse:
        self._abandon(request.completionToken, WorkKind.ACTIVITY)
        return pb.AbandonActivityTaskResponse()

    @unary
    async def AbandonTaskEntityWorkItem(
        self, request: pb.AbandonEntityTaskRequest, context: Context
    ) -> pb.AbandonEntityTaskResponse:
        self._abandon(request.completionToken, WorkKind.ENTITY)
        return pb.AbandonEntityTaskResponse()

    def _abandon(self, token: str, kind: WorkKind) -> None:
        item = self._hub.lookup(token, kind, completing=False)
        if item is not None:
            self._hub.finish(item, Abandon(self._options.abandon_retry_delay), reason="the worker abandoned it")

    def _refuse_oversized(self, item: DispatchedWorkItem, response: Any) -> None:
        """Fail the work of ``item`` if the worker's ``response`` is over the size limit, and
        refuse the response (see :mod:`dtfx.grpc.sizes`)."""
        limit = self._options.max_message_bytes
        size: int = response.ByteSize()
        if size <= limit:
            return
        outcome: Outcome
        if item.kind is WorkKind.ORCHESTRATION:
            what, failed = f"The orchestrator's response for instance '{item.instance_id}'", "orchestration"
            outcome = failed_episode(too_large_failure(what, size, limit))
        elif item.kind is WorkKind.ACTIVITY:
            assert item.task_id is not None
            what, failed = f"The result of activity task {item.task_id} of instance '{item.instance_id}'", "task"
            failure = too_large_failure(what, size, limit)
            outcome = TaskFailed(timestamp=self._backend.now(), task_scheduled_id=item.task_id, failure_details=failure)
        else:
            assert item.entity_batch is not None
            what, failed = f"The result of a batch of entity '{item.instance_id}'", "batch's operations"
            failure = too_large_failure(what, size, limit)
            outcome = BatchResult.failing(item.entity_batch.state, item.entity_batch.operations, failure)
        self._hub.finish(item, outcome)
        raise RpcStatusError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"{too_large(what, size, limit)} The {failed} failed with it."
        )

    def _refuse_too_large_in_parts(self, item: DispatchedWorkItem) -> None:
        """Fail the orchestration of ``item`` if the parts of its response so far add up to
        more than ``max_response_bytes`` (or one message, if that is larger), and refuse the part."""
        options = self._options
        limit, option = max(
            (options.max_response_bytes, "max_response_bytes"), (options.max_message_bytes, "max_message_bytes")
        )
        size = sum(item.part_sizes.values())
        if size <= limit:
            return
        what = f"The orchestrator's response for instance '{item.instance_id}'"
        failure = too_large_in_parts(what, size, limit, option)
        self._hub.finish(item, failed_episode(failure))
        raise RpcStatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{failure.message} The orchestration failed with it.")

    def _give_back(self, item: DispatchedWorkItem, error: InvalidMessageError) -> None:
        self._hub.finish(
            item, Abandon(self._options.abandon_retry_delay), reason=f"its completion was malformed: {error}"
        )


def _activity_result(
    item: DispatchedWorkItem, response: pb.ActivityResponse, now: datetime
) -> TaskCompleted | TaskFailed:
    _check_instance(item, response.instanceId)
    assert item.task_id is not None
    if response.taskId != item.task_id:
        raise InvalidMessageError(
            f"The response is for task {response.taskId}, but the work item is task {item.task_id}."
        )
    # HasField, not the message text: an exception with an empty message is still a failure.
    if response.HasField("failureDetails"):
        failure = failure_from_proto(response.failureDetails)
        return TaskFailed(timestamp=now, task_scheduled_id=item.task_id, failure_details=failure)
    output = optional_string(response, "result")
    return TaskCompleted(timestamp=now, task_scheduled_id=item.task_id, result=output)


def _batch_result(item: DispatchedWorkItem, result: pb.EntityBatchResult) -> BatchResult:
    assert item.entity_batch is not None
    return batch_result_from_proto(result, item.entity_batch.state, item.entity_batch.operations)


def _check_instance(item: DispatchedWorkItem, instance_id: str) -> None:
    if instance_id and instance_id != item.instance_id:
        raise InvalidMessageError(
            f"The response is for instance '{instance_id}', but its completion token belongs to '{item.instance_id}'."
        )
