"""Configuration of the gRPC sidecar server."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from dtfx.worker.options import WorkerOptions

DEFAULT_PORT = 4001
"""The port the official SDKs connect to by default (``localhost:4001``)."""

DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
"""gRPC's default limit on the size of a message received (4 MiB)."""

MAX_HEALTH_PING_INTERVAL = timedelta(seconds=60)
"""The longest :attr:`SidecarOptions.health_ping_interval`: half the 120 s after which SDK
workers take a quiet stream for lost and reconnect."""


@dataclass(kw_only=True)
class SidecarOptions:
    """Tuning of the sidecar server; the defaults suit most uses."""

    health_ping_interval: timedelta = timedelta(seconds=30)
    """How long a quiet ``GetWorkItems`` stream waits before it sends a health ping; at most
    :data:`MAX_HEALTH_PING_INTERVAL` (SDK workers reconnect after 120 s without traffic)."""
    lease_duration: timedelta = timedelta(seconds=60)
    """How long a work item stays locked; it is renewed while an SDK worker runs it."""
    abandon_retry_delay: timedelta = timedelta(seconds=1)
    """How long a work item that a worker abandoned (a versioning reject, say), or that
    its work-item filters refuse, waits before it is offered again."""
    default_worker_concurrency: int = 100
    """Work items of each kind an SDK worker holds at once when it sends no limit (the
    Python SDK sends none for entity batches)."""
    max_work_items_in_flight: int = 10_000
    """Work items of each kind out with SDK workers at once, across all of them."""
    fetch_batch_size: int = WorkerOptions.fetch_batch_size
    """Most work items locked in one backend call (as for a native worker)."""
    backoff_initial: timedelta = WorkerOptions.backoff_initial
    """First wait after a failed fetch or a failed work item (as for a native worker)."""
    backoff_max: timedelta = WorkerOptions.backoff_max
    """Longest such wait; the wait doubles on each further failure."""
    cached_instances: int = 10_000
    """Instances whose history the server keeps, as it last sent it to an SDK worker, so that
    their next episode needs no read of the store (as a native worker keeps its live
    orchestrations, ``WorkerOptions.cached_instances``); 0 turns the cache off. Each keeps
    its history encoded, payloads included (about 1.4 KB for a three-activity sequence):
    lower it where histories are large."""
    max_page_size: int = 1_000
    """Most instances (or entities) one ``QueryInstances``, ``ListInstanceIds`` or
    ``QueryEntities`` page returns; clients page on with the continuation token."""
    history_chunk_bytes: int = 1 << 20
    """Most bytes of events in one ``StreamInstanceHistory`` chunk (an event larger than that goes alone)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """The largest message between the server and its peers: gRPC's default, 4 MiB, as the
    SDKs' channels take. A client's request over it is refused with ``RESOURCE_EXHAUSTED``.
    Work whose message to or from an SDK worker would be larger fails with a
    :class:`~dtfx.MessageTooLargeError` (see :mod:`dtfx.grpc.sizes`): an orchestration
    whose history or response is too large, an activity whose input or result is, an
    entity operation too large on its own, each operation of an entity batch whose result
    is (a batch too large to send goes in parts). Raise it together with the
    peers' own limit (the Python SDK's ``GrpcChannelOptions(max_receive_message_length=...)``)
    where payloads are larger, or keep large payloads out of band (the SDKs' payload store)."""
    max_response_bytes: int = 128 << 20
    """The largest orchestrator response an SDK worker may send in parts (``isPartial``, as the
    .NET SDK does with one over its chunk size), all its parts together (or one message, if
    ``max_message_bytes`` is larger): the server keeps the parts until the last one. An
    orchestration whose response adds up to more fails with a :class:`~dtfx.MessageTooLargeError`."""
    keepalive_interval: timedelta = timedelta(seconds=30)
    """How often the server pings each connection (an HTTP/2 ping, which the peer's gRPC
    library answers): the health pings on a work-item stream would not notice a worker whose
    host vanished, as writes to a peer that is gone do not fail for long."""
    keepalive_timeout: timedelta = timedelta(seconds=20)
    """How long the server waits for a ping's answer before it closes the connection; the
    work items out with a worker that vanished then go to other workers, at most
    ``keepalive_interval + keepalive_timeout`` after the last sign of it."""
    shutdown_grace_period: timedelta = timedelta(seconds=10)
    """How long stopping the server waits for work items out with SDK workers."""
    tune_gc: bool = True
    """While the server runs, let Python's garbage collector look at young objects every
    10,000 allocations instead of every 700, as a worker does (``WorkerOptions.tune_gc``,
    :mod:`dtfx._collector`): with SDK workers busy the default pace took 4% of the server's
    time with 1,000 orchestrations in flight and 6.6% with 5,000."""
    legacy_entity_requests: bool = False
    """Send entity batches as the older ``EntityBatchRequest`` (``entityRequest``) instead
    of ``EntityRequest`` V2 (``entityRequestV2``), for workers that read only the older
    shape. The official Python SDK reads both."""

    def __post_init__(self) -> None:
        if not timedelta(0) < self.health_ping_interval <= MAX_HEALTH_PING_INTERVAL:
            raise ValueError(
                f"health_ping_interval must be positive and at most {MAX_HEALTH_PING_INTERVAL.total_seconds():g} s"
                " (SDK workers reconnect after 120 s without traffic)"
            )
        for name in ("lease_duration", "keepalive_interval", "keepalive_timeout"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        for name in (
            "default_worker_concurrency",
            "max_work_items_in_flight",
            "fetch_batch_size",
            "max_page_size",
            "history_chunk_bytes",
            "max_message_bytes",
            "max_response_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.cached_instances < 0:
            raise ValueError(f"cached_instances must not be negative (got {self.cached_instances})")
        if not timedelta(0) < self.backoff_initial <= self.backoff_max:
            raise ValueError("backoff_initial must be positive and at most backoff_max")


@dataclass(kw_only=True)
class TlsOptions:
    """Serve over TLS instead of plaintext."""

    certificate_chain: bytes
    """The server's certificate chain, PEM-encoded."""
    private_key: bytes
    """The server's private key, PEM-encoded."""
    client_ca: bytes | None = None
    """If given, clients must present a certificate signed by this CA (PEM): mutual TLS."""

    @classmethod
    def from_files(
        cls, certificate_chain: str | Path, private_key: str | Path, client_ca: str | Path | None = None
    ) -> TlsOptions:
        """Read the PEM files."""
        return cls(
            certificate_chain=Path(certificate_chain).read_bytes(),
            private_key=Path(private_key).read_bytes(),
            client_ca=Path(client_ca).read_bytes() if client_ca is not None else None,
        )
