"""dtfx.testing: what users test their own orchestrations with."""

from __future__ import annotations

from typing import Any

import dtfx
from dtfx.testing import local_hub, local_hub_async

app = dtfx.App()


@app.activity
def greet(ctx: dtfx.ActivityContext, name: str) -> str:
    return f"Hello, {name}!"


@app.orchestrator
def greetings(ctx: dtfx.OrchestrationContext, names: list[str]) -> Any:
    return (yield dtfx.when_all([ctx.call_activity(greet, input=name) for name in names]))


def test_local_hub_runs_an_app_and_forgets_it() -> None:
    with local_hub(app) as client:
        instance_id = client.schedule_new_orchestration(greetings, input=["Oslo", "Lima"])
        state = client.wait_for_orchestration_completion(instance_id, timeout=10)
        assert state is not None and state.get_output() == ["Hello, Oslo!", "Hello, Lima!"]
    with local_hub(app, options=dtfx.WorkerOptions(eager_activities=False)) as client:
        assert client.get_orchestration_state(instance_id) is None  # a fresh hub every time


async def test_local_hub_async() -> None:
    async with local_hub_async(app) as client:
        instance_id = await client.schedule_new_orchestration(greetings, input=["Kyiv"])
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == ["Hello, Kyiv!"]


class Tagged(dtfx.JsonDataConverter):
    """Marks what it stores, so a test can see which converter wrote a payload."""

    def serialize(self, value: Any) -> str | None:
        return super().serialize({"tagged": value})

    def deserialize(self, data: str | None, target_type: Any = None) -> Any:
        decoded = super().deserialize(data)
        return None if decoded is None else decoded["tagged"]


def test_local_hub_client_shares_the_converter_and_the_worker_version() -> None:
    versioning = dtfx.VersioningOptions(version="2.0")
    with local_hub(app, versioning=versioning, data_converter=Tagged()) as client:
        instance_id = client.schedule_new_orchestration(greetings, input=["Oslo"])
        state = client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.version == "2.0"
    assert state.serialized_input == '{"tagged":["Oslo"]}'
    assert state.get_output() == ["Hello, Oslo!"]


async def test_local_hub_async_takes_the_same_options() -> None:
    async with local_hub_async(app, versioning=dtfx.VersioningOptions(version="3"), data_converter=Tagged()) as client:
        instance_id = await client.schedule_new_orchestration(greetings, input=["Kyiv"])
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.version == "3" and state.get_output() == ["Hello, Kyiv!"]
