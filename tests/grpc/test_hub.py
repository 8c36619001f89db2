"""The hub's bookkeeping: filters, slots, where a locked work item goes, and completion tokens."""

from __future__ import annotations

import pytest
from durabletask.internal import orchestrator_service_pb2 as pb

from dtfx.backends.base import WorkKind
from dtfx.grpc.connections import WorkerFilters
from dtfx.grpc.hub import WorkerHub
from dtfx.grpc.status import RpcStatusError
from dtfx.worker.orchestrations import Abandon, EpisodeOutcome

ORCHESTRATION, ACTIVITY = WorkKind.ORCHESTRATION, WorkKind.ACTIVITY


def request(*, orchestrations: dict[str, list[str]] | None = None, limit: int = 0) -> pb.GetWorkItemsRequest:
    message = pb.GetWorkItemsRequest(maxConcurrentOrchestrationWorkItems=limit)
    if orchestrations is not None:
        message.workItemFilters.CopyFrom(
            pb.WorkItemFilters(
                orchestrations=[pb.OrchestrationFilter(name=n, versions=v) for n, v in orchestrations.items()]
            )
        )
    return message


def test_filters() -> None:
    everything = WorkerFilters.from_request(request())
    assert everything.names(ORCHESTRATION) is None and everything.accepts(ACTIVITY, "any", "9")
    assert WorkerFilters.from_request(pb.GetWorkItemsRequest(workItemFilters=pb.WorkItemFilters())) == everything
    some = WorkerFilters.from_request(request(orchestrations={"a": [], "b": ["1", "2"]}))
    assert some.names(ORCHESTRATION) == {"a", "b"}
    assert some.names(ACTIVITY) == frozenset()  # its filters name no activity: it takes none
    assert some.accepts(ORCHESTRATION, "a", "7")  # no versions listed: any version
    assert some.accepts(ORCHESTRATION, "b", "2") and not some.accepts(ORCHESTRATION, "b", "3")
    assert some.accepts(ORCHESTRATION, "b", None)  # unversioned work matches a versioned filter
    assert not some.accepts(ORCHESTRATION, "c", None)


async def test_slots() -> None:
    hub = WorkerHub(default_concurrency=5)
    woken: list[set[WorkKind]] = []
    hub.on_capacity(lambda kinds: woken.append(set(kinds)))
    limited = hub.connect(request(limit=1))
    assert woken == [set(WorkKind)]  # a new worker makes room for every kind
    assert limited.free_slots(ORCHESTRATION) == 1 and limited.free_slots(ACTIVITY) == 5
    hub.assign("lock-1", limited, ORCHESTRATION)
    assert limited.free_slots(ORCHESTRATION) == 0
    assert hub.with_free_slots(ORCHESTRATION) == []
    hub.release("lock-1")
    hub.release("lock-1")  # idempotent
    assert limited.free_slots(ORCHESTRATION) == 1
    assert woken[1:] == [{ORCHESTRATION}]  # a freed slot makes room for its own kind only
    hub.disconnect(limited)
    assert limited.free_slots(ORCHESTRATION) == 0 and hub.connections == []


async def test_connections_take_turns_by_assignment() -> None:
    hub = WorkerHub(default_concurrency=5)
    first, second = hub.connect(request()), hub.connect(request())
    assert hub.with_free_slots(ORCHESTRATION) == [first, second]
    assert hub.with_free_slots(ORCHESTRATION) == [first, second]  # looking (an empty fetch) takes no turn
    hub.assign("lock-1", first, ORCHESTRATION)
    assert hub.with_free_slots(ORCHESTRATION) == [second, first]  # given back by first, offered to second
    hub.release("lock-1")
    assert hub.with_free_slots(ORCHESTRATION) == [second, first]
    assert hub.with_free_slots(ACTIVITY) == [first, second]  # each kind takes its own turns


async def test_a_work_item_a_connection_cannot_take_moves_to_one_that_can() -> None:
    hub = WorkerHub(default_concurrency=5)
    picky = hub.connect(request(orchestrations={"job": ["2"]}))
    anyone = hub.connect(request())
    hub.assign("lock", picky, ORCHESTRATION)
    assert hub.worker_for("lock", "job", "2") is picky
    assert hub.worker_for("lock", "job", "1") is anyone  # the lock only filtered by name
    assert picky.free_slots(ORCHESTRATION) == 5 and anyone.free_slots(ORCHESTRATION) == 4
    hub.disconnect(anyone)
    assert hub.worker_for("lock", "job", "1") is None  # nobody takes version 1 now
    hub.assign("other", picky, ORCHESTRATION)
    replacement = hub.connect(request())
    hub.disconnect(picky)
    assert hub.worker_for("other", "job", "2") is replacement  # its stream closed: the next one takes it


async def test_completion_tokens() -> None:
    hub = WorkerHub(default_concurrency=5)
    connection = hub.connect(request())
    item = hub.dispatch(connection, pb.WorkItem(orchestratorRequest=pb.OrchestratorRequest()), "i")
    assert hub.lookup(item.token, ORCHESTRATION, completing=True) is item
    outcome = EpisodeOutcome([], None)
    hub.finish(item, outcome)
    assert item.outcome.result() is outcome
    assert hub.lookup(item.token, ORCHESTRATION, completing=True) is None  # a repeat, accepted again
    with pytest.raises(RpcStatusError, match="already completed"):
        hub.lookup(item.token, ORCHESTRATION, completing=False)

    held = hub.dispatch(connection, pb.WorkItem(activityRequest=pb.ActivityRequest()), "i", 1)
    hub.disconnect(connection)
    assert isinstance(held.outcome.result(), Abandon)
    with pytest.raises(RpcStatusError, match="stream"):
        hub.lookup(held.token, ACTIVITY, completing=True)
    assert hub.lookup(held.token, ACTIVITY, completing=False) is None


async def test_finished_tokens_are_remembered_up_to_a_bound() -> None:
    hub = WorkerHub(default_concurrency=5, remembered_tokens=2)
    connection = hub.connect(request())
    items = [hub.dispatch(connection, pb.WorkItem(orchestratorRequest=pb.OrchestratorRequest()), "i") for _ in range(3)]
    for item in items:
        hub.finish(item, EpisodeOutcome([], None))
    with pytest.raises(RpcStatusError, match="Unknown completion token"):
        hub.lookup(items[0].token, ORCHESTRATION, completing=True)
    assert hub.lookup(items[2].token, ORCHESTRATION, completing=True) is None
