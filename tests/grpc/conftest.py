"""Fixtures for the sidecar tests: an embedded server on a free port, the official SDK as its peer.

The SDK (``durabletask`` from PyPI) is the real counterpart: its worker and clients
talk to the server exactly as to their own sidecar. Its reconnect back-off is
shortened so that tests stay fast.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from durabletask import client as sdk_client
from durabletask import worker as sdk_worker
from durabletask.grpc_options import GrpcWorkerResiliencyOptions
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as pb_grpc
from tests.grpc import sdk_app

import dtfx
import grpc
from dtfx.grpc import SidecarOptions, SidecarServer

FAST = SidecarOptions(
    health_ping_interval=timedelta(seconds=1),
    abandon_retry_delay=timedelta(milliseconds=100),
    shutdown_grace_period=timedelta(seconds=1),
)
"""Server options for tests: quick pings and quick redispatch of abandoned work."""

FAST_RECONNECT = GrpcWorkerResiliencyOptions(reconnect_backoff_base_seconds=0.05, reconnect_backoff_cap_seconds=0.2)


@contextmanager
def running_sidecar(backend: dtfx.Backend | str | None = None, **kw: Any) -> Iterator[SidecarServer]:
    """A server on a free localhost port, over a fresh memory backend unless told otherwise."""
    kw.setdefault("options", FAST)
    with SidecarServer(backend if backend is not None else dtfx.MemoryBackend(), port=0, **kw) as server:
        yield server


@contextmanager
def running_sdk_worker(
    address: str, register: Callable[[sdk_worker.TaskHubGrpcWorker], None] = sdk_app.register, **kw: Any
) -> Iterator[sdk_worker.TaskHubGrpcWorker]:
    """An official SDK worker connected to ``address``, with ``register``'s orchestrators and activities."""
    worker = sdk_worker.TaskHubGrpcWorker(host_address=address, resiliency_options=FAST_RECONNECT, **kw)
    register(worker)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def run_sdk_sequence(backend: dtfx.Backend | str, **kw: Any) -> str:
    """Run :func:`sdk_app.sequence` to completion on a server of its own over ``backend``, with
    an SDK worker and client, check its output, and return the instance's id."""
    with (
        running_sidecar(backend, **kw) as server,
        running_sdk_worker(server.address),
        sdk_client.TaskHubGrpcClient(host_address=server.address) as client,
    ):
        instance_id = client.schedule_new_orchestration(sdk_app.sequence)
        state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.runtime_status == sdk_client.OrchestrationStatus.COMPLETED
    assert state.get_output() == ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]
    return instance_id


@pytest.fixture(scope="module")
def sidecar() -> Iterator[SidecarServer]:
    """One server per test module, on a memory backend."""
    with running_sidecar() as server:
        yield server


@pytest.fixture(scope="module")
def sdk_worker_running(sidecar: SidecarServer) -> Iterator[sdk_worker.TaskHubGrpcWorker]:
    """An SDK worker with every orchestrator and activity of :mod:`tests.grpc.sdk_app`."""
    with running_sdk_worker(sidecar.address) as worker:
        yield worker


@pytest.fixture(scope="module")
def client(
    sidecar: SidecarServer, sdk_worker_running: sdk_worker.TaskHubGrpcWorker
) -> Iterator[sdk_client.TaskHubGrpcClient]:
    """The SDK's sync client, with an SDK worker running."""
    sdk = sdk_client.TaskHubGrpcClient(host_address=sidecar.address)
    yield sdk
    sdk.close()


@pytest.fixture(scope="module")
def native_client(sidecar: SidecarServer) -> Iterator[dtfx.Client]:
    """A native dtfx client on the server's backend: what dtfx itself stores and sees."""
    native = dtfx.Client(sidecar.backend)
    yield native
    native.close()


@pytest.fixture(scope="module")
def sidecar_stub(sidecar: SidecarServer) -> Iterator[pb_grpc.TaskHubSidecarServiceStub]:
    """The generated stub on the module's server, for requests the SDK clients do not make."""
    with grpc.insecure_channel(sidecar.address) as channel:
        yield pb_grpc.TaskHubSidecarServiceStub(channel)


@pytest.fixture
def bare_sidecar() -> Iterator[SidecarServer]:
    """A server of its own, with no worker connected."""
    with running_sidecar() as server:
        yield server


@pytest.fixture
def stub(bare_sidecar: SidecarServer) -> Iterator[pb_grpc.TaskHubSidecarServiceStub]:
    """The generated stub on the bare server, for raw requests."""
    with grpc.insecure_channel(bare_sidecar.address) as channel:
        yield pb_grpc.TaskHubSidecarServiceStub(channel)


@pytest.fixture
def streams() -> Iterator[list[WorkItemStream]]:
    """Streams a test opens (with :func:`open_stream`); closed afterwards."""
    opened: list[WorkItemStream] = []
    yield opened
    for stream in opened:
        stream.close()


def open_stream(
    stub: pb_grpc.TaskHubSidecarServiceStub, streams: list[WorkItemStream], **request: Any
) -> WorkItemStream:
    """A raw ``GetWorkItems`` stream with ``request``'s fields, closed when the test ends."""
    stream = WorkItemStream(stub, pb.GetWorkItemsRequest(**request))
    streams.append(stream)
    return stream


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The error ``call`` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


class WorkItemStream:
    """A raw ``GetWorkItems`` stream, read on a thread into a queue."""

    def __init__(self, stub: pb_grpc.TaskHubSidecarServiceStub, request: pb.GetWorkItemsRequest | None = None) -> None:
        self._call = stub.GetWorkItems(request or pb.GetWorkItemsRequest())
        self._items: queue.Queue[Any] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for item in self._call:
                self._items.put(item)
            self._items.put(None)
        except grpc.RpcError as error:
            self._items.put(error)

    def next(self, timeout: float = 20, *, pings: bool = False) -> pb.WorkItem:
        """The next work item (health pings skipped unless ``pings``) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            item = self._items.get(timeout=max(0.0, deadline - time.monotonic()))
            if isinstance(item, grpc.RpcError):
                raise item
            assert item is not None, "the stream ended"
            if pings or not item.HasField("healthPing"):
                return item

    def nothing_within(self, seconds: float) -> bool:
        """True if no work item (other than pings) arrives within ``seconds``."""
        try:
            self.next(seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        """Cancel the stream, as a worker that dies does."""
        self._call.cancel()
        self._reader.join(5)
