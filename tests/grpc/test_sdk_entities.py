"""Durable entities of the official ``durabletask`` SDK, hosted by its own worker, against the dtfx sidecar.

The SDK worker derives work-item filters from what it registered, so that a native
dtfx worker on the same hub (``WorkerOptions(registered_only=True)``) and the SDK
worker each take only their own orchestrations and entities. The module runs over
the memory backend and over SQLite (where the entity filters become SQL).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from durabletask import client as sdk_client
from durabletask import worker as sdk_worker
from durabletask.client import EntityQuery, OrchestrationStatus
from durabletask.entities import EntityInstanceId
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as pb_grpc
from google.protobuf import wrappers_pb2
from tests.grpc import sdk_entities
from tests.grpc.conftest import FAST, WorkItemStream, running_sdk_worker, running_sidecar
from tests.polling import wait_until

import dtfx
import grpc
from dtfx.grpc import SidecarServer

TIMEOUT = 20


def register_with_filters(worker: sdk_worker.TaskHubGrpcWorker) -> None:
    sdk_entities.register(worker)
    worker.use_work_item_filters()  # derived from its registrations, entities included


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dtfx.Backend | str:
    """The task hub: a memory backend object, or a SQLite file's URL (the server and native workers each open it)."""
    if request.param == "memory":
        return dtfx.MemoryBackend()
    return f"sqlite:///{tmp_path_factory.mktemp('hub')}/taskhub.db"


@pytest.fixture(scope="module")
def sidecar(hub: dtfx.Backend | str) -> Iterator[SidecarServer]:
    """The module's server, on its hub (the conftest's ``client`` and ``sidecar_stub`` use it)."""
    with running_sidecar(hub) as server:
        yield server


@pytest.fixture(scope="module")
def sdk_worker_running(sidecar: SidecarServer) -> Iterator[sdk_worker.TaskHubGrpcWorker]:
    """An SDK worker with the entities and orchestrators of :mod:`tests.grpc.sdk_entities`."""
    with running_sdk_worker(sidecar.address, register_with_filters) as worker:
        yield worker


def state_of(client: sdk_client.TaskHubGrpcClient, entity: EntityInstanceId) -> Any:
    """The entity's state as stored (JSON text), or ``None`` when it does not exist."""
    metadata = client.get_entity(entity)
    return None if metadata is None else metadata.get_state()


def wait_for_state(client: sdk_client.TaskHubGrpcClient, entity: EntityInstanceId, expected: str | None) -> None:
    wait_until(lambda: state_of(client, entity) == expected)


def run(client: sdk_client.TaskHubGrpcClient, orchestrator: Any, input: Any = None) -> Any:
    instance_id = client.schedule_new_orchestration(orchestrator, input=input)
    state = client.wait_for_orchestration_completion(instance_id, timeout=TIMEOUT)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED, state
    return state.get_output()


def locked_by(stub: pb_grpc.TaskHubSidecarServiceStub, entity: EntityInstanceId) -> str | None:
    """Who holds the entity's lock, as the server says (``None``: nobody, or no such entity).

    The SDK's ``EntityMetadata.get_locked_by()`` parses the holder as an entity id,
    which an orchestration's id is not, so the tests read the raw response.
    """
    response = stub.GetEntity(pb.GetEntityRequest(instanceId=str(entity)))
    return response.entity.lockedBy.value if response.entity.HasField("lockedBy") else None


