# ruff: noqa: N802 - RPC handlers carry the protocol's method names
"""The client side of the service: start, inspect and manage orchestration instances.

Every RPC maps onto :class:`dtfx.AsyncClient`, so an SDK client and a native one
behave the same. Payloads arrive as JSON text already; the client here passes
them through untouched (:data:`PAYLOADS_AS_IS`).
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator
from datetime import timedelta
from typing import Any, Protocol

from google.protobuf import wrappers_pb2

from dtfx.client import AsyncClient
from dtfx.core.errors import OrchestrationNotFoundError
from dtfx.core.history import EventRaised, OrchestrationStatus
from dtfx.core.instance_ids import check_orchestration_id
from dtfx.core.serialization import DataConverter
from dtfx.core.state import OrchestrationIdReusePolicy, OrchestrationQuery, OrchestrationState, PurgeResult
from dtfx.grpc.convert import (
    events_to_proto,
    optional_datetime,
    optional_string,
    optional_trace_context,
    state_to_proto,
    status_from_proto,
    string_value,
)
from dtfx.grpc.options import SidecarOptions
from dtfx.grpc.protos import pb
from dtfx.grpc.status import Context, invalid_argument, not_found, streaming, unary

MAX_PURGE_BATCH = 500
"""Most instance ids one ``PurgeInstances`` batch may name (the protocol's limit)."""

DEFAULT_PAGE_SIZE = 100
"""Page size of a query that asks for none."""


class _PayloadsAsIs(DataConverter):
    """Payloads over gRPC are serialized by the SDK already: keep them as they are."""

    def serialize(self, value: Any) -> str | None:
        return None if value is None else str(value)

    def deserialize(self, data: str | None, target_type: Any = None) -> Any:
        return data


PAYLOADS_AS_IS: DataConverter = _PayloadsAsIs()


class _InstanceRequest(Protocol):
    @property
    def instanceId(self) -> str: ...


def instance_id_of(request: _InstanceRequest, rpc: str) -> str:
    """The request's instance id, which must be given."""
    if not request.instanceId:
        raise invalid_argument(f"{rpc} needs an instanceId.")
    return request.instanceId


def _instance_response(state: OrchestrationState | None) -> pb.GetInstanceResponse:
    if state is None:
        return pb.GetInstanceResponse(exists=False)
    return pb.GetInstanceResponse(exists=True, orchestrationState=state_to_proto(state))


def _statuses(values: Any) -> list[OrchestrationStatus]:
    return [status_from_proto(value) for value in values]


def _purge_response(result: PurgeResult) -> pb.PurgeInstancesResponse:
    complete = None if result.is_complete is None else wrappers_pb2.BoolValue(value=result.is_complete)
    return pb.PurgeInstancesResponse(deletedInstanceCount=result.deleted_instance_count, isComplete=complete)


def page_size(requested: int, options: SidecarOptions) -> int:
    """The page size to use for a query that asked for ``requested`` (0: none)."""
    if requested < 0:
        raise invalid_argument(f"A page size cannot be negative ({requested}).")
    return min(requested or DEFAULT_PAGE_SIZE, options.max_page_size)


class InstanceRpcs:
    """The instance-management RPCs of ``TaskHubSidecarService``."""

    _client: AsyncClient
    _options: SidecarOptions

    # -- starting ------------------------------------------------------------------------------

    @unary
    async def StartInstance(self, request: pb.CreateInstanceRequest, context: Context) -> pb.CreateInstanceResponse:
        if not request.name:
            raise invalid_argument("StartInstance needs the name of the orchestration to start.")
        policy = None
        if request.HasField("orchestrationIdReusePolicy"):
            replaceable = _statuses(request.orchestrationIdReusePolicy.replaceableStatus)
            policy = OrchestrationIdReusePolicy(frozenset(replaceable))
        instance_id = await self._client.schedule_new_orchestration(
            request.name,
            input=optional_string(request, "input"),
            instance_id=request.instanceId or None,
            start_at=optional_datetime(request, "scheduledStartTimestamp"),
            reuse_id_policy=policy,
            tags=dict(request.tags) or None,
            version=optional_string(request, "version"),
            trace_context=optional_trace_context(request),
        )
        return pb.CreateInstanceResponse(instanceId=instance_id)

    # -- reading ---------------------------------------------------------------------------------

    @unary
    async def GetInstance(self, request: pb.GetInstanceRequest, context: Context) -> pb.GetInstanceResponse:
        instance_id = instance_id_of(request, "GetInstance")
        state = await self._client.get_orchestration_state(instance_id, fetch_payloads=request.getInputsAndOutputs)
        return _instance_response(state)

    @unary
    async def WaitForInstanceStart(self, request: pb.GetInstanceRequest, context: Context) -> pb.GetInstanceResponse:
        instance_id = instance_id_of(request, "WaitForInstanceStart")
        state = await self._client.wait_for_orchestration_start(
            instance_id, fetch_payloads=request.getInputsAndOutputs, timeout=_deadline(context)
        )
        return _instance_response(state)

    @unary
    async def WaitForInstanceCompletion(
        self, request: pb.GetInstanceRequest, context: Context
    ) -> pb.GetInstanceResponse:
        instance_id = instance_id_of(request, "WaitForInstanceCompletion")
        state = await self._client.wait_for_orchestration_completion(
            instance_id, fetch_payloads=request.getInputsAndOutputs, timeout=_deadline(context)
        )
        return _instance_response(state)

    @unary
    async def QueryInstances(self, request: pb.QueryInstancesRequest, context: Context) -> pb.QueryInstancesResponse:
        query = request.query
        page = await self._client.query_orchestrations(
            OrchestrationQuery(
                runtime_status=_statuses(query.runtimeStatus) or None,
                created_time_from=optional_datetime(query, "createdTimeFrom"),
                created_time_to=optional_datetime(query, "createdTimeTo"),
                instance_id_prefix=optional_string(query, "instanceIdPrefix") or None,
                max_instance_count=page_size(query.maxInstanceCount, self._options),
                fetch_inputs_and_outputs=query.fetchInputsAndOutputs,
            ),
            optional_string(query, "continuationToken") or None,
        )
        return pb.QueryInstancesResponse(
            orchestrationState=[state_to_proto(state) for state in page.items],
            continuationToken=string_value(page.continuation_token),
        )

    @unary
    async def ListInstanceIds(self, request: pb.ListInstanceIdsRequest, context: Context) -> pb.ListInstanceIdsResponse:
        page = await self._client.list_instance_ids(  # instances that have ended: other statuses match nothing
            _statuses(request.runtimeStatus) or None,
            optional_datetime(request, "completedTimeFrom"),
            optional_datetime(request, "completedTimeTo"),
            page_size(request.pageSize, self._options),
            optional_string(request, "lastInstanceKey") or None,
        )
        return pb.ListInstanceIdsResponse(instanceIds=page.items, lastInstanceKey=string_value(page.continuation_token))

    @streaming
    async def StreamInstanceHistory(
        self, request: pb.StreamInstanceHistoryRequest, context: Context
    ) -> AsyncGenerator[pb.HistoryChunk, None]:
        instance_id = instance_id_of(request, "StreamInstanceHistory")
        state = await self._client.get_orchestration_state(instance_id, fetch_payloads=False)
        if state is None:
            raise OrchestrationNotFoundError(instance_id)
        execution_id = optional_string(request, "executionId")
        if execution_id and execution_id != state.execution_id:
            raise not_found(
                f"Instance '{instance_id}' has no execution '{execution_id}' any more: "
                "only the history of its current execution is kept."
            )
        chunk: list[pb.HistoryEvent] = []
        size = 0
        limit = self._options.history_chunk_bytes
        for event in events_to_proto(await self._client.get_orchestration_history(instance_id)):
            event_size = event.ByteSize()
            if chunk and size + event_size > limit:  # a chunk goes before the event that would overfill it
                yield pb.HistoryChunk(events=chunk)
                chunk, size = [], 0
            chunk.append(event)
            size += event_size
        if chunk:
            yield pb.HistoryChunk(events=chunk)

    # -- acting --------------------------------------------------------------------------------

    @unary
    async def RaiseEvent(self, request: pb.RaiseEventRequest, context: Context) -> pb.RaiseEventResponse:
        instance_id = instance_id_of(request, "RaiseEvent")
        if not request.name:
            raise invalid_argument("RaiseEvent needs the event's name.")
        # Through the backend: the SDK's client made the event's span (the AsyncClient would make another).
        event = EventRaised(
            timestamp=self._client.backend.now(), name=request.name, input=optional_string(request, "input")
        )
        await self._client.backend.send_event(check_orchestration_id(instance_id), event)  # as the client's _send
        return pb.RaiseEventResponse()

    @unary
    async def TerminateInstance(self, request: pb.TerminateRequest, context: Context) -> pb.TerminateResponse:
        instance_id = instance_id_of(request, "TerminateInstance")
        output = optional_string(request, "output")
        if output is not None and "\x00" in output:  # it becomes the instance's output, kept as text
            raise invalid_argument("TerminateInstance: the output holds a NUL character, which no task hub stores.")
        await self._client.terminate_orchestration(instance_id, output=output, recursive=request.recursive)
        return pb.TerminateResponse()

    @unary
    async def SuspendInstance(self, request: pb.SuspendRequest, context: Context) -> pb.SuspendResponse:
        instance_id = instance_id_of(request, "SuspendInstance")
        await self._client.suspend_orchestration(instance_id, reason=optional_string(request, "reason"))
        return pb.SuspendResponse()

    @unary
    async def ResumeInstance(self, request: pb.ResumeRequest, context: Context) -> pb.ResumeResponse:
        instance_id = instance_id_of(request, "ResumeInstance")
        await self._client.resume_orchestration(instance_id, reason=optional_string(request, "reason"))
        return pb.ResumeResponse()

    @unary
    async def RestartInstance(self, request: pb.RestartInstanceRequest, context: Context) -> pb.RestartInstanceResponse:
        instance_id = instance_id_of(request, "RestartInstance")
        new_id = await self._client.restart_orchestration(
            instance_id, restart_with_new_instance_id=request.restartWithNewInstanceId
        )
        return pb.RestartInstanceResponse(instanceId=new_id)

    @unary
    async def RewindInstance(self, request: pb.RewindInstanceRequest, context: Context) -> pb.RewindInstanceResponse:
        instance_id = instance_id_of(request, "RewindInstance")
        await self._client.rewind_orchestration(instance_id, reason=optional_string(request, "reason"))
        return pb.RewindInstanceResponse()

    @unary
    async def PurgeInstances(self, request: pb.PurgeInstancesRequest, context: Context) -> pb.PurgeInstancesResponse:
        target = request.WhichOneof("request")
        if target == "instanceId":
            instance_id = instance_id_of(request, "PurgeInstances")
            return _purge_response(await self._client.purge_orchestration(instance_id, recursive=request.recursive))
        if target == "instanceBatch":
            instance_ids = list(request.instanceBatch.instanceIds)
            if len(instance_ids) > MAX_PURGE_BATCH:
                raise invalid_argument(
                    f"A purge batch names at most {MAX_PURGE_BATCH} instances, not {len(instance_ids)}."
                )
            if not all(instance_ids):
                raise invalid_argument("A purge batch cannot name an empty instance id.")
            deleted = 0
            for instance_id in dict.fromkeys(instance_ids):
                deleted += (
                    await self._client.purge_orchestration(instance_id, request.recursive)
                ).deleted_instance_count
            return _purge_response(PurgeResult(deleted))
        if target == "purgeInstanceFilter":
            return _purge_response(await self._purge_by_filter(request.purgeInstanceFilter, request.recursive))
        raise invalid_argument("PurgeInstances needs an instanceId, an instanceBatch or a purgeInstanceFilter.")

    async def _purge_by_filter(self, purge_filter: pb.PurgeInstanceFilter, recursive: bool) -> PurgeResult:
        return await self._client.purge_orchestrations_by(
            optional_datetime(purge_filter, "createdTimeFrom"),
            optional_datetime(purge_filter, "createdTimeTo"),
            _statuses(purge_filter.runtimeStatus) or None,
            recursive,
            _timeout(purge_filter) if purge_filter.HasField("timeout") else None,
        )


def _timeout(purge_filter: pb.PurgeInstanceFilter) -> timedelta:
    """The filter's timeout; one beyond what a ``timedelta`` holds (about 2.7 million years) is refused."""
    try:
        return purge_filter.timeout.ToTimedelta()
    except OverflowError:
        raise invalid_argument(f"The purge's timeout of {purge_filter.timeout.seconds} s is out of range.") from None


def _deadline(context: Context) -> float:
    """Seconds until the client's deadline (a long poll without one waits until the client goes)."""
    remaining = context.time_remaining()
    return math.inf if remaining is None else max(0.0, remaining)
