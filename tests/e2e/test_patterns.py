"""Every orchestration pattern of the Durable Task model, end to end through a worker."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pydantic
import pytest

import dtfx
from dtfx import OrchestrationStatus as Status
from dtfx.core.history import EventRaised, OrchestratorStarted, TimerCreated, TimerFired
from tests.e2e.conftest import Hub

NO_CACHE = dtfx.WorkerOptions(cached_instances=0)


async def test_sequence_hello_cities(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def say_hello(ctx: dtfx.ActivityContext, city: str) -> str:
        return f"Hello, {city}!"

    @app.orchestrator
    def hello_cities(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        greetings = []
        for city in ("Tokyo", "Seattle", "London"):
            greetings.append((yield ctx.call_activity(say_hello, input=city)))
        return greetings

    async with hub.worker(app):
        state = await hub.run(hello_cities)
    assert state.runtime_status == Status.COMPLETED
    assert state.get_output() == ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]


async def test_async_activities_and_named_registration(hub: Hub, app: dtfx.App) -> None:
    @app.activity(name="Double")
    async def double(ctx: dtfx.ActivityContext, value: int) -> int:
        await asyncio.sleep(0)
        return value * 2

    @app.orchestrator(name="Doubler")
    def doubler(ctx: dtfx.OrchestrationContext, value: int) -> Any:
        by_reference = yield ctx.call_activity(double, input=value)
        by_name = yield ctx.call_activity("Double", input=by_reference)
        return by_name

    async with hub.worker(app):
        state = await hub.run("Doubler", 5)
    assert state.get_output() == 20
    assert state.name == "Doubler"


async def test_worker_add_methods_register_like_the_sdk(hub: Hub) -> None:
    def square(ctx: dtfx.ActivityContext, value: int) -> int:
        return value * value

    def squares(ctx: dtfx.OrchestrationContext, values: list[int]) -> Any:
        return (yield dtfx.when_all([ctx.call_activity(square, input=v) for v in values]))

    worker = dtfx.Worker(hub.backend)
    assert worker.add_activity(square) == "square"
    assert worker.add_orchestrator(squares, name="squares_v1") == "squares_v1"
    async with worker:
        state = await hub.run("squares_v1", [1, 2, 3])
    assert state.get_output() == [1, 4, 9]


def test_an_async_orchestrator_is_refused_when_registered() -> None:
    app = dtfx.App()

    async def not_a_generator(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return None

    class CallsAsync:
        async def __call__(self, ctx: dtfx.OrchestrationContext, _: Any) -> Any:
            return None

    with pytest.raises(TypeError, match="'not_a_generator' is an async function: orchestrators are generator"):
        app.orchestrator(not_a_generator)
    with pytest.raises(TypeError, match="'calls_async' is an async function"):
        app.add_orchestrator(CallsAsync(), name="calls_async")
    assert app.orchestrators == {}


def test_registrations_that_could_not_run_are_refused() -> None:
    app = dtfx.App()

    def act(ctx: dtfx.ActivityContext, _: Any) -> None:
        return None

    cases: list[tuple[type[Exception], str, Any]] = [
        (TypeError, "The activity to register must be callable, not str", lambda: app.add_activity("act")),  # type: ignore[arg-type]
        (ValueError, "The name of the activity is empty", lambda: app.add_activity(act, name="")),
        (TypeError, "name must be a str, not int", lambda: app.add_activity(act, name=5)),  # type: ignore[arg-type]
        (ValueError, "has a NUL character", lambda: app.add_orchestrator(act, name="a\x00b")),
        (ValueError, "The name of the entity is empty", lambda: app.add_entity(act, name=" ")),
        (
            ValueError,
            "maximum_thread_pool_workers must be at least 1",
            lambda: dtfx.ConcurrencyOptions(maximum_thread_pool_workers=0),
        ),
    ]
    for error, complaint, register in cases:
        with pytest.raises(error, match=complaint):
            register()
    assert (app.orchestrators, app.activities, app.entities) == ({}, {}, {})


async def test_fan_out_fan_in(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def work(ctx: dtfx.ActivityContext, item: int) -> int:
        return item * 10

    @app.orchestrator
    def fan_out(ctx: dtfx.OrchestrationContext, count: int) -> Any:
        results = yield dtfx.when_all([ctx.call_activity(work, input=i) for i in range(count)])
        return sum(results)

    async with hub.worker(app):
        state = await hub.run(fan_out, 200)
    assert state.runtime_status == Status.COMPLETED
    assert state.get_output() == sum(i * 10 for i in range(200))


async def test_when_any_returns_the_first_task_to_finish(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    async def quick(ctx: dtfx.ActivityContext, _: Any) -> str:
        return "quick"

    @app.orchestrator
    def race(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        activity = ctx.call_activity(quick)
        timer = ctx.create_timer(timedelta(seconds=30))
        winner = yield dtfx.when_any([activity, timer])
        return "activity" if winner is activity else "timer"

    async with hub.worker(app):
        state = await hub.run(race)
    assert state.get_output() == "activity"


async def test_durable_timers_take_a_delay_or_a_moment(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def sleeper(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        started = ctx.current_utc_datetime
        yield ctx.create_timer(timedelta(milliseconds=200))
        after_delay = ctx.current_utc_datetime
        yield ctx.create_timer(after_delay + timedelta(milliseconds=200))
        after_moment = ctx.current_utc_datetime
        return [(after_delay - started).total_seconds(), (after_moment - after_delay).total_seconds()]

    async with hub.worker(app):
        state = await hub.run(sleeper)
    first, second = state.get_output()
    assert first >= 0.2 and second >= 0.2
    history = await hub.client.get_orchestration_history(state.instance_id)
    timers = [e for e in history if isinstance(e, TimerCreated)]
    fired = [e for e in history if isinstance(e, TimerFired)]
    assert len(timers) == 2 and [f.timer_id for f in fired] == [t.event_id for t in timers]


async def test_current_utc_datetime_comes_from_orchestrator_started(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def noop(ctx: dtfx.ActivityContext, _: Any) -> None:
        return None

    @app.orchestrator
    def clock(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        seen = [ctx.current_utc_datetime.isoformat()]
        yield ctx.call_activity(noop)
        seen.append(ctx.current_utc_datetime.isoformat())
        return seen

    async with hub.worker(app, options=NO_CACHE):
        state = await hub.run(clock)
    history = await hub.client.get_orchestration_history(state.instance_id)
    episode_starts = [e.timestamp.isoformat() for e in history if isinstance(e, OrchestratorStarted)]
    assert state.get_output() == episode_starts


async def test_external_events_are_buffered_and_case_insensitive(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def approval(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(timedelta(milliseconds=300))  # the events arrive before anyone waits
        first = yield ctx.wait_for_external_event("Approval")
        second = yield ctx.wait_for_external_event("APPROVAL")
        return [first, second]

    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration(approval)
        await hub.client.raise_orchestration_event(instance_id, "approval", data={"by": "ann"})
        await hub.client.raise_orchestration_event(instance_id, "ApProVal", data={"by": "bob"})
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == [{"by": "ann"}, {"by": "bob"}]


@pytest.mark.parametrize("send_event", [True, False])
async def test_external_event_with_timeout(hub: Hub, app: dtfx.App, send_event: bool) -> None:
    @app.orchestrator
    def wait_or_timeout(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        event = ctx.wait_for_external_event("go")
        timeout = ctx.create_timer(timedelta(seconds=1 if send_event else 0.2))
        winner = yield dtfx.when_any([event, timeout])
        if winner is timeout:
            event.cancel()
            return "timed out"
        return f"got {event.get_result()}"

    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration(wait_or_timeout)
        if send_event:
            await hub.client.wait_for_orchestration_start(instance_id, timeout=5)
            await hub.client.raise_orchestration_event(instance_id, "go", data=42)
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None
    assert state.get_output() == ("got 42" if send_event else "timed out")


async def test_an_event_raised_before_the_deadline_wins_though_no_worker_ran_until_after_it(
    hub: Hub, app: dtfx.App
) -> None:
    # Both messages wait in the inbox, the timer's written first (when the timer was made).
    @app.orchestrator
    def approval(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        answer = ctx.wait_for_external_event("approval")
        deadline = ctx.create_timer(timedelta(seconds=0.5))
        winner = yield dtfx.when_any([answer, deadline])
        return "expired" if winner is deadline else f"approved: {answer.get_result()}"

    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration(approval)
        await hub.wait_for_history(instance_id, lambda h: any(isinstance(e, TimerCreated) for e in h))
    await hub.client.raise_orchestration_event(instance_id, "approval", data="yes")  # in time
    await asyncio.sleep(0.7)  # the deadline passes, no worker running
    async with hub.worker(app):
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "approved: yes"
    history = await hub.client.get_orchestration_history(instance_id)
    taken = [type(event).__name__ for event in history if isinstance(event, EventRaised | TimerFired)]
    assert taken == ["EventRaised", "TimerFired"]  # in the order they happened


async def test_sub_orchestrations_with_explicit_and_default_ids(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def child(ctx: dtfx.OrchestrationContext, value: int) -> Any:
        return {"value": value * 2, "id": ctx.instance_id, "parent": ctx.parent_instance_id}

    @app.orchestrator
    def parent(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        named = yield ctx.call_sub_orchestrator(child, input=1, instance_id=f"{ctx.instance_id}-named")
        default = yield ctx.call_sub_orchestrator(child, input=2)
        return [named, default]

    async with hub.worker(app):
        state = await hub.run(parent, instance_id="p1")
    named, default = state.get_output()
    assert named == {"value": 2, "id": "p1-named", "parent": "p1"}
    assert default == {"value": 4, "id": "p1:0002", "parent": "p1"}
    child_state = await hub.client.get_orchestration_state("p1:0002")
    assert child_state is not None and child_state.parent_instance_id == "p1"


async def test_sub_orchestration_failure_reaches_the_parent(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def broken(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        raise ValueError("child broke")

    @app.orchestrator
    def parent(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_sub_orchestrator(broken)
        except dtfx.TaskFailedError as error:
            return [error.details.error_type, error.details.message]
        return "no error"

    async with hub.worker(app):
        state = await hub.run(parent)
    assert state.get_output() == ["ValueError", "child broke"]


async def test_send_event_to_another_instance(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def receiver(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("ping"))

    @app.orchestrator
    def sender(ctx: dtfx.OrchestrationContext, target: str) -> Any:
        ctx.send_event(target, "ping", data={"from": ctx.instance_id})
        ctx.send_event("nobody-home", "ping", data=1)  # dropped, and the sender does not mind
        return "sent"

    async with hub.worker(app):
        receiver_id = await hub.client.schedule_new_orchestration(receiver)
        sent = await hub.run(sender, receiver_id, instance_id="the-sender")
        received = await hub.client.wait_for_orchestration_completion(receiver_id, timeout=10)
    assert sent.get_output() == "sent"
    assert received is not None and received.get_output() == {"from": "the-sender"}


async def test_continue_as_new_restarts_with_new_input(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def step(ctx: dtfx.ActivityContext, n: int) -> int:
        return n + 1

    @app.orchestrator
    def counter(ctx: dtfx.OrchestrationContext, n: int) -> Any:
        n = yield ctx.call_activity(step, input=n)
        if n < 5:
            ctx.continue_as_new(n)
            return None
        return n

    async with hub.worker(app):
        state = await hub.run(counter, 0)
    assert state.runtime_status == Status.COMPLETED
    assert state.get_output() == 5
    history = await hub.client.get_orchestration_history(state.instance_id)
    assert sum(1 for e in history if type(e).__name__ == "TaskScheduled") == 1  # only the last generation


async def test_continue_as_new_keeps_unprocessed_events_with_save_events(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def collector(ctx: dtfx.OrchestrationContext, collected: list[str]) -> Any:
        if len(collected) == 0:
            yield ctx.create_timer(timedelta(milliseconds=300))  # both events arrive meanwhile
            first = yield ctx.wait_for_external_event("item")
            ctx.continue_as_new([first], save_events=True)
            return None
        second = yield ctx.wait_for_external_event("item")
        return [*collected, second]

    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration(collector, input=[])
        await hub.client.raise_orchestration_event(instance_id, "item", data="a")
        await hub.client.raise_orchestration_event(instance_id, "item", data="b")
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == ["a", "b"]


async def test_an_eternal_orchestration_takes_events_in_the_order_they_were_raised(hub: Hub, app: dtfx.App) -> None:
    """One event per execution, the rest carried over: those carried over come before the
    ones raised while an execution ran."""
    count = 200

    @app.orchestrator
    def eater(ctx: dtfx.OrchestrationContext, eaten: list[int]) -> Any:
        eaten = [*eaten, (yield ctx.wait_for_external_event("item"))]
        if len(eaten) == count:
            return eaten
        ctx.continue_as_new(eaten, save_events=True)
        return None

    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration(eater, input=[])
        for index in range(count):
            await hub.client.raise_orchestration_event(instance_id, "item", data=index)
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.get_output() == list(range(count))


async def test_an_event_sent_to_itself_before_continuing_as_new_reaches_the_next_execution(
    hub: Hub, app: dtfx.App
) -> None:
    @app.orchestrator
    def note_to_self(ctx: dtfx.OrchestrationContext, generation: int) -> Any:
        if generation == 0:
            ctx.send_event(ctx.instance_id, "note", data="from the first execution")
            ctx.continue_as_new(1)
            return None
        return (yield ctx.wait_for_external_event("note"))

    async with hub.worker(app):
        state = await hub.run(note_to_self, 0, timeout=10)
    assert (state.runtime_status, state.get_output()) == (Status.COMPLETED, "from the first execution")


async def test_custom_status_is_visible_to_clients(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def progress(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        ctx.set_custom_status({"stage": "waiting"})
        yield ctx.wait_for_external_event("continue")
        ctx.set_custom_status({"stage": "done"})
        return "ok"

    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration(progress)
        for _ in range(100):
            state = await hub.client.get_orchestration_state(instance_id)
            if state is not None and state.serialized_custom_status:
                break
            await asyncio.sleep(0.02)
        assert state is not None and state.get_custom_status() == {"stage": "waiting"}
        await hub.client.raise_orchestration_event(instance_id, "continue")
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_custom_status() == {"stage": "done"}


async def test_new_uuid_is_deterministic_across_replays(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def echo(ctx: dtfx.ActivityContext, value: Any) -> Any:
        return value

    @app.orchestrator
    def ids(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        first = ctx.new_uuid()
        echoed = yield ctx.call_activity(echo, input=first)
        second = ctx.new_uuid()
        echoed_second = yield ctx.call_activity(echo, input=second)
        return [first == echoed, second == echoed_second, first != second]

    async with hub.worker(app, options=NO_CACHE):  # every episode replays from history
        state = await hub.run(ids)
    assert state.get_output() == [True, True, True]


async def test_is_replaying_and_the_replay_safe_logger(
    hub: Hub, app: dtfx.App, caplog: pytest.LogCaptureFixture
) -> None:
    user_logger = logging.getLogger("tests.orchestrator")

    @app.activity
    def noop(ctx: dtfx.ActivityContext, _: Any) -> None:
        return None

    @app.orchestrator
    def chatty(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        log = ctx.create_replay_safe_logger(user_logger)
        replaying = [ctx.is_replaying]
        log.info("step one")
        yield ctx.call_activity(noop)
        replaying.append(ctx.is_replaying)
        log.info("step two")
        yield ctx.call_activity(noop)
        log.info("step three")
        return replaying

    caplog.set_level(logging.INFO, logger="tests.orchestrator")
    async with hub.worker(app, options=NO_CACHE):
        state = await hub.run(chatty)
    # In the final episode the first two steps replay; each message is still logged once.
    assert [r.getMessage() for r in caplog.records if r.name == "tests.orchestrator"] == [
        "step one",
        "step two",
        "step three",
    ]
    assert state.get_output() == [True, True]


@dataclass
class Order:
    item: str
    quantity: int


class Receipt(pydantic.BaseModel):
    order_item: str
    total: float


async def test_dataclasses_and_pydantic_models_round_trip(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def price(ctx: dtfx.ActivityContext, order: Order) -> Receipt:
        assert isinstance(order, Order)
        return Receipt(order_item=order.item, total=order.quantity * 2.5)

    @app.orchestrator
    def checkout(ctx: dtfx.OrchestrationContext, order: Order) -> Any:
        assert isinstance(order, Order)
        receipt = yield ctx.call_activity(price, input=order)
        assert isinstance(receipt, Receipt)
        return receipt

    async with hub.worker(app):
        state = await hub.run(checkout, Order("apple", 4))
    assert state.runtime_status == Status.COMPLETED, state.failure_details
    assert state.get_input(Order) == Order("apple", 4)
    assert state.get_output(Receipt) == Receipt(order_item="apple", total=10.0)
    assert state.get_output() == {"order_item": "apple", "total": 10.0}


async def test_events_raised_while_suspended_are_kept(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def waiter(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("data"))

    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration(waiter)
        await hub.client.wait_for_orchestration_start(instance_id, timeout=5)
        await hub.client.suspend_orchestration(instance_id, reason="maintenance")
        await _wait_for_status(hub, instance_id, Status.SUSPENDED)
        await hub.client.raise_orchestration_event(instance_id, "data", data="kept")
        with pytest.raises(TimeoutError):
            await hub.client.wait_for_orchestration_completion(instance_id, timeout=0.5)
        state = await hub.client.get_orchestration_state(instance_id)
        assert state is not None and state.runtime_status == Status.SUSPENDED
        await hub.client.resume_orchestration(instance_id)
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "kept"
    history = await hub.client.get_orchestration_history(instance_id)
    assert any(isinstance(e, EventRaised) for e in history)


async def _wait_for_status(hub: Hub, instance_id: str, status: Status) -> None:
    await hub.wait_for_state(instance_id, lambda s: s.runtime_status == status)
