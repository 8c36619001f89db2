"""What the SQL backends add to the contract: URLs, the default file, use from several event loops."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import dtfx
from dtfx.backends import open_backend
from dtfx.backends.postgres import parse_postgres_url
from dtfx.backends.sqlite import SqliteBackend
from dtfx.core.errors import ConfigurationError
from tests.postgres import postgres_url


@pytest.mark.parametrize(
    ("url", "path", "synchronous"),
    [
        ("sqlite:///hub.db", "hub.db", "full"),
        ("sqlite:////var/hub.db", "/var/hub.db", "full"),
        ("sqlite://", "./.dtfx/taskhub.db", "full"),
        ("sqlite:///hub.db?synchronous=normal", "hub.db", "normal"),
    ],
)
def test_sqlite_urls(url: str, path: str, synchronous: str) -> None:
    backend = open_backend(url)
    assert isinstance(backend, SqliteBackend)
    assert (backend.path, backend._synchronous) == (path, synchronous)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/hub.db",
        "sqlite:///hub.db?synchronous=sometimes",
        "sqlite:///hub.db?journal=off",
        "postgresql://postgres@localhost/db?schema=Not-A-Name",
        "postgresql://postgres@localhost/db?pool_max_size=many",
    ],
)
def test_bad_urls_are_refused_clearly(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_backend(url)


def test_postgres_url_options() -> None:
    conninfo, schema, pool = parse_postgres_url("postgresql+psycopg://u:p@db:5433/app?schema=hub&pool_max_size=4")
    assert (schema, pool) == ("hub", {"max_size": 4})
    assert conninfo == "postgresql://u:p@db:5433/app?application_name=dtfx%3Ahub"


async def test_the_default_sqlite_hub_is_created_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DTFX_BACKEND", raising=False)
    backend = open_backend()
    try:
        assert await backend.get_instance("nobody") is None  # works without an explicit start()
    finally:
        await backend.close()
    assert (tmp_path / ".dtfx" / "taskhub.db").is_file()


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/hub.db" if request.param == "sqlite" else postgres_url()


async def test_a_sync_client_and_an_async_worker_share_one_backend_object(sql_url: str) -> None:
    app = dtfx.App()

    @app.activity
    def double(ctx: dtfx.ActivityContext, value: int) -> int:
        return 2 * value

    @app.orchestrator
    def doubled(ctx: dtfx.OrchestrationContext, value: int) -> Any:
        return (yield ctx.call_activity(double, input=value))

    backend = open_backend(sql_url)
    try:
        async with dtfx.Worker(backend, app=app):  # on this test's event loop

            def use_sync_client() -> Any:  # on the client's own loop, in another thread
                with dtfx.Client(backend) as client:
                    instance_id = client.schedule_new_orchestration(doubled, input=21)
                    return client.wait_for_orchestration_completion(instance_id, timeout=30)

            state = await asyncio.to_thread(use_sync_client)
    finally:
        await backend.close()
    assert state is not None and state.get_output() == 42
