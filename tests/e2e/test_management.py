"""Client operations: scheduling options, state, waits, terminate, suspend, restart, rewind, purge, query."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import dtfx
from dtfx import OrchestrationStatus as Status
from dtfx.backends.base import WorkKind, utc_now
from dtfx.core.history import ExecutionRewound, ExecutionStarted, SubOrchestrationInstanceFailed, TaskCompleted
from tests.e2e.conftest import Hub


def _waiter_app(app: dtfx.App) -> None:
    @app.orchestrator
    def waiter(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("go"))


async def test_schedule_options_are_stored(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)
    start_at = utc_now() + timedelta(milliseconds=400)
    trace = dtfx.TraceContext(trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    instance_id = await hub.client.schedule_new_orchestration(
        "waiter",
        input={"x": 1},
        instance_id="custom-id",
        start_at=start_at,
        tags={"team": "a"},
        version="2.0",
        trace_context=trace,
    )
    assert instance_id == "custom-id"
    async with hub.worker(app):
        state = await hub.client.get_orchestration_state("custom-id")
        assert state is not None
        assert state.runtime_status == Status.PENDING
        assert (state.name, state.get_input(), state.tags, state.version) == ("waiter", {"x": 1}, {"team": "a"}, "2.0")
        started = await hub.client.wait_for_orchestration_start("custom-id", timeout=10)
        assert started is not None and started.runtime_status == Status.RUNNING
        assert utc_now() >= start_at
        await hub.client.raise_orchestration_event("custom-id", "go", data="went")
        done = await hub.client.wait_for_orchestration_completion("custom-id", timeout=10)
    assert done is not None
    assert done.get_output() == "went"
    assert done.completed_at is not None and done.completed_at >= done.created_at
    assert done.last_updated_at >= done.created_at
    history = await hub.client.get_orchestration_history("custom-id")
    start = next(e for e in history if isinstance(e, ExecutionStarted))
    assert start.tags == {"team": "a"} and start.version == "2.0" and start.trace_context == trace


async def test_the_tags_stored_are_not_the_callers_dicts(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)
    tags = {"team": "a"}
    await hub.client.schedule_new_orchestration("waiter", instance_id="tagged", tags=tags)
    tags["team"] = "changed after the call"
    state = await hub.client.get_orchestration_state("tagged")
    assert state is not None and state.tags == {"team": "a"}
    state.tags["team"] = "changed on a state read"
    again = await hub.client.get_orchestration_state("tagged")
    assert again is not None and again.tags == {"team": "a"}


async def test_reuse_policy_decides_which_existing_instances_are_replaced(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)
    async with hub.worker(app):
        await hub.client.schedule_new_orchestration("waiter", instance_id="dup")
        with pytest.raises(dtfx.OrchestrationAlreadyExistsError):
            await hub.client.schedule_new_orchestration("waiter", instance_id="dup")
        completed_only = dtfx.OrchestrationIdReusePolicy.of(Status.COMPLETED)
        with pytest.raises(dtfx.OrchestrationAlreadyExistsError):
            await hub.client.schedule_new_orchestration("waiter", instance_id="dup", reuse_id_policy=completed_only)
        await hub.client.raise_orchestration_event("dup", "go", data=1)
        await hub.client.wait_for_orchestration_completion("dup", timeout=10)
        await hub.client.schedule_new_orchestration("waiter", instance_id="dup", reuse_id_policy=completed_only)
        await hub.client.raise_orchestration_event("dup", "go", data=2)
        state = await hub.client.wait_for_orchestration_completion("dup", timeout=10)
    assert state is not None and state.get_output() == 2


async def test_waits_time_out_and_unknown_instances_give_none(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)
    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration("waiter")
        with pytest.raises(dtfx.OrchestrationTimeoutError) as raised:
            await hub.client.wait_for_orchestration_completion(instance_id, timeout=0.2)
        assert isinstance(raised.value, TimeoutError)
        with pytest.raises(dtfx.OrchestrationTimeoutError):  # a timedelta, as purge_orchestrations_by takes
            await hub.client.wait_for_orchestration_completion(instance_id, timeout=timedelta(milliseconds=50))
        started = await hub.client.wait_for_orchestration_start(instance_id, timeout=timedelta(seconds=10))
        assert started is not None and started.runtime_status == Status.RUNNING
        assert await hub.client.get_orchestration_state("nope") is None
        assert await hub.client.wait_for_orchestration_completion("nope", timeout=1) is None
    with pytest.raises(dtfx.OrchestrationNotFoundError):
        await hub.client.raise_orchestration_event("nope", "go")
    with pytest.raises(dtfx.OrchestrationNotFoundError):
        await hub.client.terminate_orchestration("nope")
    with pytest.raises(dtfx.OrchestrationNotFoundError):
        await hub.client.get_orchestration_history("nope")


async def test_terminate_is_recursive_and_keeps_the_output(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)

    @app.orchestrator
    def parent(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_sub_orchestrator("waiter", instance_id="child-1")

    async with hub.worker(app):
        parent_id = await hub.client.schedule_new_orchestration(parent)
        await hub.wait_for_state("child-1", lambda s: s.runtime_status == Status.RUNNING)
        await hub.client.terminate_orchestration(parent_id, output={"reason": "cancelled by user"})
        parent_state = await hub.client.wait_for_orchestration_completion(parent_id, timeout=10)
        child_state = await hub.client.wait_for_orchestration_completion("child-1", timeout=10)
    assert parent_state is not None and child_state is not None
    assert parent_state.runtime_status == Status.TERMINATED
    assert parent_state.get_output() == {"reason": "cancelled by user"}
    assert child_state.runtime_status == Status.TERMINATED


async def test_terminate_without_recursion_leaves_children_running(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)

    @app.orchestrator
    def parent(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_sub_orchestrator("waiter", instance_id="child-2")

    async with hub.worker(app):
        parent_id = await hub.client.schedule_new_orchestration(parent)
        await hub.wait_for_state("child-2", lambda s: s.runtime_status == Status.RUNNING)
        await hub.client.terminate_orchestration(parent_id, recursive=False)
        await hub.client.wait_for_orchestration_completion(parent_id, timeout=10)
        await asyncio.sleep(0.1)
        child = await hub.client.get_orchestration_state("child-2")
    assert child is not None and child.runtime_status == Status.RUNNING


async def test_terminating_an_instance_no_worker_has_started_runs_none_of_its_code(hub: Hub, app: dtfx.App) -> None:
    ran: list[int] = []

    @app.activity
    def step(ctx: dtfx.ActivityContext, n: int) -> int:
        ran.append(n)
        return n

    @app.orchestrator
    def fan_out(ctx: dtfx.OrchestrationContext, count: int) -> Any:
        return (yield dtfx.when_all([ctx.call_activity(step, input=n) for n in range(count)]))

    instance_id = await hub.client.schedule_new_orchestration(fan_out, input=3)
    await hub.client.terminate_orchestration(instance_id, output="never mind")
    async with hub.worker(app):
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
        await asyncio.sleep(0.2)  # an activity queued by mistake would run meanwhile
    assert state is not None
    assert (state.runtime_status, state.get_output()) == (Status.TERMINATED, "never mind")
    assert ran == []


def _eternal_app(app: dtfx.App) -> None:
    @app.orchestrator
    def eternal(ctx: dtfx.OrchestrationContext, n: int) -> Any:
        yield ctx.wait_for_external_event("tick")
        ctx.continue_as_new(n + 1)


async def _tick_then(hub: Hub, app: dtfx.App, request: Callable[[str], Any]) -> str:
    """An instance of ``eternal`` that gets a tick and ``request`` while no worker runs, so
    that one episode has both: the continuation as new and, after it, the request."""
    _eternal_app(app)
    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration("eternal", input=0)
        await hub.wait_for_history(
            instance_id, lambda history: any(type(e).__name__ == "OrchestratorCompleted" for e in history)
        )
    await hub.client.raise_orchestration_event(instance_id, "tick")
    await request(instance_id)
    return instance_id


async def test_a_terminate_that_comes_with_a_continue_as_new_ends_the_instance(hub: Hub, app: dtfx.App) -> None:
    instance_id = await _tick_then(hub, app, lambda i: hub.client.terminate_orchestration(i, output="stop"))
    async with hub.worker(app):
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None
    assert (state.runtime_status, state.get_output(), state.get_input()) == (Status.TERMINATED, "stop", 0)


async def test_a_suspend_that_comes_with_a_continue_as_new_suspends_the_next_execution(hub: Hub, app: dtfx.App) -> None:
    instance_id = await _tick_then(hub, app, lambda i: hub.client.suspend_orchestration(i, reason="hold"))
    async with hub.worker(app):
        await hub.wait_for_state(instance_id, lambda s: s.get_input() == 1)
        await hub.client.raise_orchestration_event(instance_id, "tick")  # held while suspended
        await asyncio.sleep(0.3)
        state = await hub.client.get_orchestration_state(instance_id)
        assert state is not None and (state.runtime_status, state.get_input()) == (Status.SUSPENDED, 1)
        await hub.client.resume_orchestration(instance_id)
        await hub.wait_for_state(instance_id, lambda s: s.get_input() == 2 and s.runtime_status == Status.RUNNING)


async def test_a_terminated_instance_runs_none_of_its_activities_not_yet_begun(hub: Hub, app: dtfx.App) -> None:
    began: list[int] = []
    go_on = threading.Event()

    @app.activity
    def waits(ctx: dtfx.ActivityContext, index: int) -> None:
        began.append(index)
        go_on.wait(10)

    @app.orchestrator
    def fans_out(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield dtfx.when_all([ctx.call_activity(waits, input=index) for index in range(10)])

    one_at_a_time = dtfx.ConcurrencyOptions(maximum_concurrent_activity_work_items=1, maximum_thread_pool_workers=1)
    async with hub.worker(app, concurrency=one_at_a_time):
        instance_id = await hub.client.schedule_new_orchestration(fans_out)
        while not began:
            await asyncio.sleep(0.01)
        await hub.client.terminate_orchestration(instance_id)
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
        go_on.set()  # the one running finishes; the nine queued are gone
        await asyncio.sleep(0.5)
    assert state is not None and state.runtime_status == Status.TERMINATED
    assert len(began) == 1


async def test_terminate_a_scheduled_instance_before_it_starts(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)
    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration(
            "waiter", input="in", start_at=utc_now() + timedelta(hours=1)
        )
        await hub.client.terminate_orchestration(instance_id, output="never mind")
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
        await asyncio.sleep(0.1)  # nothing more comes of its start
    assert state is not None
    assert state.runtime_status == Status.TERMINATED and state.get_output() == "never mind"
    # Its history is that of an execution ended at its start, as for one not scheduled.
    history = await hub.client.get_orchestration_history(instance_id)
    assert [type(event).__name__ for event in history] == [
        "OrchestratorStarted",
        "ExecutionStarted",
        "ExecutionTerminated",
        "OrchestratorCompleted",
        "ExecutionCompleted",
    ]
    assert isinstance(history[1], ExecutionStarted) and history[1].input == '"in"'
    assert await hub.backend.next_visible_at(WorkKind.ORCHESTRATION) is None  # its start is not left behind


async def test_terminate_a_scheduled_instance_whose_earlier_events_wait_for_its_start(hub: Hub, app: dtfx.App) -> None:
    # The suspend (or an event) cannot be applied before the start: the worker leaves it in the
    # inbox until the scheduled start. A terminate does not wait for that.
    _waiter_app(app)
    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration("waiter", start_at=utc_now() + timedelta(hours=1))
        await hub.client.suspend_orchestration(instance_id)
        await hub.client.raise_orchestration_event(instance_id, "go", data="early")
        await asyncio.sleep(0.3)  # the worker looks at them, and puts them off
        await hub.client.terminate_orchestration(instance_id, output="never mind")
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None
    assert state.runtime_status == Status.TERMINATED and state.get_output() == "never mind"


async def test_restart_with_the_same_or_a_new_id(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def echo(ctx: dtfx.OrchestrationContext, value: Any) -> Any:
        return {"value": value, "execution": ctx.execution_id}

    async with hub.worker(app):
        first = await hub.run(echo, "payload", instance_id="r1")
        same_id = await hub.client.restart_orchestration("r1")
        assert same_id == "r1"
        again = await hub.client.wait_for_orchestration_completion("r1", timeout=10)
        new_id = await hub.client.restart_orchestration("r1", restart_with_new_instance_id=True)
        fresh = await hub.client.wait_for_orchestration_completion(new_id, timeout=10)
    assert again is not None and fresh is not None and new_id != "r1"
    assert again.get_output()["value"] == fresh.get_output()["value"] == "payload"
    assert again.get_output()["execution"] != first.get_output()["execution"]


async def test_restart_of_a_running_instance_needs_a_new_id_and_of_an_unknown_one_fails(
    hub: Hub, app: dtfx.App
) -> None:
    _waiter_app(app)
    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration("waiter", input="same input", tags={"t": "1"})
        with pytest.raises(dtfx.OrchestrationStateError, match="under the same id"):
            await hub.client.restart_orchestration(instance_id)
        copy = await hub.client.restart_orchestration(instance_id, restart_with_new_instance_id=True)
        for running in (instance_id, copy):
            state = await hub.client.wait_for_orchestration_start(running, timeout=10, fetch_payloads=True)
            assert state is not None and state.runtime_status == Status.RUNNING
            assert (state.get_input(), state.tags) == ("same input", {"t": "1"})
    with pytest.raises(dtfx.OrchestrationNotFoundError):
        await hub.client.restart_orchestration("nope")


async def test_restarts_racing_under_one_id_start_it_once_and_refuse_the_others_alike(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)
    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration("waiter")
        await hub.client.terminate_orchestration(instance_id)
        await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
        outcomes = await asyncio.gather(
            *(hub.client.restart_orchestration(instance_id) for _ in range(4)), return_exceptions=True
        )
    assert outcomes.count(instance_id) == 1
    refusals = [outcome for outcome in outcomes if outcome != instance_id]
    assert all(isinstance(refused, dtfx.OrchestrationStateError) for refused in refusals), refusals


async def test_rewind_reruns_only_what_failed(hub: Hub, app: dtfx.App) -> None:
    calls: dict[str, int] = {"good": 0, "flaky": 0, "child": 0}
    broken = {"value": True}

    @app.activity
    def good(ctx: dtfx.ActivityContext, _: Any) -> str:
        calls["good"] += 1
        return "good"

    @app.activity
    def flaky(ctx: dtfx.ActivityContext, _: Any) -> str:
        calls["flaky"] += 1
        if broken["value"]:
            raise RuntimeError("dependency down")
        return "flaky"

    @app.orchestrator
    def child(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        if not ctx.is_replaying:
            calls["child"] += 1
        return (yield ctx.call_activity(flaky))

    @app.orchestrator
    def pipeline(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        first = yield ctx.call_activity(good)
        second = yield ctx.call_activity(flaky)
        third = yield ctx.call_sub_orchestrator(child, instance_id="rewind-child")
        return [first, second, third]

    async with hub.worker(app):
        failed = await hub.run(pipeline, instance_id="rw")
        assert failed.runtime_status == Status.FAILED
        broken["value"] = False
        await hub.client.rewind_orchestration("rw", reason="fixed the dependency")
        state = await hub.client.wait_for_orchestration_completion("rw", timeout=10)
    assert state is not None and state.runtime_status == Status.COMPLETED
    assert state.get_output() == ["good", "flaky", "flaky"]
    assert calls["good"] == 1  # what succeeded is not repeated
    assert calls["flaky"] == 3  # the failed call, its rerun, and the child's call
    assert calls["child"] == 1


async def test_rewind_refuses_instances_that_did_not_fail(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)
    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration("waiter")
        with pytest.raises(dtfx.OrchestrationStateError):
            await hub.client.rewind_orchestration(instance_id)
    with pytest.raises(dtfx.OrchestrationNotFoundError):
        await hub.client.rewind_orchestration("nope")


def _breakable(app: dtfx.App, broken: dict[str, bool], name: str, works: str) -> str:
    """Registers the activity ``name``, which fails while ``broken["value"]`` and returns
    ``works`` after; returns its name, to call it by."""

    def activity(ctx: dtfx.ActivityContext, _: Any) -> str:
        if broken["value"]:
            raise RuntimeError(f"{name} is broken")
        return works

    app.add_activity(activity, name=name)
    return name


async def test_rewind_refuses_an_instance_that_failed_inside_a_critical_section(hub: Hub, app: dtfx.App) -> None:
    """Its locks went when it failed: a rewind would go on inside the section without them, and
    so would a rewind of its parent, which rewinds it. A section that had ended before the
    failure is no obstacle."""
    broken = {"value": True}

    @app.entity
    def ledger(ctx: dtfx.EntityContext, amount: int | None) -> int:
        ctx.set_state(ctx.get_state(int, 0) + (amount or 0))
        return int(ctx.get_state(int, 0))

    flaky = _breakable(app, broken, "flaky", "flaky")

    @app.orchestrator
    def transfer(ctx: dtfx.OrchestrationContext, inside: bool) -> Any:
        books = dtfx.EntityInstanceId("ledger", "books")
        with (yield ctx.lock_entities([books])):
            total = yield ctx.call_entity(books, "add", 1)
            if inside:
                yield ctx.call_activity(flaky)
        if not inside:
            yield ctx.call_activity(flaky)
        return total

    @app.orchestrator
    def parent(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_sub_orchestrator(transfer, input=True, instance_id="rw-child"))

    async with hub.worker(app):
        inside = await hub.run(transfer, True, instance_id="rw-inside")
        outside = await hub.run(transfer, False, instance_id="rw-outside")
        above = await hub.run(parent, instance_id="rw-parent")
        assert inside.runtime_status == outside.runtime_status == above.runtime_status == Status.FAILED
        broken["value"] = False
        with pytest.raises(dtfx.OrchestrationStateError, match=r"inside a critical section.*@ledger@books.*Restart it"):
            await hub.client.rewind_orchestration("rw-inside")
        with pytest.raises(dtfx.OrchestrationStateError, match="its sub-orchestration 'rw-child'"):
            await hub.client.rewind_orchestration("rw-parent")
        await hub.client.rewind_orchestration("rw-outside")
        state = await hub.client.wait_for_orchestration_completion("rw-outside", timeout=10)
    assert state is not None and state.runtime_status == Status.COMPLETED and state.get_output() == 2
    refused = await hub.client.get_orchestration_state("rw-inside")
    assert refused is not None and refused.runtime_status == Status.FAILED


async def test_rewind_keeps_succeeded_retries(hub: Hub, app: dtfx.App) -> None:
    attempts = {"retried": 0, "final": 0}
    broken = {"value": True}

    @app.activity
    def retried(ctx: dtfx.ActivityContext, _: Any) -> str:
        attempts["retried"] += 1
        if attempts["retried"] == 1:
            raise ConnectionError("once")
        return "retried ok"

    @app.activity
    def final(ctx: dtfx.ActivityContext, _: Any) -> str:
        attempts["final"] += 1
        if broken["value"]:
            raise ConnectionError("always")
        return "final ok"

    policy = dtfx.RetryPolicy(first_retry_interval=timedelta(milliseconds=20), max_number_of_attempts=2)

    @app.orchestrator
    def chain(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        first = yield ctx.call_activity(retried, retry_policy=policy)
        second = yield ctx.call_activity(final, retry_policy=policy)
        return [first, second]

    async with hub.worker(app):
        failed = await hub.run(chain)
        assert failed.runtime_status == Status.FAILED
        broken["value"] = False
        await hub.client.rewind_orchestration(failed.instance_id)
        state = await hub.client.wait_for_orchestration_completion(failed.instance_id, timeout=10)
    assert state is not None and state.get_output() == ["retried ok", "final ok"]
    assert attempts == {"retried": 2, "final": 3}


def _rewound_family(app: dtfx.App, broken: dict[str, bool], calls: dict[str, int]) -> None:
    """Registers ``family``, which returns what its child ``fragile_child`` returns, and the child
    fails (after an activity that succeeds) while ``broken["value"]``."""

    @app.activity
    def steady(ctx: dtfx.ActivityContext, _: Any) -> str:
        calls["steady"] = calls.get("steady", 0) + 1
        return "steady"

    breakable = _breakable(app, broken, "breakable", "mended")

    @app.orchestrator
    def fragile_child(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return [(yield ctx.call_activity(steady)), (yield ctx.call_activity(breakable))]

    @app.orchestrator
    def family(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_sub_orchestrator(fragile_child, instance_id=f"{ctx.instance_id}-child"))


def _rewinds(history: list[Any]) -> list[str | None]:
    return [event.reason for event in history if isinstance(event, ExecutionRewound)]


async def test_rewinding_a_parent_whose_child_was_rewound_first_takes_the_childs_result(
    hub: Hub, app: dtfx.App
) -> None:
    broken, calls = {"value": True}, {"steady": 0}
    _rewound_family(app, broken, calls)
    async with hub.worker(app):
        failed = await hub.run("family", instance_id="fam")
        assert failed.runtime_status == Status.FAILED
        broken["value"] = False
        await hub.client.rewind_orchestration("fam-child", reason="child first")
        child = await hub.client.wait_for_orchestration_completion("fam-child", timeout=10)
        assert child is not None and child.runtime_status == Status.COMPLETED
        parent = await hub.client.get_orchestration_state("fam")
        assert parent is not None and parent.runtime_status == Status.FAILED  # it dropped the child's news

        await hub.client.rewind_orchestration("fam", reason="then the parent")
        state = await hub.client.wait_for_orchestration_completion("fam", timeout=10)
    assert state is not None and state.runtime_status == Status.COMPLETED
    assert state.get_output() == ["steady", "mended"]
    assert calls["steady"] == 1  # the child was not run again
    assert _rewinds(await hub.client.get_orchestration_history("fam")) == ["then the parent"]
    assert _rewinds(await hub.client.get_orchestration_history("fam-child")) == ["child first"]


async def test_a_rewind_reaches_the_failed_child_with_its_reason(hub: Hub, app: dtfx.App) -> None:
    broken, calls = {"value": True}, {"steady": 0}
    _rewound_family(app, broken, calls)
    async with hub.worker(app):
        assert (await hub.run("family", instance_id="fam")).runtime_status == Status.FAILED
        child = await hub.client.get_orchestration_state("fam-child")
        assert child is not None and child.runtime_status == Status.FAILED
        broken["value"] = False
        await hub.client.rewind_orchestration("fam", reason="mended")
        state = await hub.client.wait_for_orchestration_completion("fam", timeout=10)
    assert state is not None and state.get_output() == ["steady", "mended"]
    assert calls["steady"] == 1  # what succeeded in the child is not repeated
    assert _rewinds(await hub.client.get_orchestration_history("fam")) == ["mended"]
    assert _rewinds(await hub.client.get_orchestration_history("fam-child")) == ["mended"]


async def test_a_rewind_asks_again_for_what_had_not_come_back_when_the_instance_failed(hub: Hub, app: dtfx.App) -> None:
    """An activity, a timer and a sub-orchestration still under way then: their news reached
    a FAILED instance, which dropped it. So does an event raised along with the rewind."""
    _waiter_app(app)
    broken = {"value": True}
    slow_may_finish = asyncio.Event()

    fails_fast = _breakable(app, broken, "fails_fast", "fast")

    @app.activity
    async def slow(ctx: dtfx.ActivityContext, _: Any) -> str:
        await slow_may_finish.wait()
        return "slow"

    @app.orchestrator
    def many_at_once(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        fast = ctx.call_activity(fails_fast)
        rest = [
            ctx.call_activity(slow),
            ctx.create_timer(timedelta(milliseconds=100)),
            ctx.call_sub_orchestrator("waiter", instance_id="many-child"),
        ]
        first = yield fast  # fails the instance while the rest are under way
        others = yield dtfx.when_all(rest)
        approval = yield ctx.wait_for_external_event("approve")
        return [first, others[0], others[2], approval]

    async with hub.worker(app):
        failed = await hub.run(many_at_once, instance_id="many")
        assert failed.runtime_status == Status.FAILED
        slow_may_finish.set()  # its result, the timer's and the child's reach the FAILED parent
        await hub.client.raise_orchestration_event("many-child", "go", data="child")
        await hub.wait_for_state("many-child", lambda s: s.runtime_status == Status.COMPLETED)
        await asyncio.sleep(0.2)
    broken["value"] = False
    await hub.client.rewind_orchestration("many")
    await hub.client.raise_orchestration_event("many", "approve", data="yes")  # with the rewind, in one work item
    async with hub.worker(app):
        state = await hub.client.wait_for_orchestration_completion("many", timeout=10)
    assert state is not None and state.get_output() == ["fast", "slow", "child", "yes"]


async def test_rewinding_a_parent_whose_failed_child_was_purged_fails_it_again(hub: Hub, app: dtfx.App) -> None:
    broken, calls = {"value": True}, {"steady": 0}
    _rewound_family(app, broken, calls)
    async with hub.worker(app):
        assert (await hub.run("family", instance_id="fam")).runtime_status == Status.FAILED
        assert (await hub.client.purge_orchestration("fam-child")).deleted_instance_count == 1
        await hub.client.rewind_orchestration("fam")
        state = await hub.client.wait_for_orchestration_completion("fam", timeout=10)
    assert state is not None and state.runtime_status == Status.FAILED
    assert state.failure_details is not None
    assert "'fam-child' cannot be rewound: it was purged" in str(state.failure_details)


async def test_a_child_refused_because_its_id_was_taken_is_not_the_parents(hub: Hub, app: dtfx.App) -> None:
    """Neither rewound nor purged with the parent: the instance under that id is another's."""
    _waiter_app(app)

    @app.orchestrator
    def borrower(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_sub_orchestrator("waiter", instance_id="taken"))

    async with hub.worker(app):
        await hub.client.schedule_new_orchestration("waiter", instance_id="taken")
        await hub.client.wait_for_orchestration_start("taken", timeout=10)
        failed = await hub.run(borrower, instance_id="borrower")
        assert failed.runtime_status == Status.FAILED
        refusal = failed.failure_details.inner_failure if failed.failure_details else None
        assert refusal is not None and refusal.is_caused_by(dtfx.OrchestrationAlreadyExistsError)
        await hub.client.rewind_orchestration("borrower")  # asks for the child again: refused again
        again = await hub.client.wait_for_orchestration_completion("borrower", timeout=10)
        assert again is not None and again.runtime_status == Status.FAILED
        taken = await hub.client.get_orchestration_state("taken")
        assert taken is not None and taken.runtime_status == Status.RUNNING and taken.parent_instance_id is None
        await hub.client.raise_orchestration_event("taken", "go", data="its own")
        done = await hub.client.wait_for_orchestration_completion("taken", timeout=10)
        assert done is not None and done.get_output() == "its own"
        assert (await hub.client.purge_orchestration("borrower", recursive=True)).deleted_instance_count == 1
    assert await hub.client.get_orchestration_state("taken") is not None


