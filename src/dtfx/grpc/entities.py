# ruff: noqa: N802 - RPC handlers carry the protocol's method names
"""The client side of durable entities: signal, read, query and clean up entities.

Every RPC maps onto :class:`dtfx.AsyncClient`, as the instance RPCs do; a signal
keeps the request id its caller gave it.
"""

from __future__ import annotations

from dtfx.client import AsyncClient
from dtfx.core.entities import EntityQuery
from dtfx.grpc.convert import (
    entity_id_from_proto,
    entity_metadata_to_proto,
    optional_datetime,
    optional_string,
    optional_trace_context,
    string_value,
)
from dtfx.grpc.instances import page_size
from dtfx.grpc.options import SidecarOptions
from dtfx.grpc.protos import pb
from dtfx.grpc.status import Context, invalid_argument, unary


class EntityRpcs:
    """The entity RPCs of ``TaskHubSidecarService``."""

    _client: AsyncClient
    _options: SidecarOptions

    @unary
    async def SignalEntity(self, request: pb.SignalEntityRequest, context: Context) -> pb.SignalEntityResponse:
        entity_id = entity_id_from_proto(request.instanceId, "SignalEntity")
        if not request.name:
            raise invalid_argument("SignalEntity needs the name of the operation.")
        await self._client.signal_entity(
            entity_id,
            request.name,
            optional_string(request, "input"),
            optional_datetime(request, "scheduledTime"),
            request_id=request.requestId or None,
            trace_context=optional_trace_context(request),
        )
        return pb.SignalEntityResponse()

    @unary
    async def GetEntity(self, request: pb.GetEntityRequest, context: Context) -> pb.GetEntityResponse:
        entity_id = entity_id_from_proto(request.instanceId, "GetEntity")
        metadata = await self._client.get_entity(entity_id, include_state=request.includeState)
        if metadata is None:  # no state and no lock: as if it did not exist
            return pb.GetEntityResponse(exists=False)
        return pb.GetEntityResponse(exists=True, entity=entity_metadata_to_proto(metadata))

    @unary
    async def QueryEntities(self, request: pb.QueryEntitiesRequest, context: Context) -> pb.QueryEntitiesResponse:
        query = request.query
        requested = query.pageSize.value if query.HasField("pageSize") else 0
        page = await self._client.query_entities(
            EntityQuery(
                instance_id_starts_with=optional_string(query, "instanceIdStartsWith") or None,
                last_modified_from=optional_datetime(query, "lastModifiedFrom"),
                last_modified_to=optional_datetime(query, "lastModifiedTo"),
                include_state=query.includeState,
                include_transient=query.includeTransient,
                page_size=page_size(requested, self._options),
            ),
            optional_string(query, "continuationToken") or None,
        )
        return pb.QueryEntitiesResponse(
            entities=[entity_metadata_to_proto(metadata) for metadata in page.items],
            continuationToken=string_value(page.continuation_token),
        )

    @unary
    async def CleanEntityStorage(
        self, request: pb.CleanEntityStorageRequest, context: Context
    ) -> pb.CleanEntityStorageResponse:
        if optional_string(request, "continuationToken"):
            raise invalid_argument(
                "CleanEntityStorage got a continuation token, but dtfx never issues one: "
                "a single call cleans every entity."
            )
        result = await self._client.clean_entity_storage(
            remove_empty_entities=request.removeEmptyEntities, release_orphaned_locks=request.releaseOrphanedLocks
        )
        return pb.CleanEntityStorageResponse(
            emptyEntitiesRemoved=result.empty_entities_removed, orphanedLocksReleased=result.orphaned_locks_released
        )
