# ruff: noqa: N802 - RPC handlers carry the protocol's method names
"""The client side of durable entities: signal, read, query and clean up entities.

Reading maps onto :class:`dtfx.AsyncClient`, as the instance RPCs do. A signal is
put in the entity's inbox here, because the protocol's request carries what the
native API does not take: the caller's own request id.
"""

from __future__ import annotations

import uuid

from dtfx.backends.base import Backend, utc_now
from dtfx.client import AsyncClient
from dtfx.core.entities import EntityQuery
from dtfx.core.history import EntityOperationSignaled
from dtfx.grpc.convert import (
    entity_id_from_proto,
    entity_metadata_to_proto,
    optional_datetime,
    optional_string,
    string_value,
)
from dtfx.grpc.instances import page_size
from dtfx.grpc.options import SidecarOptions
from dtfx.grpc.protos import pb
from dtfx.grpc.status import Context, invalid_argument, unary


class EntityRpcs:
    """The entity RPCs of ``TaskHubSidecarService``."""

    _backend: Backend
    _client: AsyncClient
    _options: SidecarOptions

    @unary
    async def SignalEntity(self, request: pb.SignalEntityRequest, context: Context) -> pb.SignalEntityResponse:
        target = str(entity_id_from_proto(request.instanceId, "SignalEntity"))
        if not request.name:
            raise invalid_argument("SignalEntity needs the name of the operation.")
        scheduled = optional_datetime(request, "scheduledTime")
        signal = EntityOperationSignaled(
            timestamp=utc_now(),
            request_id=request.requestId or uuid.uuid4().hex,
            operation=request.name,
            target_instance_id=target,
            input=optional_string(request, "input"),
            scheduled_time=scheduled,
        )
        await self._backend.send_event(target, signal, visible_at=scheduled)
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