async def test_a_sub_orchestration_asked_for_under_its_parents_own_id_is_refused(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)

    @app.orchestrator
    def narcissus(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_sub_orchestrator("waiter", instance_id=ctx.instance_id)
        except dtfx.TaskFailedError as error:
            return error.details.is_caused_by(dtfx.OrchestrationAlreadyExistsError)
        return "the child took its parent's place"

    async with hub.worker(app):
        state = await hub.run(narcissus)
    assert state.runtime_status == Status.COMPLETED and state.get_output() is True


BAD_CHILD_IDS = ["child\x00with-nul", "@counter@child", "c" * 1025]


def _parent_of_one_child(app: dtfx.App) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Registers ``child`` and ``careless``, which calls ``child`` under the id it is given."""

    @app.orchestrator
    def child(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return "child ran"

    @app.orchestrator
    def careless(ctx: dtfx.OrchestrationContext, child_id: str) -> Any:
        return (yield ctx.call_sub_orchestrator(child, instance_id=child_id))

    return child, careless


async def test_a_sub_orchestration_under_a_bad_id_fails_in_its_parent(hub: Hub, app: dtfx.App) -> None:
    """The id never reaches the store (PostgreSQL would refuse the NUL, and the whole batch's commit with it)."""
    child, careless = _parent_of_one_child(app)

    @app.orchestrator
    def careful(ctx: dtfx.OrchestrationContext, child_id: str) -> Any:
        try:
            yield ctx.call_sub_orchestrator(child, instance_id=child_id)
        except dtfx.TaskFailedError as error:
            caught = [error.details.is_caused_by(dtfx.InvalidInstanceIdError), error.details.is_non_retriable]
            return [*caught, (yield ctx.call_sub_orchestrator(child, instance_id=f"{ctx.instance_id}-good"))]
        return "the bad id was taken"

    careful_ids = [f"careful-{n}" for n in range(len(BAD_CHILD_IDS))]
    for instance_id, bad in zip(careful_ids, BAD_CHILD_IDS, strict=True):  # all waiting: committed together
        await hub.client.schedule_new_orchestration(careful, input=bad, instance_id=instance_id)
    await hub.client.schedule_new_orchestration(careless, input=BAD_CHILD_IDS[0], instance_id="careless")
    await hub.client.schedule_new_orchestration(child, instance_id="bystander")
    async with hub.worker(app):
        for instance_id in careful_ids:
            state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=20)
            assert state is not None and state.get_output() == [True, True, "child ran"], state
        bystander = await hub.client.wait_for_orchestration_completion("bystander", timeout=20)
        assert bystander is not None and bystander.runtime_status == Status.COMPLETED
        failed = await hub.client.wait_for_orchestration_completion("careless", timeout=20)
        assert failed is not None and failed.runtime_status == Status.FAILED
        assert failed.failure_details is not None and "control character" in failed.failure_details.message

        # Rewinding asks for the child again, and it is refused again: nothing goes to the bad id.
        await hub.client.rewind_orchestration("careless")
        again = await hub.client.wait_for_orchestration_completion("careless", timeout=20)
        assert again is not None and again.runtime_status == Status.FAILED
    history = await hub.client.get_orchestration_history("careless")
    assert [type(e) for e in history].count(SubOrchestrationInstanceFailed) == 1
    stored = {state.instance_id for state in await hub.client.get_all_orchestration_states()}
    assert stored == {*careful_ids, *(f"{instance_id}-good" for instance_id in careful_ids), "careless", "bystander"}
    assert (await hub.client.purge_orchestration("careless", recursive=True)).deleted_instance_count == 1


async def test_terminating_a_parent_sends_nothing_to_a_child_refused_for_its_id(hub: Hub, app: dtfx.App) -> None:
    child, parent = _parent_of_one_child(app)
    # Terminated before its first episode: that episode asks for the child and ends the parent at once.
    instance_id = await hub.client.schedule_new_orchestration(parent, input=BAD_CHILD_IDS[0])
    await hub.client.terminate_orchestration(instance_id, output="stop")  # recursive
    async with hub.worker(app):
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=20)
        bystander = await hub.run(child)
    assert state is not None and state.runtime_status == Status.TERMINATED
    assert bystander.runtime_status == Status.COMPLETED