def test_client_signals_run_in_order_and_get_entity_shows_them(
    client: sdk_client.TaskHubGrpcClient, sidecar_stub: pb_grpc.TaskHubSidecarServiceStub
) -> None:
    entity = EntityInstanceId("Counter", "signals")
    before = datetime.now(UTC)
    for amount in range(1, 11):
        client.signal_entity(entity, "add", amount)
    wait_for_state(client, entity, "55")
    metadata = client.get_entity(entity)
    assert metadata is not None
    assert str(metadata.id) == "@counter@signals"
    assert metadata.last_modified >= before - timedelta(seconds=1)
    assert metadata.backlog_queue_size == 0 and metadata.get_locked_by() is None
    without_state = sidecar_stub.GetEntity(pb.GetEntityRequest(instanceId=str(entity), includeState=False))
    assert without_state.exists and not without_state.entity.HasField("serializedState")
    assert (
        sidecar_stub.GetEntity(
            pb.GetEntityRequest(instanceId="@COUNTER@signals", includeState=True)
        ).entity.serializedState.value
        == "55"
    )
    assert client.get_entity(EntityInstanceId("counter", "never-signalled")) is None


def test_falsy_state_is_real_state_and_unset_state_deletes(client: sdk_client.TaskHubGrpcClient) -> None:
    entity = EntityInstanceId("counter", "zero")
    client.signal_entity(entity, "add", 7)
    client.signal_entity(entity, "reset")
    wait_for_state(client, entity, "0")
    client.signal_entity(entity, "delete")
    wait_for_state(client, entity, None)


def test_orchestrations_call_and_signal_entities(client: sdk_client.TaskHubGrpcClient) -> None:
    after_add, failure, current = run(client, sdk_entities.use_counter, "called")
    assert after_add == 15
    assert "fail_after_add" in failure and "add rolled back" in failure
    assert current == 15  # the failed operation rolled back its own change only


def test_class_entities_and_entity_to_entity_signals(client: sdk_client.TaskHubGrpcClient) -> None:
    for _ in range(3):
        client.signal_entity(EntityInstanceId("Forwarder", "f"), "forward", 25)
    wait_for_state(client, EntityInstanceId("account", "savings"), "75")
    wait_for_state(client, EntityInstanceId("forwarder", "f"), "3")


def test_an_entity_starts_an_orchestration(client: sdk_client.TaskHubGrpcClient) -> None:
    client.signal_entity(EntityInstanceId("Starter", "k"), "start", "ann")
    wait_until(lambda: client.get_orchestration_state("started-by-k") is not None)
    state = client.wait_for_orchestration_completion("started-by-k", timeout=TIMEOUT)
    assert state is not None and state.get_output() == "hello ann"


def test_critical_sections_keep_transfers_consistent(
    client: sdk_client.TaskHubGrpcClient, sidecar_stub: pb_grpc.TaskHubSidecarServiceStub
) -> None:
    first, second = EntityInstanceId("account", "first"), EntityInstanceId("account", "second")
    client.signal_entity(first, "deposit", 100)
    client.signal_entity(second, "deposit", 100)
    moves = [["first", "second", 30] if n % 2 else ["second", "first", 20] for n in range(8)]
    ids = [client.schedule_new_orchestration(sdk_entities.transfer, input=move) for move in moves]
    outcomes = [client.wait_for_orchestration_completion(i, timeout=TIMEOUT) for i in ids]
    assert all(o is not None and o.runtime_status == OrchestrationStatus.COMPLETED for o in outcomes)
    assert {o.get_output() for o in outcomes if o is not None} <= {"moved", "refused"}

    def unlocked_total() -> int | None:
        if locked_by(sidecar_stub, first) or locked_by(sidecar_stub, second):  # unlocks travel as messages
            return None
        return sum(int(state_of(client, entity)) for entity in (first, second))

    assert wait_until(unlocked_total) == 200


def test_a_held_lock_shows_and_ending_the_holder_releases_it(
    client: sdk_client.TaskHubGrpcClient, sidecar_stub: pb_grpc.TaskHubSidecarServiceStub
) -> None:
    entity = EntityInstanceId("counter", "held")
    holder = client.schedule_new_orchestration(sdk_entities.hold_lock, input="held")
    assert wait_until(lambda: locked_by(sidecar_stub, entity)) == holder
    locked_only = sidecar_stub.GetEntity(pb.GetEntityRequest(instanceId=str(entity), includeState=True))
    assert locked_only.exists and not locked_only.entity.HasField("serializedState")  # exists, for its lock
    client.signal_entity(entity, "add", 1)  # waits for the lock
    wait_until(lambda: (m := client.get_entity(entity, include_state=False)) and m.backlog_queue_size == 1)
    client.terminate_orchestration(holder)
    wait_for_state(client, entity, "1")
    assert locked_by(sidecar_stub, entity) is None


