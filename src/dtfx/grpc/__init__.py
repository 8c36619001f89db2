"""The Durable Task sidecar protocol over dtfx.

Workers and clients written with the official Durable Task SDKs (Python, .NET,
JavaScript, Java, ...) connect to a :class:`SidecarServer` exactly as to their own
sidecar, and share its task hub with native :class:`dtfx.Worker` s. Needs the
``grpc`` extra (``pip install 'dtfx[grpc]'``); ``import dtfx`` does not load this
package, and this package loads gRPC only when :class:`SidecarServer` is used.

Run it from the command line (SQLite by default, insecure on localhost)::

    dtfx serve --grpc-port 4001 [--backend URL] [--host 0.0.0.0]
               [--tls-cert cert.pem --tls-key key.pem [--tls-client-ca ca.pem]]

or embed it::

    with SidecarServer("sqlite:///taskhub.db", port=4001):
        ...  # TaskHubGrpcWorker(host_address="localhost:4001") and TaskHubGrpcClient connect here

What an SDK gets:

* every client RPC (start with reuse policy, scheduled start, version and tags; get,
  wait for start / completion until the call's deadline; raise, terminate (recursive),
  suspend, resume, restart, rewind; query and list ids with paging; purge by id,
  filter or batch, recursive; the history as a stream), mapped onto :class:`dtfx.AsyncClient`;
* ``GetWorkItems`` streams with health pings, the worker's concurrency limits and its
  work-item filters respected: work is locked for a worker only when it has a free
  slot and its filters name it. Episodes, activities and entity batches run through
  the same dispatchers, processors and ``core.apply`` as native ones; a stream that
  closes gives its work items back, and completions are honoured once per token (a
  repeat is accepted again);
* durable entities: signal, get, query and clean up (mapped onto the client), entity
  batches sent as ``EntityRequest`` V2 (or the older ``EntityBatchRequest``, see
  :attr:`SidecarOptions.legacy_entity_requests`), and the entity messages of SDK
  orchestrations (calls, signals, lock requests, unlocks), whose lock traffic the
  server handles itself.

Not supported, answered ``UNIMPLEMENTED``: ``DeleteTaskHub``,
``CreateTaskHub(recreateIfExists)`` and ``SkipGracefulOrchestrationTerminations``.
History is always sent inline (never ``requiresHistoryStreaming``),
``numEventsProcessed`` is ignored (a response counts for every new event), only the
current execution's history is kept, an entity batch result needs one result per
operation, and ``CleanEntityStorage`` cleans everything in one call (no continuation
token).

A native worker locks every orchestration, activity and entity by default, so in a
hub shared with one, give SDK workers work-item filters (``use_work_item_filters()``)
and the native worker ``WorkerOptions(registered_only=True)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dtfx.grpc.options import DEFAULT_PORT, SidecarOptions, TlsOptions

if TYPE_CHECKING:
    from dtfx.grpc.server import SidecarServer


def __getattr__(name: str) -> Any:
    if name == "SidecarServer":
        import dtfx.grpc.protos  # noqa: F401 - first, so that a missing extra gets an error naming it
        from dtfx.grpc.server import SidecarServer

        return SidecarServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_PORT", "SidecarOptions", "SidecarServer", "TlsOptions"]
