"""Clients in a process forked from one that used them (gunicorn --preload, multiprocessing's fork)."""

from __future__ import annotations

import asyncio
import os
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import dtfx
from dtfx.backends import open_backend
from dtfx.core.errors import BackendError
from tests.postgres import postgres_url


@pytest.fixture(params=["sqlite", "postgres"])
def hub_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path}/hub.db" if request.param == "sqlite" else postgres_url()


def in_a_forked_child(work: Callable[[], object], tmp_path: Path) -> str:
    """Run ``work`` in a child forked from this process: what it returned, or its error's traceback."""
    said = tmp_path / "child-said"
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's coverage is not collected
        try:
            said.write_text(repr(work()))
        except BaseException:
            said.write_text(traceback.format_exc())
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return said.read_text()


def test_a_sync_client_used_before_a_fork_works_in_the_child(hub_url: str, tmp_path: Path) -> None:
    with dtfx.Client(hub_url) as client:
        client.schedule_new_orchestration("anything", instance_id="parents")

        def child_work() -> object:
            client.schedule_new_orchestration("anything", instance_id="childs")
            state = client.get_orchestration_state("parents")
            return state.instance_id if state is not None else None

        assert in_a_forked_child(child_work, tmp_path) == "'parents'"
        assert client.get_orchestration_state("childs") is not None  # and the parent's client still works


@pytest.fixture
def used_async_client(hub_url: str) -> Iterator[dtfx.AsyncClient]:
    """An AsyncClient that opened its backend from the URL, and started an instance with it."""
    client = dtfx.AsyncClient(hub_url)
    asyncio.run(start(client, "parents"))
    yield client
    asyncio.run(client.close())


async def start(client: dtfx.AsyncClient, instance_id: str) -> str:
    return await client.schedule_new_orchestration("anything", instance_id=instance_id)


def test_an_async_client_used_before_a_fork_works_in_the_child(
    used_async_client: dtfx.AsyncClient, tmp_path: Path
) -> None:
    assert in_a_forked_child(lambda: asyncio.run(start(used_async_client, "childs")), tmp_path) == "'childs'"
    assert asyncio.run(used_async_client.get_orchestration_state("childs")) is not None


def test_a_backend_object_opened_before_a_fork_is_refused_in_the_child_saying_why(hub_url: str, tmp_path: Path) -> None:
    backend = open_backend(hub_url)
    client = dtfx.AsyncClient(backend)  # it did not open the backend: it cannot open it again

    async def state() -> object:
        return await client.get_orchestration_state("x")

    asyncio.run(state())
    try:
        said = in_a_forked_child(lambda: asyncio.run(state()), tmp_path)
        assert BackendError.__name__ in said and "from which this one forked" in said, said
    finally:
        asyncio.run(backend.close())


def test_a_client_closed_in_the_child_leaves_the_parents_connections_alone(
    used_async_client: dtfx.AsyncClient, tmp_path: Path
) -> None:
    assert in_a_forked_child(lambda: asyncio.run(used_async_client.close()), tmp_path) == "None"  # as at its exit
    assert asyncio.run(start(used_async_client, "after")) == "after"


def test_threads_that_first_use_a_sync_client_in_the_child_at_once_share_one_loop(hub_url: str, tmp_path: Path) -> None:
    with dtfx.Client(hub_url) as client:
        client.get_orchestration_state("x")

        def child_work() -> object:
            answered: list[object] = []

            def call() -> None:
                try:
                    answered.append(client.get_orchestration_state("x"))
                except Exception as error:
                    answered.append(error)

            callers = [threading.Thread(target=call) for _ in range(8)]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join()
            client.close()
            return answered, sum(thread.name == "dtfx-client" for thread in threading.enumerate())

        assert in_a_forked_child(child_work, tmp_path) == repr(([None] * 8, 0))  # no loop thread is left


def test_a_memory_client_closed_in_a_child_says_nothing_of_never_being_closed(tmp_path: Path) -> None:
    """Its loop's thread did not come along: nothing of it can be closed there, nor warned about."""
    with dtfx.Client("memory://") as client:
        client.schedule_new_orchestration("anything")

        def child_work() -> object:
            client.close()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                client._async.__del__()  # what the child's collector would run
            return [str(warning.message) for warning in caught]

        assert in_a_forked_child(child_work, tmp_path) == "[]"