def test_scheduled_signals_are_delivered_at_their_time(client: sdk_client.TaskHubGrpcClient) -> None:
    entity = EntityInstanceId("counter", "later")
    client.signal_entity(entity, "add", 10, signal_time=datetime.now(UTC) + timedelta(milliseconds=200))
    assert run(client, sdk_entities.schedule_signal, "later") == "scheduled"
    wait_for_state(client, entity, "11")


def test_query_entities_pages_and_filters(client: sdk_client.TaskHubGrpcClient) -> None:
    for key in ("q1", "q2", "q3"):
        client.signal_entity(EntityInstanceId("counter", f"query-{key}"), "add", 1)
    for key in ("q1", "q2", "q3"):
        wait_for_state(client, EntityInstanceId("counter", f"query-{key}"), "1")
    paged = client.get_all_entities(EntityQuery(instance_id_starts_with="@counter@query-", page_size=2))
    assert [(str(m.id), m.get_state()) for m in paged] == [
        ("@counter@query-q1", "1"),
        ("@counter@query-q2", "1"),
        ("@counter@query-q3", "1"),
    ]
    bare = client.get_all_entities(EntityQuery(instance_id_starts_with="@counter@query-q", include_state=False))
    assert len(bare) == 3 and all(m.get_state() is None and not m.includes_state for m in bare)
    recent = client.get_all_entities(
        EntityQuery(
            instance_id_starts_with="@counter@query-", last_modified_from=datetime.now(UTC) + timedelta(hours=1)
        )
    )
    assert recent == []


def test_query_entities_matches_names_in_any_case_and_keys_as_written(client: sdk_client.TaskHubGrpcClient) -> None:
    for key in ("PrefixA", "prefixb"):
        client.signal_entity(EntityInstanceId("Counter", key), "add", 1)
        wait_for_state(client, EntityInstanceId("counter", key), "1")

    def matching(starts_with: str) -> list[str]:
        return [str(m.id) for m in client.get_all_entities(EntityQuery(instance_id_starts_with=starts_with))]

    assert matching("Counter@Prefix") == ["@counter@PrefixA"]
    assert matching("@COUNTER@prefix") == ["@counter@prefixb"]
    assert matching("counter@PrefixA") == ["@counter@PrefixA"]
    assert matching("counter@PREFIX") == []


def test_the_sdk_worker_reads_the_older_entity_batch_request_too() -> None:
    options = dataclasses.replace(FAST, legacy_entity_requests=True)
    with (
        running_sidecar(options=options) as server,
        running_sdk_worker(server.address, register_with_filters),
        sdk_client.TaskHubGrpcClient(host_address=server.address) as client,
    ):
        after_add, failure, current = run(client, sdk_entities.use_counter, "legacy")
        assert [after_add, current] == [15, 15] and "add rolled back" in failure


# -- a hub shared with a native worker -------------------------------------------------------------

native_app = dtfx.App()


@native_app.entity
def native_counter(ctx: dtfx.EntityContext, amount: int) -> int:
    total = ctx.get_state(int, 0) + amount
    ctx.set_state(total)
    return total


@native_app.orchestrator
def native_calls_sdk_counter(ctx: dtfx.OrchestrationContext, key: str) -> Any:
    target = dtfx.EntityInstanceId("counter", key)
    ctx.signal_entity(target, "add", 1)
    return (yield ctx.call_entity(target, "add", 2))


def native_worker(hub: dtfx.Backend | str) -> dtfx.Worker:
    return dtfx.Worker(hub, app=native_app, options=dtfx.WorkerOptions(registered_only=True))


