"""The sidecar protocol's generated modules, as shipped by the official ``durabletask`` package.

dtfx does not carry its own copy of the ``.proto`` file: it imports the modules
generated from it that ``durabletask`` (pinned by the ``grpc`` extra) ships, so
both sides of the wire always agree.
"""

from __future__ import annotations

from dtfx.core.errors import ConfigurationError

try:
    from durabletask.internal import orchestrator_service_pb2 as pb
    from durabletask.internal import orchestrator_service_pb2_grpc as pb_grpc

    import grpc  # noqa: F401 - checked here so that a missing grpcio gets the same message
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ConfigurationError(f"gRPC support needs `pip install 'dtfx[grpc]'` ({error})") from error

__all__ = ["pb", "pb_grpc"]
