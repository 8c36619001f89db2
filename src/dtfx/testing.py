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
from typing import Any

from dtfx.backends.memory import MemoryBackend
from dtfx.client import AsyncClient, Client
from dtfx.worker.registry import Registry
from dtfx.worker.worker import Worker


@contextmanager
def local_hub(app: Registry, **worker_options: Any) -> Iterator[Client]:
    """Run ``app`` on a fresh in-memory task hub; yields a :class:`~dtfx.Client` on it.

    ``worker_options`` go to :class:`~dtfx.Worker` (``concurrency=``, ``options=``, ...).
    Everything is gone when the block ends.
    """
    backend = MemoryBackend()
    with Worker(backend, app=app, **worker_options), Client(backend) as client:
        yield client


@asynccontextmanager
async def local_hub_async(app: Registry, **worker_options: Any) -> AsyncIterator[AsyncClient]:
    """:func:`local_hub` for async tests: yields an :class:`~dtfx.AsyncClient`."""
    backend = MemoryBackend()
    async with Worker(backend, app=app, **worker_options), AsyncClient(backend) as client:
        yield client