def test_a_native_orchestration_calls_an_entity_the_sdk_worker_hosts(
    client: sdk_client.TaskHubGrpcClient, hub: dtfx.Backend | str
) -> None:
    with native_worker(hub), dtfx.Client(hub) as native:
        instance_id = native.schedule_new_orchestration(native_calls_sdk_counter, input="from-native")
        state = native.wait_for_orchestration_completion(instance_id, timeout=TIMEOUT)
        assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED
        assert state.get_output() == 3
        entity = native.get_entity(dtfx.EntityInstanceId("counter", "from-native"))
        assert entity is not None and entity.get_state() == 3


def test_an_sdk_orchestration_calls_an_entity_a_native_worker_hosts(
    hub: dtfx.Backend | str, client: sdk_client.TaskHubGrpcClient
) -> None:
    with native_worker(hub):
        assert run(client, sdk_entities.call_native_counter, "from-sdk") == [12, 15]
    assert state_of(client, EntityInstanceId("native_counter", "from-sdk")) == "15"


# -- cleaning up ---------------------------------------------------------------------------------


def test_clean_entity_storage_removes_empty_entities_and_releases_orphaned_locks() -> None:
    """An orphaned lock is one whose holder does not exist: a raw worker takes one for ``ghost``."""
    ghost_maker_only = pb.GetWorkItemsRequest(
        workItemFilters=pb.WorkItemFilters(orchestrations=[pb.OrchestrationFilter(name="ghost_maker")])
    )
    with (
        running_sidecar() as server,
        running_sdk_worker(server.address, register_with_filters),
        sdk_client.TaskHubGrpcClient(host_address=server.address) as client,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.TaskHubSidecarServiceStub(channel)
        gone, held = EntityInstanceId("counter", "gone"), EntityInstanceId("counter", "held")
        client.signal_entity(gone, "add", 1)
        client.signal_entity(gone, "delete")
        client.signal_entity(held, "add", 5)
        wait_for_state(client, held, "5")
        wait_for_state(client, gone, None)

        stream = WorkItemStream(stub, ghost_maker_only)
        try:
            stub.StartInstance(pb.CreateInstanceRequest(instanceId="maker", name="ghost_maker"))
            episode = stream.next()
            lock = pb.EntityLockRequestedEvent(
                criticalSectionId="cs",
                lockSet=[str(held)],
                position=0,
                parentInstanceId=wrappers_pb2.StringValue(value="ghost"),
            )
            complete = pb.CompleteOrchestrationAction(orchestrationStatus=pb.ORCHESTRATION_STATUS_COMPLETED)
            stub.CompleteOrchestratorTask(
                pb.OrchestratorResponse(
                    instanceId="maker",
                    completionToken=episode.completionToken,
                    actions=[
                        pb.OrchestratorAction(
                            id=1, sendEntityMessage=pb.SendEntityMessageAction(entityLockRequested=lock)
                        ),
                        pb.OrchestratorAction(id=2, completeOrchestration=complete),
                    ],
                )
            )
        finally:
            stream.close()
        wait_until(lambda: locked_by(stub, held) == "ghost")

        nothing_asked = stub.CleanEntityStorage(
            pb.CleanEntityStorageRequest(removeEmptyEntities=False, releaseOrphanedLocks=False)
        )
        assert (nothing_asked.emptyEntitiesRemoved, nothing_asked.orphanedLocksReleased) == (0, 0)
        result = client.clean_entity_storage()
        assert (result.empty_entities_removed, result.orphaned_locks_released) == (1, 1)
        wait_until(lambda: locked_by(stub, held) is None)
        assert state_of(client, held) == "5"
        with dtfx.Client(server.backend) as native:
            assert native.get_orchestration_state("@counter@gone") is None  # removed, not just empty
        again = client.clean_entity_storage()
        assert (again.empty_entities_removed, again.orphaned_locks_released) == (0, 0)
