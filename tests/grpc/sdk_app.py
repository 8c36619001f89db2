"""Orchestrators and activities written with the official ``durabletask`` SDK, one per pattern.

They run on the SDK's own worker (``TaskHubGrpcWorker``) against the dtfx sidecar.
Activities that must behave differently per test take a key as input and keep
their counters here, in the test process.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from durabletask import task, worker

attempts: Counter[str] = Counter()
"""Calls of :func:`flaky`, :func:`counted` and :func:`fail_first_time`, per key."""


# -- activities ------------------------------------------------------------------------------


def say_hello(ctx: task.ActivityContext, name: str) -> str:
    return f"Hello, {name}!"


def square(ctx: task.ActivityContext, value: int) -> int:
    return value * value


def flaky(ctx: task.ActivityContext, key: str) -> int:
    """Fails twice per key, then succeeds with the attempt number."""
    attempts[f"flaky:{key}"] += 1
    if attempts[f"flaky:{key}"] < 3:
        raise ValueError(f"attempt {attempts[f'flaky:{key}']} failed")
    return attempts[f"flaky:{key}"]


def counted(ctx: task.ActivityContext, key: str) -> int:
    attempts[f"counted:{key}"] += 1
    return attempts[f"counted:{key}"]


def fail_first_time(ctx: task.ActivityContext, key: str) -> str:
    attempts[f"fail:{key}"] += 1
    if attempts[f"fail:{key}"] == 1:
        raise RuntimeError(f"first call for {key} fails")
    return "recovered"


def raise_without_message(ctx: task.ActivityContext, _: Any) -> None:
    raise RuntimeError()


# -- orchestrators -------------------------------------------------------------------------------


def sequence(ctx: task.OrchestrationContext, _: Any) -> Any:
    greetings = []
    for city in ("Tokyo", "Seattle", "London"):
        greetings.append((yield ctx.call_activity(say_hello, input=city)))
    return greetings


def fan_out_fan_in(ctx: task.OrchestrationContext, count: int) -> Any:
    squares = yield task.when_all([ctx.call_activity(square, input=value) for value in range(count)])
    return sum(squares)


def sleeper(ctx: task.OrchestrationContext, seconds: float) -> Any:
    started = ctx.current_utc_datetime
    yield ctx.create_timer(timedelta(seconds=seconds))
    return (ctx.current_utc_datetime - started).total_seconds()


def approval(ctx: task.OrchestrationContext, timeout_seconds: float) -> Any:
    decision = ctx.wait_for_external_event("approval")
    timeout = ctx.create_timer(timedelta(seconds=timeout_seconds))
    winner = yield task.when_any([decision, timeout])
    if winner == decision:
        return f"approved by {decision.get_result()}"
    return "timed out"


def child(ctx: task.OrchestrationContext, value: int) -> Any:
    squared = yield ctx.call_activity(square, input=value)
    return {"instance_id": ctx.instance_id, "parent": ctx.parent_instance_id, "value": squared}


def parent(ctx: task.OrchestrationContext, _: Any) -> Any:
    default_id = yield ctx.call_sub_orchestrator(child, input=2)
    named = yield ctx.call_sub_orchestrator(child, input=3, instance_id=f"{ctx.instance_id}-named")
    return [default_id, named]


def with_retries(ctx: task.OrchestrationContext, key: str) -> Any:
    policy = task.RetryPolicy(first_retry_interval=timedelta(milliseconds=50), max_number_of_attempts=3)
    return (yield ctx.call_activity(flaky, input=key, retry_policy=policy))


def counter(ctx: task.OrchestrationContext, state: dict[str, int]) -> Any:
    if state["n"] < state["until"]:
        ctx.continue_as_new({"n": state["n"] + 1, "until": state["until"]})
        return None
    return state["n"]


def collector(ctx: task.OrchestrationContext, received: list[Any]) -> Any:
    """One event per execution; events that arrive meanwhile are carried over."""
    item = yield ctx.wait_for_external_event("item")
    received = [*received, item]
    if len(received) == 3:
        return received
    ctx.continue_as_new(received, save_events=True)
    return None


def with_status(ctx: task.OrchestrationContext, _: Any) -> Any:
    ctx.set_custom_status({"stage": "waiting"})
    go = yield ctx.wait_for_external_event("go")
    ctx.set_custom_status({"stage": "done"})
    return go


def waiter(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("proceed"))


def nested(ctx: task.OrchestrationContext, depth: int) -> Any:
    if depth == 0:
        return (yield ctx.wait_for_external_event("never"))
    return (yield ctx.call_sub_orchestrator(nested, input=depth - 1))


def rewindable(ctx: task.OrchestrationContext, key: str) -> Any:
    first = yield ctx.call_activity(counted, input=key)
    second = yield ctx.call_activity(fail_first_time, input=key)
    return [first, second]


def rewindable_parent(ctx: task.OrchestrationContext, key: str) -> Any:
    return (yield ctx.call_sub_orchestrator(rewindable, input=key))


def echo(ctx: task.OrchestrationContext, value: Any) -> Any:
    return value


def fails(ctx: task.OrchestrationContext, message: str) -> Any:
    raise ValueError(message)


def empty_failure(ctx: task.OrchestrationContext, _: Any) -> Any:
    """Calls an activity that raises an exception without a message, and reports what it saw."""
    try:
        yield ctx.call_activity(raise_without_message)
    except task.TaskFailedError as error:
        return {"failed": True, "type": error.details.error_type}
    return {"failed": False}


def bad_child_id(ctx: task.OrchestrationContext, child_id: str) -> Any:
    """Asks for a child under ``child_id``, which no orchestration can have, and reports the failure."""
    try:
        yield ctx.call_sub_orchestrator(echo, input="never", instance_id=child_id)
    except task.TaskFailedError as error:
        return {"type": error.details.error_type, "message": error.details.message}
    return "the bad id was taken"


ORCHESTRATORS = [
    sequence,
    fan_out_fan_in,
    sleeper,
    approval,
    child,
    parent,
    with_retries,
    counter,
    collector,
    with_status,
    waiter,
    nested,
    rewindable,
    rewindable_parent,
    echo,
    fails,
    empty_failure,
    bad_child_id,
]
ACTIVITIES = [say_hello, square, flaky, counted, fail_first_time, raise_without_message]


def register(sdk: worker.TaskHubGrpcWorker) -> None:
    """Register everything above with an SDK worker."""
    for orchestrator in ORCHESTRATORS:
        sdk.add_orchestrator(orchestrator)
    for activity in ACTIVITIES:
        sdk.add_activity(activity)
