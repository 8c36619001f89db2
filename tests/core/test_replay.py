"""The replay engine on hand-built histories."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dtfx.core.actions import CompleteOrchestration, CreateSubOrchestration, CreateTimer, ScheduleTask, SendEvent
from dtfx.core.context import OrchestrationContext
from dtfx.core.entities import EntityInstanceId
from dtfx.core.errors import TaskFailedError
from dtfx.core.history import (
    EntityOperationCalled,
    EntityOperationCompleted,
    EventRaised,
    EventSent,
    ExecutionResumed,
    ExecutionStarted,
    ExecutionSuspended,
    ExecutionTerminated,
    FailureDetails,
    HistoryEvent,
    OrchestrationInstance,
    OrchestrationStatus,
    OrchestratorCompleted,
    OrchestratorStarted,
    SubOrchestrationInstanceCreated,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TimerCreated,
    TimerFired,
)
from dtfx.core.replay import OrchestrationExecutor
from dtfx.core.tasks import CompletableTask, RetryPolicy, when_all, when_any

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def started(input: str | None = None, name: str = "orch") -> list[HistoryEvent]:
    return [
        OrchestratorStarted(timestamp=at(0)),
        ExecutionStarted(
            timestamp=at(0), name=name, instance=OrchestrationInstance(instance_id="i", execution_id="e"), input=input
        ),
    ]


def episode(seconds: float, *events: HistoryEvent) -> list[HistoryEvent]:
    return [OrchestratorStarted(timestamp=at(seconds)), *events]


def scheduled(event_id: int, name: str) -> HistoryEvent:
    return TaskScheduled(event_id=event_id, timestamp=at(0), name=name)


def done(task_id: int, result: str) -> HistoryEvent:
    return TaskCompleted(timestamp=at(1), task_scheduled_id=task_id, result=result)


def completion(actions: list[Any]) -> CompleteOrchestration:
    assert isinstance(actions[-1], CompleteOrchestration), actions
    return actions[-1]


def run(orchestrator: Any, past: list[HistoryEvent], new: list[HistoryEvent]) -> list[Any]:
    executor = OrchestrationExecutor(orchestrator, "i")
    executor.replay(past)
    return executor.execute(new)


def sequence(ctx: OrchestrationContext, _: Any) -> Any:
    first = yield ctx.call_activity("a", input=1)
    second = yield ctx.call_activity("b", input=first)
    return [first, second]


def test_a_new_orchestration_schedules_its_first_activity() -> None:
    actions = run(sequence, [], started())
    assert actions == [ScheduleTask(id=1, name="a", input="1")]


@pytest.mark.parametrize("fire_at", [5, 2.5, "2026-03-01T00:00:00Z", None])
def test_a_timer_for_anything_but_a_moment_or_a_delay_fails_clearly(fire_at: Any) -> None:
    def sleeper(ctx: OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(fire_at)

    failure = completion(run(sleeper, [], started())).failure_details
    assert failure is not None and failure.is_caused_by(TypeError)
    assert f"create_timer takes a datetime or a timedelta, not {type(fire_at).__name__}" in failure.message


def test_replay_matches_history_and_continues_with_new_events() -> None:
    past = [*started(), scheduled(1, "a"), OrchestratorCompleted(timestamp=at(0))]
    actions = run(sequence, past, episode(1, done(1, '"x"')))
    assert actions == [ScheduleTask(id=2, name="b", input='"x"')]


def test_the_generator_return_value_completes_the_orchestration() -> None:
    past = [*started(), scheduled(1, "a"), *episode(1, done(1, "10"), scheduled(2, "b"))]
    actions = run(sequence, past, episode(2, done(2, "20")))
    assert completion(actions).status == OrchestrationStatus.COMPLETED
    assert completion(actions).result == "[10,20]"


def test_is_replaying_is_true_for_past_events_only() -> None:
    seen: list[bool] = []

    def watcher(ctx: OrchestrationContext, _: Any) -> Any:
        seen.append(ctx.is_replaying)
        yield ctx.call_activity("a")
        seen.append(ctx.is_replaying)
        yield ctx.call_activity("a")
        seen.append(ctx.is_replaying)

    past = [*started(), scheduled(1, "a"), *episode(1, done(1, "1"), scheduled(2, "a"))]
    run(watcher, past, episode(2, done(2, "2")))
    assert seen == [True, True, False]


def test_current_time_is_the_episode_start() -> None:
    times: list[datetime] = []

    def clock(ctx: OrchestrationContext, _: Any) -> Any:
        times.append(ctx.current_utc_datetime)
        yield ctx.call_activity("a")
        times.append(ctx.current_utc_datetime)

    run(clock, [*started(), scheduled(1, "a")], episode(7, done(1, "1")))
    assert times == [at(0), at(7)]


def test_a_different_activity_name_is_nondeterminism() -> None:
    def renamed(ctx: OrchestrationContext, _: Any) -> Any:
        yield ctx.call_activity("charge_card")

    actions = run(renamed, [*started(), scheduled(1, "charge")], episode(1, done(1, "1")))
    failure = completion(actions)
    assert failure.status == OrchestrationStatus.FAILED
    assert failure.failure_details is not None
    assert failure.failure_details.error_type == "dtfx.core.errors.NonDeterminismError"
    assert "'charge'" in failure.failure_details.message and "'charge_card'" in failure.failure_details.message


def test_a_different_action_type_is_nondeterminism() -> None:
    def switched(ctx: OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(timedelta(seconds=1))

    actions = run(switched, [*started(), scheduled(1, "a")], episode(1, done(1, "1")))
    details = completion(actions).failure_details
    assert details is not None
    assert "call_activity with ID=1" in details.message and "create_timer" in details.message


def test_a_recorded_action_the_code_no_longer_takes_is_nondeterminism() -> None:
    def shorter(ctx: OrchestrationContext, _: Any) -> Any:
        yield ctx.call_activity("a")

    past = [*started(), scheduled(1, "a"), scheduled(2, "b")]
    details = completion(run(shorter, past, episode(1, done(1, "1")))).failure_details
    assert details is not None and "ID=2" in details.message and "does not call it" in details.message


def test_send_event_to_another_target_is_nondeterminism() -> None:
    def sender(ctx: OrchestrationContext, _: Any) -> Any:
        ctx.send_event("other", "ping")
        yield ctx.create_timer(timedelta(seconds=1))

    past = [*started(), EventSent(event_id=1, timestamp=at(0), instance_id="original", name="ping")]
    details = completion(run(sender, past, episode(1))).failure_details
    assert details is not None and "'original'" in details.message and "'other'" in details.message


def test_results_for_unknown_tasks_are_ignored() -> None:
    actions = run(sequence, [*started(), scheduled(1, "a")], episode(1, done(99, "1")))
    assert actions == []


def test_an_activity_failure_is_raised_in_the_orchestrator() -> None:
    caught: list[TaskFailedError] = []

    def careful(ctx: OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_activity("a")
        except TaskFailedError as error:
            caught.append(error)
            return "handled"

    details = FailureDetails(error_type="ValueError", message="nope")
    failed = TaskFailed(timestamp=at(1), task_scheduled_id=1, failure_details=details)
    actions = run(careful, [*started(), scheduled(1, "a")], episode(1, failed))
    assert completion(actions).result == '"handled"'
    assert caught[0].details == details
    assert "Activity task #1 failed: nope" in str(caught[0])


def test_when_all_keeps_order_whatever_the_completion_order() -> None:
    def fan(ctx: OrchestrationContext, _: Any) -> Any:
        return (yield when_all([ctx.call_activity("a", input=n) for n in range(3)]))

    past = [*started(), scheduled(1, "a"), scheduled(2, "a"), scheduled(3, "a")]
    actions = run(fan, past, episode(1, done(3, '"c"'), done(1, '"a"'), done(2, '"b"')))
    assert completion(actions).result == '["a","b","c"]'


def test_when_all_waits_for_every_task_then_raises_the_first_failure() -> None:
    def fan(ctx: OrchestrationContext, _: Any) -> Any:
        try:
            yield when_all([ctx.call_activity("a"), ctx.call_activity("b")])
        except TaskFailedError as error:
            return error.details.message

    failure = TaskFailed(
        timestamp=at(1), task_scheduled_id=1, failure_details=FailureDetails(error_type="E", message="first")
    )
    executor = OrchestrationExecutor(fan, "i")
    executor.replay([*started(), scheduled(1, "a"), scheduled(2, "b")])
    assert executor.execute(episode(1, failure)) == []
    assert completion(executor.execute(episode(2, done(2, "1")))).result == '"first"'


def test_when_any_completes_with_the_first_task() -> None:
    def race(ctx: OrchestrationContext, _: Any) -> Any:
        timer = ctx.create_timer(timedelta(seconds=30))
        event = ctx.wait_for_external_event("go")
        winner = yield when_any([timer, event])
        return "event" if winner is event else "timer"

    past = [*started(), TimerCreated(event_id=1, timestamp=at(0), fire_at=at(30))]
    actions = run(race, past, episode(1, EventRaised(timestamp=at(1), name="GO", input="1")))
    assert completion(actions).result == '"event"'


def test_timers_fire_by_id() -> None:
    def nap(ctx: OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(at(60))
        return "rested"

    first = run(nap, [], started())
    assert first == [CreateTimer(id=1, fire_at=at(60))]
    past = [*started(), TimerCreated(event_id=1, timestamp=at(0), fire_at=at(60))]
    actions = run(nap, past, episode(60, TimerFired(timestamp=at(60), timer_id=1, fire_at=at(60))))
    assert completion(actions).result == '"rested"'


def test_events_raised_before_the_wait_are_buffered_in_order() -> None:
    def collect(ctx: OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(timedelta(seconds=5))
        first = yield ctx.wait_for_external_event("item")
        second = yield ctx.wait_for_external_event("ITEM")
        return [first, second]

    past = [
        *started(),
        TimerCreated(event_id=1, timestamp=at(0), fire_at=at(5)),
        *episode(1, EventRaised(timestamp=at(1), name="Item", input="1")),
        *episode(2, EventRaised(timestamp=at(2), name="item", input="2")),
    ]
    actions = run(collect, past, episode(5, TimerFired(timestamp=at(5), timer_id=1, fire_at=at(5))))
    assert completion(actions).result == "[1,2]"


def test_suspension_holds_events_until_resume() -> None:
    def waiter(ctx: OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("go"))

    executor = OrchestrationExecutor(waiter, "i")
    executor.replay(started())
    assert executor.execute(episode(1, ExecutionSuspended(timestamp=at(1)))) == []
    assert executor.execute(episode(2, EventRaised(timestamp=at(2), name="go", input='"x"'))) == []
    actions = executor.execute(episode(3, ExecutionResumed(timestamp=at(3))))
    assert completion(actions).result == '"x"'


def test_terminate_ends_with_the_given_output() -> None:
    def waiter(ctx: OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("go"))

    actions = run(waiter, started(), episode(1, ExecutionTerminated(timestamp=at(1), input='"stop"')))
    assert completion(actions).status == OrchestrationStatus.TERMINATED
    assert completion(actions).result == '"stop"'


def test_continue_as_new_carries_over_unreceived_events_with_save_events() -> None:
    def loop(ctx: OrchestrationContext, n: int) -> Any:
        yield ctx.create_timer(timedelta(seconds=1))
        ctx.continue_as_new(n + 1, save_events=True, new_version="2")

    past = [*started("1"), TimerCreated(event_id=1, timestamp=at(0), fire_at=at(1))]
    kept = EventRaised(timestamp=at(0.5), name="early", input="1")
    late = EventRaised(timestamp=at(1), name="late", input="2")
    actions = run(
        loop, [*past, *episode(0.5, kept)], episode(1, TimerFired(timestamp=at(1), timer_id=1, fire_at=at(1)), late)
    )
    end = completion(actions)
    assert (end.status, end.result, end.new_version) == (OrchestrationStatus.CONTINUED_AS_NEW, "2", "2")
    assert end.carryover_events == [kept, late]


def test_retries_wait_on_a_timer_then_schedule_a_new_attempt() -> None:
    policy = RetryPolicy(first_retry_interval=timedelta(seconds=10), max_number_of_attempts=2)

    def persistent(ctx: OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity("a", retry_policy=policy))

    failed = TaskFailed(
        timestamp=at(1), task_scheduled_id=1, failure_details=FailureDetails(error_type="E", message="m")
    )
    executor = OrchestrationExecutor(persistent, "i")
    executor.replay([*started(), scheduled(1, "a")])
    assert executor.execute(episode(1, failed)) == [CreateTimer(id=2, fire_at=at(11), retry_of=1)]
    actions = executor.execute(episode(11, TimerFired(timestamp=at(11), timer_id=2, fire_at=at(11))))
    assert actions == [ScheduleTask(id=3, name="a")]
    second_failure = TaskFailed(
        timestamp=at(12), task_scheduled_id=3, failure_details=FailureDetails(error_type="E", message="again")
    )
    end = completion(executor.execute(episode(12, second_failure)))
    assert end.status == OrchestrationStatus.FAILED
    assert end.failure_details is not None and end.failure_details.inner_failure is not None
    assert end.failure_details.inner_failure.message == "again"


def test_a_backoff_past_any_representable_wait_is_capped_or_leaves_no_attempt() -> None:
    capped = RetryPolicy(
        first_retry_interval=timedelta(seconds=1),
        max_number_of_attempts=100_000,
        backoff_coefficient=2.0,
        max_retry_interval=timedelta(minutes=1),
    )
    assert capped.next_delay(1100, timedelta(0)) == timedelta(minutes=1)  # 2.0 ** 1099 is past a float's range
    uncapped = RetryPolicy(
        first_retry_interval=timedelta(seconds=1), max_number_of_attempts=100_000, backoff_coefficient=2.0
    )
    assert uncapped.next_delay(1100, timedelta(0)) is None
    assert uncapped.next_delay(60, timedelta(0)) is None  # a finite wait of 2 ** 59 s is past a timedelta's
    instant = RetryPolicy(first_retry_interval=timedelta(0), max_number_of_attempts=100_000, backoff_coefficient=2.0)
    assert instant.next_delay(1100, timedelta(0)) == timedelta(0)


@pytest.mark.parametrize("coefficient", [0.5, math.nan, math.inf])
def test_a_backoff_coefficient_below_one_or_not_finite_is_refused(coefficient: float) -> None:
    with pytest.raises(ValueError, match="backoff_coefficient must be >= 1 and finite"):
        RetryPolicy(
            first_retry_interval=timedelta(seconds=1), max_number_of_attempts=3, backoff_coefficient=coefficient
        )


def test_a_retry_that_would_come_after_the_year_9999_fails_the_task_the_orchestrator_awaits() -> None:
    policy = RetryPolicy(first_retry_interval=timedelta(days=365 * 8000), max_number_of_attempts=2)

    def giving_up(ctx: OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_activity("a", retry_policy=policy)
        except TaskFailedError as error:
            return f"gave up: {error}"

    failed = TaskFailed(
        timestamp=at(1), task_scheduled_id=1, failure_details=FailureDetails(error_type="E", message="m")
    )
    end = completion(run(giving_up, [*started(), scheduled(1, "a")], episode(1, failed)))
    assert end.status == OrchestrationStatus.COMPLETED
    assert end.result is not None and "gave up" in end.result


@dataclass
class Approval:
    by: list[str]


def test_an_event_unreadable_as_its_data_type_fails_at_the_yield_whether_it_came_before_or_after_the_wait() -> None:
    def waiting(ctx: OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(at(5))
        approval = ctx.wait_for_external_event("approval", data_type=Approval)
        try:
            return (yield approval)
        except Exception as error:
            return f"caught {type(error).__name__}"

    unreadable = EventRaised(timestamp=at(1), name="approval", input='{"by": 42}')
    fired = TimerFired(timestamp=at(5), timer_id=1, fire_at=at(5))
    for new in ([*started(), unreadable, fired], [*started(), fired, unreadable]):  # buffered, then awaited
        end = completion(run(waiting, [], new))
        assert (end.status, end.result) == (OrchestrationStatus.COMPLETED, '"caught SerializationError"')


def test_an_input_unreadable_as_the_orchestrators_type_fails_it_without_an_engine_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def approve(ctx: OrchestrationContext, approval: Approval) -> Any:
        return approval.by

    end = completion(run(approve, [], started('{"by": 42}')))
    assert end.status == OrchestrationStatus.FAILED
    assert end.failure_details is not None and end.failure_details.error_type.endswith("SerializationError")
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


def test_sub_orchestrations_get_a_default_id_and_the_default_version() -> None:
    def parent(ctx: OrchestrationContext, _: Any) -> Any:
        yield ctx.call_sub_orchestrator("child", input=1)

    executor = OrchestrationExecutor(parent, "p", default_version="9")
    executor.replay([])
    assert executor.execute(started()) == [
        CreateSubOrchestration(id=1, instance_id="p:0001", name="child", version="9", input="1")
    ]
    replayed = OrchestrationExecutor(parent, "p", default_version="9")
    replayed.replay(
        [*started(), SubOrchestrationInstanceCreated(event_id=1, timestamp=at(0), instance_id="p:0001", name="child")]
    )
    assert replayed.execute(episode(1)) == []


def test_new_uuid_depends_only_on_instance_time_and_count() -> None:
    def ids(ctx: OrchestrationContext, _: Any) -> Any:
        return [ctx.new_uuid(), ctx.new_uuid()]

    first = completion(run(ids, [], started())).result
    second = completion(run(ids, [], started())).result
    assert first == second
    assert first is not None and len(set(first.strip("[]").split(","))) == 2


def test_yielding_something_that_is_not_a_task_fails_clearly() -> None:
    def confused(ctx: OrchestrationContext, _: Any) -> Any:
        yield 42

    details = completion(run(confused, [], started())).failure_details
    assert details is not None and details.error_type == "TypeError" and "not int" in details.message


def test_a_plain_function_is_an_orchestrator_too() -> None:
    def plain(ctx: OrchestrationContext, value: int) -> int:
        return value + 1

    assert completion(run(plain, [], started("41"))).result == "42"


def test_a_kept_executor_returns_only_new_actions() -> None:
    def chain(ctx: OrchestrationContext, _: Any) -> Any:
        for index in range(3):
            yield ctx.call_activity("step", input=index)
        ctx.send_event("other", "done")
        return "ok"

    executor = OrchestrationExecutor(chain, "i")
    executor.replay([])
    assert executor.execute(started()) == [ScheduleTask(id=1, name="step", input="0")]
    assert executor.execute(episode(1, done(1, "0"))) == [ScheduleTask(id=2, name="step", input="1")]
    assert executor.execute(episode(2, done(2, "1"))) == [ScheduleTask(id=3, name="step", input="2")]
    actions = executor.execute(episode(3, done(3, "2")))
    assert actions[0] == SendEvent(id=4, instance_id="other", name="done")
    assert completion(actions).id == 5


def test_an_entity_call_to_another_operation_is_nondeterminism() -> None:
    counter = EntityInstanceId("counter", "a")

    def calls(operation: str) -> Any:
        def orchestrator(ctx: OrchestrationContext, _: Any) -> Any:
            return (yield ctx.call_entity(counter, operation, 1))

        return orchestrator

    [first] = run(calls("add"), [], started())
    recorded = first.event
    assert isinstance(recorded, EntityOperationCalled) and recorded.operation == "add"
    answer = episode(1, EntityOperationCompleted(timestamp=at(1), request_id=recorded.request_id, output="5"))
    same = completion(run(calls("Add"), [*started(), recorded], answer))  # operation names ignore case
    assert same.status == OrchestrationStatus.COMPLETED and same.result == "5"

    changed = completion(run(calls("subtract"), [*started(), recorded], answer))
    assert changed.status == OrchestrationStatus.FAILED and changed.failure_details is not None
    assert changed.failure_details.error_type == "dtfx.core.errors.NonDeterminismError"
    assert "operation 'add'" in changed.failure_details.message
    assert "operation 'subtract'" in changed.failure_details.message


def test_a_when_any_that_has_completed_leaves_the_tasks_still_under_way() -> None:
    """A loop that waits for whichever of the rest comes first would otherwise keep each of its
    when_any tasks in every task still under way: memory that grows with the square of their number."""
    first, second, third = (CompletableTask[Any]() for _ in range(3))
    either = when_any([first, second, third])
    first.complete("first")
    assert either.is_complete and either.get_result() is first
    assert second._parents == [] and third._parents == []
