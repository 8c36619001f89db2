"""Helpers for testing your own orchestrations: a worker and a client on an in-memory task hub.

Example::

    from dtfx.testing import local_hub

    def test_hello_cities() -> None:
        with local_hub(app) as client:
            instance_id = client.schedule_new_orchestration(hello_cities, input=["Oslo"])
            state = client.wait_for_orchestration_completion(instance_id, timeout=10)
        assert state is not None and state.get_output() == ["Hello, Oslo!"]
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypedDict

from dtfx.backends.memory import MemoryBackend
from dtfx.client import AsyncClient, Client
from dtfx.core.serialization import DataConverter
from dtfx.worker.options import ConcurrencyOptions, VersioningOptions, WorkerOptions
from dtfx.worker.registry import Registry
from dtfx.worker.worker import Worker


@contextmanager
def local_hub(
    app: Registry,
    *,
    concurrency: ConcurrencyOptions | None = None,
    versioning: VersioningOptions | None = None,
    options: WorkerOptions | None = None,
    data_converter: DataConverter | None = None,
) -> Iterator[Client]:
    """Run ``app`` on a fresh in-memory task hub; yields a :class:`~dtfx.Client` on it.

    The options are :class:`~dtfx.Worker`'s. The client shares the ``data_converter``,
    and starts orchestrations with the worker's version (``versioning.version``) when
    a call gives none. Everything is gone when the block ends.
    """
    worker = Worker(
        MemoryBackend(),
        app,
        concurrency=concurrency,
        versioning=versioning,
        options=options,
        data_converter=data_converter,
    )
    with worker, Client(worker.backend, **_client_options(worker)) as client:
        yield client


@asynccontextmanager
async def local_hub_async(
    app: Registry,
    *,
    concurrency: ConcurrencyOptions | None = None,
    versioning: VersioningOptions | None = None,
    options: WorkerOptions | None = None,
    data_converter: DataConverter | None = None,
) -> AsyncIterator[AsyncClient]:
    """:func:`local_hub` for async tests: yields an :class:`~dtfx.AsyncClient`."""
    worker = Worker(
        MemoryBackend(),
        app,
        concurrency=concurrency,
        versioning=versioning,
        options=options,
        data_converter=data_converter,
    )
    async with worker, AsyncClient(worker.backend, **_client_options(worker)) as client:
        yield client


class _ClientOptions(TypedDict):
    data_converter: DataConverter
    default_version: str | None


def _client_options(worker: Worker) -> _ClientOptions:
    """A client that reads and writes payloads as ``worker`` does, and starts its version."""
    version = worker.versioning.version if worker.versioning is not None else None
    return {"data_converter": worker.converter, "default_version": version}
