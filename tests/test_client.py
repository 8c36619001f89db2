"""The native client on every backend: instance ids it refuses, signals with a request id, entity queries, NUL."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import dtfx
from dtfx import EntityInstanceId, InvalidInstanceIdError, UnstorableValueError
from dtfx.backends import Backend, open_backend
from dtfx.core.history import EntityOperationSignaled
from dtfx.core.serialization import DataConverter
from tests.backends.test_contract import run_to
from tests.postgres import postgres_url

REFUSED_IDS = [
    ("", "empty"),
    ("x" * 1025, "at most 1024"),
    ("lone \ud800 surrogate", "lone surrogate"),
    ("nul\x00inside", "control character '\\\\x00'"),
    ("line\nbreak", "control character '\\\\n'"),
    ("\x1f", "control character"),
    ("@counter@key", "belong to entities"),
    ("@@key", "belong to entities"),
]


async def _everything_stored(backend: Backend) -> list[str]:
    instances = await backend.query_instances(dtfx.OrchestrationQuery())
    entities = await backend.query_instances(dtfx.OrchestrationQuery(), entities=True)
    return [state.instance_id for state in [*instances.items, *entities.items]]


@pytest.mark.parametrize(("instance_id", "complaint"), REFUSED_IDS)
async def test_start_refuses_ids_no_orchestration_can_have(backend: Backend, instance_id: str, complaint: str) -> None:
    client = dtfx.AsyncClient(backend)
    with pytest.raises(InvalidInstanceIdError, match=complaint) as refused:
        await client.schedule_new_orchestration("anything", instance_id=instance_id)
    assert isinstance(refused.value, ValueError)
    assert refused.value.instance_id == instance_id
    assert await _everything_stored(backend) == []


@pytest.mark.parametrize(
    "instance_id", ["x" * 1024, "字" * 341, "with space", "ünïcode:1/2", "@not-an-entity", "a@b@c"]
)
async def test_start_takes_any_other_id(backend: Backend, instance_id: str) -> None:
    client = dtfx.AsyncClient(backend)
    assert await client.schedule_new_orchestration("anything", instance_id=instance_id) == instance_id
    state = await client.get_orchestration_state(instance_id)
    assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.PENDING


def test_closing_a_client_twice_is_harmless() -> None:
    with dtfx.Client(dtfx.MemoryBackend()) as client:
        client.close()
    client.close()


def test_a_client_dropped_without_closing_its_connections_warns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    unclosed = dtfx.Client(url)
    unclosed.list_instance_ids()  # opens its connections
    with pytest.warns(ResourceWarning, match=r"never closed.*one client per application"):
        del unclosed
        gc.collect()

    with dtfx.Client(url) as closed:
        closed.list_instance_ids()
    never_used = dtfx.Client(url)
    not_its_own = dtfx.AsyncClient(dtfx.MemoryBackend())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del closed, never_used, not_its_own
        gc.collect()


def test_the_message_of_a_long_id_is_short() -> None:
    with dtfx.Client(dtfx.MemoryBackend()) as client, pytest.raises(InvalidInstanceIdError) as refused:
        client.schedule_new_orchestration("anything", instance_id="y" * 5000)
    assert len(str(refused.value)) < 200 and "5000 characters" in str(refused.value)


async def test_restart_refuses_an_entity_id(backend: Backend) -> None:
    client = dtfx.AsyncClient(backend)
    entity = EntityInstanceId("counter", "restarted")
    await client.signal_entity(entity, "add", 1)
    for restart_with_new_instance_id in (False, True):
        with pytest.raises(InvalidInstanceIdError, match="belong to entities"):
            await client.restart_orchestration(str(entity), restart_with_new_instance_id=restart_with_new_instance_id)
    with pytest.raises(InvalidInstanceIdError, match="empty"):
        await client.restart_orchestration("")
    assert await _everything_stored(backend) == [str(entity)]


async def test_arguments_of_the_wrong_type_are_refused_before_anything_is_stored(backend: Backend) -> None:
    # Each would be written into a message or a row that no worker could read back.
    client = dtfx.AsyncClient(backend)
    await client.schedule_new_orchestration("anything", instance_id="target")
    stored_before = await _everything_stored(backend)
    counter = EntityInstanceId("counter", "c")
    calls: list[tuple[str, Any]] = [
        ("a name must be a str or a function, not int", client.schedule_new_orchestration(5)),  # type: ignore[arg-type]
        ("instance_id must be a str, not int", client.schedule_new_orchestration("anything", instance_id=5)),  # type: ignore[arg-type]
        ("version must be a str, not int", client.schedule_new_orchestration("anything", version=2)),  # type: ignore[arg-type]
        ("tags must be a dict of str to str: 'a': 5", client.schedule_new_orchestration("anything", tags={"a": 5})),  # type: ignore[dict-item]
        ("tags must be a dict of str to str, not list", client.schedule_new_orchestration("anything", tags=["a"])),  # type: ignore[arg-type]
        ("a moment must be a datetime, not str", client.schedule_new_orchestration("anything", start_at="tomorrow")),  # type: ignore[arg-type]
        ("event_name must be a str, not int", client.raise_orchestration_event("target", 5)),  # type: ignore[arg-type]
        ("reason must be a str, not int", client.suspend_orchestration("target", reason=5)),  # type: ignore[arg-type]
        ("reason must be a str, not int", client.resume_orchestration("target", reason=5)),  # type: ignore[arg-type]
        ("recursive must be a bool, not str", client.terminate_orchestration("target", recursive="x")),  # type: ignore[arg-type]
        ("instance_id must be a str, not int", client.terminate_orchestration(5)),  # type: ignore[arg-type]
        ("operation_name must be a str, not int", client.signal_entity(counter, 5)),  # type: ignore[arg-type]
        (
            "timeout must be a number of seconds",
            client.wait_for_orchestration_completion("target", timeout=float("nan")),
        ),
        ("at least 0", client.wait_for_orchestration_completion("target", timeout=-1)),
    ]
    for complaint, call in calls:
        with pytest.raises((TypeError, ValueError), match=complaint):
            await call
    assert await _everything_stored(backend) == stored_before
    assert await backend.lock_orchestration_work_items(10, timedelta(seconds=30)) != []  # its start is readable


async def test_messages_for_orchestrations_refuse_an_entity_id(backend: Backend) -> None:
    # The entity would drop them, and the caller would believe them delivered.
    client = dtfx.AsyncClient(backend)
    entity = EntityInstanceId("counter", "messaged")
    await client.signal_entity(entity, "add", 1)
    for send in (
        client.raise_orchestration_event(str(entity), "add", data=100),
        client.terminate_orchestration(str(entity)),
        client.suspend_orchestration(str(entity)),
        client.resume_orchestration(str(entity)),
        client.rewind_orchestration(str(entity)),
    ):
        with pytest.raises(InvalidInstanceIdError, match="belong to entities"):
            await send
    assert [type(event).__name__ for event in await _signals_waiting(backend)] == ["EntityOperationSignaled"]


async def test_start_refuses_an_empty_orchestrator_name(backend: Backend) -> None:
    with pytest.raises(ValueError, match="the name given is empty"):
        await dtfx.AsyncClient(backend).schedule_new_orchestration("")
    assert await _everything_stored(backend) == []


def test_queries_refuse_a_page_size_below_one() -> None:
    for size in (0, -1):
        with pytest.raises(ValueError, match="max_instance_count must be at least 1"):
            dtfx.OrchestrationQuery(max_instance_count=size)
        with pytest.raises(ValueError, match="page_size must be at least 1"):
            dtfx.EntityQuery(page_size=size)


async def test_naive_datetimes_in_filters_are_taken_as_utc(backend: Backend) -> None:
    client = dtfx.AsyncClient(backend)
    instance_id = await client.schedule_new_orchestration("anything")
    now = datetime.now(UTC).replace(tzinfo=None)
    query = dtfx.OrchestrationQuery(
        created_time_from=now - timedelta(hours=1), created_time_to=now + timedelta(hours=1)
    )
    assert query.created_time_from is not None and query.created_time_from.tzinfo is UTC
    page = await client.query_orchestrations(query)
    assert [state.instance_id for state in page.items] == [instance_id]
    later = dtfx.OrchestrationQuery(created_time_from=now + timedelta(minutes=30))
    assert (await client.query_orchestrations(later)).items == []
    result = await client.purge_orchestrations_by(created_time_to=now - timedelta(hours=1))
    assert result.deleted_instance_count == 0
    entities = await client.query_entities(dtfx.EntityQuery(last_modified_from=now - timedelta(hours=1)))
    assert entities.items == []


async def test_a_purge_by_filter_that_another_purge_got_ahead_of_says_it_is_complete(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    for instance_id in ("a", "b"):
        await run_to(backend, instance_id, dtfx.OrchestrationStatus.COMPLETED)
    purge = backend.purge_instances

    async def another_caller_first(instance_ids: Any) -> int:
        await purge(instance_ids)
        return await purge(instance_ids)

    monkeypatch.setattr(backend, "purge_instances", another_caller_first)
    result = await dtfx.AsyncClient(backend).purge_orchestrations_by()
    assert (result.deleted_instance_count, result.is_complete) == (0, True)  # nothing is left


async def _signals_waiting(backend: Backend) -> list[EntityOperationSignaled]:
    items = await backend.lock_orchestration_work_items(10, timedelta(seconds=30), entities=True)
    events = [message.event for item in items for message in item.messages]
    return [event for event in events if isinstance(event, EntityOperationSignaled)]


async def test_a_signal_carries_the_request_id_it_is_given(backend: Backend) -> None:
    client = dtfx.AsyncClient(backend)
    await client.signal_entity(EntityInstanceId("counter", "mine"), "add", 1, request_id="my-request")
    await client.signal_entity(EntityInstanceId("counter", "new"), "add", 2)
    requests = {signal.target_instance_id: signal.request_id for signal in await _signals_waiting(backend)}
    assert requests["@counter@mine"] == "my-request"
    assert requests["@counter@new"] not in ("", "my-request")  # a fresh id when none is given


def test_the_sync_client_passes_the_request_id_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/taskhub.db"
    with dtfx.Client(url) as client:
        client.signal_entity(EntityInstanceId("counter", "sync"), "add", request_id="sync-request")

    async def waiting() -> list[str]:
        backend = open_backend(url)
        try:
            return [signal.request_id for signal in await _signals_waiting(backend)]
        finally:
            await backend.close()

    assert asyncio.run(waiting()) == ["sync-request"]


@pytest.mark.parametrize(
    ("starts_with", "expected"),
    [
        ("Counter@", ["@counter@KeyA", "@counter@keyb"]),
        ("@counter@", ["@counter@KeyA", "@counter@keyb"]),
        ("@COUNTER@", ["@counter@KeyA", "@counter@keyb"]),
        ("counter@KeyA", ["@counter@KeyA"]),
        ("counter@keya", []),  # keys are case-sensitive
        ("counter", ["@counter@KeyA", "@counter@keyb", "@counterpart@x"]),
        ("@count", ["@counter@KeyA", "@counter@keyb", "@counterpart@x"]),
        ("Other@Key", ["@other@KeyA"]),
    ],
)
async def test_query_entities_by_prefix(backend: Backend, starts_with: str, expected: list[str]) -> None:
    client = dtfx.AsyncClient(backend)
    for entity in ("Counter@KeyA", "counter@keyb", "counterpart@x", "other@KeyA"):
        name, key = entity.split("@")
        await client.signal_entity(EntityInstanceId(name, key), "add", 1)
    query = dtfx.EntityQuery(instance_id_starts_with=starts_with, include_transient=True)
    assert [str(metadata.id) for metadata in await client.get_all_entities(query)] == expected


class _TextAsIs(DataConverter):
    """Payloads as the caller wrote them, as over gRPC (the default converter escapes NUL in JSON)."""

    def serialize(self, value: Any) -> str | None:
        return None if value is None else str(value)

    def deserialize(self, data: str | None, target_type: Any = None) -> Any:
        return data


async def test_a_nul_in_an_input_on_postgresql_is_refused_and_the_hub_keeps_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = open_backend(postgres_url())
    caplog.set_level(logging.WARNING)
    try:
        raw = dtfx.AsyncClient(backend, data_converter=_TextAsIs())
        with pytest.raises(UnstorableValueError, match="NUL") as refused:
            await raw.schedule_new_orchestration("anything", input="a\x00b", instance_id="with-nul")
        assert isinstance(refused.value, ValueError)
        with pytest.raises(UnstorableValueError, match="NUL"):
            await raw.schedule_new_orchestration("any\x00thing", instance_id="with-nul")
        assert await raw.get_orchestration_state("with-nul") is None
        assert [record.getMessage() for record in caplog.records] == []  # no connection was lost over it
        client = dtfx.AsyncClient(backend)
        await client.schedule_new_orchestration("anything", input="a\x00b", instance_id="escaped")  # JSON: \u0000
        state = await client.get_orchestration_state("escaped")
        assert state is not None and state.get_input() == "a\x00b"
    finally:
        await backend.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_closing_a_client_ends_the_waits_on_it_at_once(
    kind: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They had gone on until their next poll, then failed (a sync client's ended at once)."""
    url = f"sqlite:///{tmp_path}/hub.db" if kind == "sqlite" else postgres_url()
    client = dtfx.AsyncClient(url)
    monkeypatch.setattr(type(client.backend), "instance_poll_interval", 3600.0)
    instance_id = await client.schedule_new_orchestration("never_run")
    waits = [asyncio.create_task(client.wait_for_orchestration_completion(instance_id, timeout=600)) for _ in range(3)]
    await asyncio.sleep(0.2)
    await client.close()
    ended = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 10)
    assert all(isinstance(error, dtfx.BackendUnavailableError) for error in ended)