async def test_purge_single_recursive_and_by_filter(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)

    @app.orchestrator
    def leaf(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return "leaf"

    @app.orchestrator
    def tree(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_sub_orchestrator(leaf, instance_id=f"{ctx.instance_id}-leaf"))

    async with hub.worker(app):
        await hub.run(leaf, instance_id="lonely")
        await hub.run(tree, instance_id="t1")
        await hub.run(tree, instance_id="t2")
        running = await hub.client.schedule_new_orchestration("waiter")
        await hub.client.wait_for_orchestration_start(running, timeout=5)

        assert (await hub.client.purge_orchestration("lonely")).deleted_instance_count == 1
        assert await hub.client.get_orchestration_state("lonely") is None
        assert (await hub.client.purge_orchestration("missing")).deleted_instance_count == 0
        assert (await hub.client.purge_orchestration(running)).deleted_instance_count == 0
        assert (await hub.client.purge_orchestration("t1", recursive=True)).deleted_instance_count == 2
        assert await hub.client.get_orchestration_state("t1-leaf") is None
        running_only = await hub.client.purge_orchestrations_by(runtime_status=[Status.RUNNING])
        assert running_only.deleted_instance_count == 0  # a running instance is never purged
        result = await hub.client.purge_orchestrations_by(
            created_time_from=utc_now() - timedelta(minutes=5), runtime_status=[Status.COMPLETED]
        )
        assert result.deleted_instance_count == 2 and result.is_complete
        remaining = await hub.client.get_all_orchestration_states()
    assert [s.instance_id for s in remaining] == [running]


async def test_a_purge_that_runs_out_of_time_says_whether_any_were_left(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def quick(ctx: dtfx.OrchestrationContext, n: int) -> Any:
        return n

    async with hub.worker(app):
        for n in range(3):
            await hub.run(quick, n)
    no_time = timedelta(0)
    everything = await hub.client.purge_orchestrations_by(timeout=no_time)  # one page, every instance
    assert (everything.deleted_instance_count, everything.is_complete) == (3, True)

    async with hub.worker(app):
        for n in range(501):  # more than a page
            await hub.client.schedule_new_orchestration(quick, input=n, instance_id=f"q{n:03}")
        for n in range(501):
            await hub.client.wait_for_orchestration_completion(f"q{n:03}", timeout=30)
    done = await hub.client.get_all_orchestration_states(dtfx.OrchestrationQuery(runtime_status=[Status.COMPLETED]))
    assert len(done) == 501
    first_page = await hub.client.purge_orchestrations_by(timeout=no_time)
    assert (first_page.deleted_instance_count, first_page.is_complete) == (500, False)
    rest = await hub.client.purge_orchestrations_by()
    assert (rest.deleted_instance_count, rest.is_complete) == (1, True)


async def test_query_filters_and_paging(hub: Hub, app: dtfx.App) -> None:
    _waiter_app(app)

    @app.orchestrator
    def quick(ctx: dtfx.OrchestrationContext, n: int) -> Any:
        return n

    async with hub.worker(app):
        for n in range(5):
            await hub.run(quick, n, instance_id=f"batch-{n}")
        before = utc_now()
        await hub.client.schedule_new_orchestration("waiter", instance_id="pending-one")
        await hub.client.wait_for_orchestration_start("pending-one", timeout=5)

        page = await hub.client.query_orchestrations(dtfx.OrchestrationQuery(max_instance_count=2))
        assert [s.instance_id for s in page.items] == ["batch-0", "batch-1"]
        everything = await hub.client.get_all_orchestration_states(dtfx.OrchestrationQuery(max_instance_count=2))
        assert len(everything) == 6
        running = await hub.client.get_all_orchestration_states(
            dtfx.OrchestrationQuery(runtime_status=[Status.RUNNING])
        )
        assert [s.instance_id for s in running] == ["pending-one"]
        recent = await hub.client.get_all_orchestration_states(dtfx.OrchestrationQuery(created_time_from=before))
        assert [s.instance_id for s in recent] == ["pending-one"]
        prefixed = await hub.client.get_all_orchestration_states(
            dtfx.OrchestrationQuery(instance_id_prefix="batch-", fetch_inputs_and_outputs=True)
        )
        assert [s.get_output() for s in prefixed] == [0, 1, 2, 3, 4]
        ids = await hub.client.list_instance_ids(page_size=3)
        assert ids.items == ["batch-0", "batch-1", "batch-2"] and ids.continuation_token
        rest = await hub.client.list_instance_ids(page_size=3, continuation_token=ids.continuation_token)
        assert rest.items == ["batch-3", "batch-4"] and rest.continuation_token is None
        assert (await hub.client.list_instance_ids([Status.RUNNING])).items == []  # only ended ones, as over gRPC
        assert (await hub.client.list_instance_ids([Status.RUNNING, Status.COMPLETED])).items == [
            *ids.items,
            *rest.items,
        ]


async def test_history_tells_the_story(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def hello(ctx: dtfx.ActivityContext, name: str) -> str:
        return f"hi {name}"

    @app.orchestrator
    def greet(ctx: dtfx.OrchestrationContext, name: str) -> Any:
        return (yield ctx.call_activity(hello, input=name))

    async with hub.worker(app):
        state = await hub.run(greet, "ann")
    history = await hub.client.get_orchestration_history(state.instance_id)
    assert [type(e).__name__ for e in history] == [
        "OrchestratorStarted",
        "ExecutionStarted",
        "TaskScheduled",
        "OrchestratorCompleted",
        "OrchestratorStarted",
        "TaskCompleted",
        "OrchestratorCompleted",
        "ExecutionCompleted",
    ]
    completed = next(e for e in history if isinstance(e, TaskCompleted))
    assert completed.result == '"hi ann"'


def test_the_sync_client_and_a_threaded_worker(app: dtfx.App) -> None:
    @app.activity
    def add(ctx: dtfx.ActivityContext, pair: list[int]) -> int:
        return pair[0] + pair[1]

    @app.orchestrator
    def adder(ctx: dtfx.OrchestrationContext, pair: list[int]) -> Any:
        return (yield ctx.call_activity(add, input=pair))

    backend = dtfx.MemoryBackend()
    with dtfx.Worker(backend, app=app), dtfx.Client(backend) as client:
        instance_id = client.schedule_new_orchestration(adder, input=[2, 3])
        state = client.wait_for_orchestration_completion(instance_id, timeout=10)
        assert state is not None and state.get_output() == 5
        assert client.get_orchestration_state(instance_id) is not None
        assert [s.instance_id for s in client.get_all_orchestration_states()] == [instance_id]
        assert client.purge_orchestration(instance_id).deleted_instance_count == 1
