"""End-to-end fixtures: a worker and a client sharing one backend.

``DTFX_E2E_BACKENDS`` (comma-separated, default ``memory``) picks the backends the
end-to-end tests run on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

import dtfx
from dtfx.backends import Backend
from dtfx.core.history import HistoryEvent
from tests.conftest import make_backend

E2E_BACKENDS = os.environ.get("DTFX_E2E_BACKENDS", "memory").split(",")


@dataclass
class Hub:
    """A backend plus a client on it; ``worker()`` runs a worker for an app."""

    backend: Backend
    client: dtfx.AsyncClient

    @asynccontextmanager
    async def worker(self, app: dtfx.App, **options: Any) -> AsyncIterator[dtfx.Worker]:
        async with dtfx.Worker(self.backend, app=app, **options) as worker:
            yield worker

    async def run(
        self, orchestrator: Callable[..., Any] | str, input: Any = None, *, timeout: float = 20, **kw: Any
    ) -> dtfx.OrchestrationState:
        """Schedule an orchestration and wait for it to end."""
        instance_id = await self.client.schedule_new_orchestration(orchestrator, input=input, **kw)
        state = await self.client.wait_for_orchestration_completion(instance_id, timeout=timeout)
        assert state is not None
        return state

    async def wait_for_state(
        self, instance_id: str, predicate: Callable[[dtfx.OrchestrationState], bool], timeout: float = 10
    ) -> dtfx.OrchestrationState:
        """Poll until the instance exists and ``predicate`` holds for its state."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            state = await self.backend.get_instance(instance_id)
            if state is not None and predicate(state):
                return state
            assert asyncio.get_running_loop().time() < deadline, f"state never matched: {state}"
            await asyncio.sleep(0.01)

    async def wait_for_history(
        self, instance_id: str, predicate: Callable[[list[HistoryEvent]], bool], timeout: float = 10
    ) -> list[HistoryEvent]:
        """Poll the instance's history until ``predicate`` holds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            history = await self.backend.get_history(instance_id)
            if predicate(history):
                return history
            assert asyncio.get_running_loop().time() < deadline, f"history never matched: {history}"
            await asyncio.sleep(0.01)


@pytest.fixture(params=E2E_BACKENDS)
async def hub(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> AsyncIterator[Hub]:
    """A fresh task hub with a client."""
    backend = await make_backend(request.param, tmp_path)
    try:
        yield Hub(backend, dtfx.AsyncClient(backend))
    finally:
        await backend.close()


@pytest.fixture
def app() -> dtfx.App:
    """An empty app to register orchestrators and activities with."""
    return dtfx.App()
