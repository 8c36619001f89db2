# ruff: noqa: N802 - RPC handlers carry the protocol's method names
"""``TaskHubSidecarService``: every RPC of the Durable Task sidecar protocol.

The instance RPCs live in :mod:`dtfx.grpc.instances`, the entity RPCs in
:mod:`dtfx.grpc.entities`, the work-item RPCs in :mod:`dtfx.grpc.workitems`; this
class puts them together with the task-hub RPCs and answers those dtfx does not
offer with ``UNIMPLEMENTED``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2

from dtfx.backends.base import Backend
from dtfx.client import AsyncClient
from dtfx.grpc.entities import EntityRpcs
from dtfx.grpc.hub import WorkerHub
from dtfx.grpc.instances import PAYLOADS_AS_IS, InstanceRpcs
from dtfx.grpc.options import SidecarOptions
from dtfx.grpc.protos import pb, pb_grpc
from dtfx.grpc.status import Context, unary, unimplemented
from dtfx.grpc.workitems import WorkItemRpcs


class SidecarService(InstanceRpcs, EntityRpcs, WorkItemRpcs, pb_grpc.TaskHubSidecarServiceServicer):
    """The service over one backend: instance and entity RPCs through an :class:`~dtfx.AsyncClient`,
    work items through the hub the server's dispatchers feed."""

    def __init__(self, backend: Backend, hub: WorkerHub, options: SidecarOptions) -> None:
        self._backend = backend
        self._client = AsyncClient(backend, data_converter=PAYLOADS_AS_IS)
        self._hub = hub
        self._options = options

    @unary
    async def Hello(self, request: empty_pb2.Empty, context: Context) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    # -- task hub ------------------------------------------------------------------------------

    @unary
    async def CreateTaskHub(self, request: pb.CreateTaskHubRequest, context: Context) -> pb.CreateTaskHubResponse:
        if request.recreateIfExists:
            raise unimplemented(
                "CreateTaskHub with recreateIfExists is not supported: dtfx cannot drop a task hub "
                "(its running instances included); delete the database instead."
            )
        await self._backend.start()  # creates the schema if needed; idempotent
        return pb.CreateTaskHubResponse()

    @unary
    async def DeleteTaskHub(self, request: pb.DeleteTaskHubRequest, context: Context) -> pb.DeleteTaskHubResponse:
        raise unimplemented(
            "DeleteTaskHub is not supported: dtfx cannot drop a task hub (its running instances included); "
            "purge ended instances with PurgeInstances, or delete the database."
        )

    @unary
    async def SkipGracefulOrchestrationTerminations(self, request: Any, context: Context) -> Any:
        raise unimplemented("SkipGracefulOrchestrationTerminations is not supported; use TerminateInstance.")
