"""Shared fixtures: the backends every contract and end-to-end test runs against.

``DTFX_TEST_BACKENDS`` (comma-separated, default ``memory,sqlite,postgres``) picks
the backends of the contract suite. PostgreSQL tests skip when no server is
reachable, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dtfx.backends import Backend, MemoryBackend, open_backend
from tests.postgres import drop_postgres_schemas, postgres_url  # noqa: F401 (an autouse fixture)

CONTRACT_BACKENDS = os.environ.get("DTFX_TEST_BACKENDS", "memory,sqlite,postgres").split(",")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI's commands configure the root logger; leave it as it was for the next test."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


async def make_backend(kind: str, tmp_path: os.PathLike[str]) -> Backend:
    """A started backend of ``kind`` with an empty task hub."""
    if kind == "memory":
        backend: Backend = MemoryBackend()
    elif kind == "sqlite":
        backend = open_backend(f"sqlite:///{tmp_path}/taskhub.db")
    elif kind == "postgres":
        backend = open_backend(postgres_url())
    else:
        raise ValueError(kind)
    await backend.start()
    return backend


@pytest.fixture(params=CONTRACT_BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> AsyncIterator[Backend]:
    """A fresh backend of each kind under test."""
    instance = await make_backend(request.param, tmp_path)
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The OpenTelemetry spans made during the test, in every thread: the test sets a tracer
    provider, as an application does, and only for itself (OpenTelemetry's global provider
    can be set only once per process, so the test replaces the function that returns it)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    yield exporter
    provider.shutdown()
