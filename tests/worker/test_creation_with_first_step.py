"""A new instance that a worker of its client's process takes is created by the commit of its
first step, on SQLite and PostgreSQL; one whose id the client was given is created first."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import dtfx
from dtfx.backends import open_backend
from dtfx.core.history import (
    ExecutionStarted,
    OrchestratorCompleted,
    OrchestratorStarted,
    TaskScheduled,
)
from tests.postgres import postgres_url


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/hub.db" if request.param == "sqlite" else postgres_url()


def greeting_app(release: threading.Event) -> dtfx.App:
    """``greet`` greets its names in turn; the greeting of ``"slow"`` waits for ``release``."""
    app = dtfx.App()

    @app.activity
    def hello(ctx: dtfx.ActivityContext, name: str) -> str:
        if name == "slow":
            assert release.wait(30)
        return f"Hello, {name}!"

    @app.orchestrator
    def greet(ctx: dtfx.OrchestrationContext, names: list[str]) -> Any:
        greetings = []
        for name in names:
            greetings.append((yield ctx.call_activity(hello, input=name)))
        return greetings

    return app


# Eager activities wait long for their result: only the creation's own bound lets it go on.
OPTIONS = dtfx.WorkerOptions(eager_activity_window=timedelta(seconds=30))


async def test_a_new_instance_is_created_by_its_first_step_which_does_not_wait_for_a_slow_activity(
    sql_url: str,
) -> None:
    release = threading.Event()
    backend = open_backend(sql_url)
    try:
        async with dtfx.Worker(backend, app=greeting_app(release), options=OPTIONS):
            client = dtfx.AsyncClient(backend)
            instance_id = await asyncio.wait_for(client.schedule_new_orchestration("greet", input=["slow", "b"]), 10)
            # Created with its first episode, the slow activity left running.
            try:
                history = await client.get_orchestration_history(instance_id)
                state = await client.get_orchestration_state(instance_id)
            finally:
                release.set()
            assert [type(event) for event in history] == [
                OrchestratorStarted,
                ExecutionStarted,
                TaskScheduled,
                OrchestratorCompleted,
            ]
            assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.RUNNING
            state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
        assert state is not None and state.get_output() == ["Hello, slow!", "Hello, b!"]
    finally:
        await backend.close()


async def test_an_instance_whose_id_the_client_was_given_is_created_before_its_first_step(sql_url: str) -> None:
    release = threading.Event()
    backend = open_backend(sql_url)
    try:
        async with dtfx.Worker(backend, app=greeting_app(release), options=OPTIONS):
            client = dtfx.AsyncClient(backend)
            instance_id = await asyncio.wait_for(
                client.schedule_new_orchestration("greet", input=["slow", "b"], instance_id="given"), 10
            )
            # Created on its own (an id that is taken must be refused before anything runs);
            # its first step waits for the slow activity (within the eager window).
            try:
                history = await client.get_orchestration_history(instance_id)
            finally:
                release.set()
            assert history == []
            state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
        assert state is not None and state.get_output() == ["Hello, slow!", "Hello, b!"]
    finally:
        await backend.close()


async def test_new_instances_started_one_after_another_each_complete(sql_url: str) -> None:
    backend = open_backend(sql_url)
    try:
        async with dtfx.Worker(backend, app=greeting_app(threading.Event())):
            client = dtfx.AsyncClient(backend)
            for round_ in range(20):
                instance_id = await client.schedule_new_orchestration("greet", input=[f"n{round_}", "x"])
                state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
                assert state is not None and state.get_output() == [f"Hello, n{round_}!", "Hello, x!"]
    finally:
        await backend.close()
