"""Failures, retries and nondeterminism, end to end."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import pytest

import dtfx
from dtfx import OrchestrationStatus as Status
from dtfx.core.history import ExecutionStarted, TaskCompleted, TaskScheduled, TimerCreated
from tests.e2e.conftest import Hub

FAST_RETRY = dtfx.RetryPolicy(first_retry_interval=timedelta(milliseconds=50), max_number_of_attempts=3)


class PaymentError(Exception):
    pass


async def test_activity_failure_reaches_the_orchestrator_with_details(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def charge(ctx: dtfx.ActivityContext, amount: int) -> None:
        try:
            raise KeyError("card")
        except KeyError as cause:
            raise PaymentError(f"declined {amount}") from cause

    @app.orchestrator
    def checkout(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_activity(charge, input=7)
        except dtfx.TaskFailedError as error:
            details = error.details
            return {
                "type": details.error_type,
                "message": details.message,
                "has_trace": "raise PaymentError" in (details.stack_trace or ""),
                "inner": details.inner_failure.error_type if details.inner_failure else None,
                "caused_by": details.is_caused_by(PaymentError),
            }
        return None

    async with hub.worker(app):
        state = await hub.run(checkout)
    assert state.get_output() == {
        "type": "tests.e2e.test_failures.PaymentError",
        "message": "declined 7",
        "has_trace": True,
        "inner": "KeyError",
        "caused_by": True,
    }


async def test_unhandled_orchestrator_exception_fails_the_instance(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def fail(ctx: dtfx.ActivityContext, _: Any) -> None:
        raise ValueError("bad input")

    @app.orchestrator
    def careless(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_activity(fail)

    @app.orchestrator
    def direct(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        raise RuntimeError("orchestrator bug")

    async with hub.worker(app):
        propagated = await hub.run(careless)
        raised = await hub.run(direct)
    assert propagated.runtime_status == Status.FAILED
    details = propagated.failure_details
    assert details is not None
    assert details.error_type == "dtfx.core.errors.TaskFailedError"
    assert "bad input" in details.message
    assert details.inner_failure is not None and details.inner_failure.error_type == "ValueError"
    assert raised.failure_details is not None
    assert (raised.failure_details.error_type, raised.failure_details.message) == ("RuntimeError", "orchestrator bug")
    assert "raise RuntimeError" in (raised.failure_details.stack_trace or "")
    try:
        raised.raise_if_failed()
    except dtfx.OrchestrationFailedError as error:
        assert error.failure_details.message == "orchestrator bug"
    else:
        raise AssertionError("raise_if_failed did not raise")


async def test_unknown_names_fail_the_instance_and_the_worker_carries_on(
    hub: Hub, app: dtfx.App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dtfx.worker.orchestrations")

    @app.orchestrator
    def calls_missing_activity(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_activity("no_such_activity")

    @app.orchestrator
    def fine(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return "still working"

    async with hub.worker(app):
        unknown_orchestrator = await hub.run("no_such_orchestrator")
        unknown_activity = await hub.run(calls_missing_activity)
        healthy = await hub.run(fine)
    assert unknown_orchestrator.runtime_status == Status.FAILED
    assert unknown_orchestrator.failure_details is not None
    assert unknown_orchestrator.failure_details.message == (
        "No orchestrator named 'no_such_orchestrator' is registered with this worker."
    )
    assert unknown_activity.runtime_status == Status.FAILED
    inner = unknown_activity.failure_details.inner_failure if unknown_activity.failure_details else None
    assert inner is not None and "No activity named 'no_such_activity'" in inner.message
    assert healthy.get_output() == "still working"
    # The worker's log says which failed, a warning where none of the code could run.
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "dtfx.worker.orchestrations"]
    assert logged == [
        (
            logging.WARNING,
            f"Instance {unknown_orchestrator.instance_id} (no_such_orchestrator) failed: dtfx.core.errors."
            "NotRegisteredError: No orchestrator named 'no_such_orchestrator' is registered with this worker.",
        ),
        (
            logging.INFO,
            f"Instance {unknown_activity.instance_id} (calls_missing_activity) failed: dtfx.core.errors."
            "TaskFailedError: Activity task #1 failed: No activity named 'no_such_activity' is registered with "
            "this worker.",
        ),
    ]


async def test_an_activity_name_no_store_can_hold_fails_the_instance_and_the_worker_carries_on(
    hub: Hub, app: dtfx.App
) -> None:
    @app.orchestrator
    def garbled(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity("act\x00ivity"))

    @app.orchestrator
    def fine(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return "fine"

    async with hub.worker(app):
        failed = await hub.run(garbled)
        after = await hub.run(fine)
    assert failed.runtime_status == Status.FAILED and failed.failure_details is not None
    assert failed.failure_details.is_caused_by(dtfx.UnstorableValueError)
    assert "NUL" in failed.failure_details.message
    assert after.get_output() == "fine"


NOT_UTF8 = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
"""What ``os.listdir()`` makes of a file name in Latin-1: a lone surrogate, which no store keeps."""


async def test_a_lone_surrogate_in_an_error_is_kept_escaped_and_in_a_name_fails_the_instance(
    hub: Hub, app: dtfx.App
) -> None:
    """Never an episode whose every commit the store refuses, leaving the instance stuck."""

    @app.activity
    def read_file(ctx: dtfx.ActivityContext, _: Any) -> None:
        raise FileNotFoundError(f"no such file: {NOT_UTF8}")

    @app.orchestrator
    def reads(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(read_file))

    @app.orchestrator
    def names_badly(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(NOT_UTF8))

    @app.orchestrator
    def continues_badly(ctx: dtfx.OrchestrationContext, n: int) -> Any:
        if n == 0:  # in its first episode, whose start is not in the history yet
            ctx.continue_as_new(1, new_version=f"2.{NOT_UTF8}")
        return n

    async with hub.worker(app):
        failed = await hub.run(reads)
        misnamed = await hub.run(names_badly)
        misversioned = await hub.run(continues_badly, 0)
    assert failed.failure_details is not None and failed.failure_details.inner_failure is not None
    assert failed.failure_details.inner_failure.message == "no such file: caf\\udce9.txt"
    assert misnamed.runtime_status == Status.FAILED and misnamed.failure_details is not None
    if not isinstance(hub.backend, dtfx.MemoryBackend):  # which keeps any string: the activity is not registered
        assert misnamed.failure_details.is_caused_by(dtfx.UnstorableValueError)
        assert misversioned.runtime_status == Status.FAILED and misversioned.failure_details is not None
        assert misversioned.failure_details.is_caused_by(dtfx.UnstorableValueError)
        history = await hub.client.get_orchestration_history(misversioned.instance_id)
        assert [event.version for event in history if isinstance(event, ExecutionStarted)] == [None]


def _failure_types(calls: Iterable[Callable[[], dtfx.Task[Any]]]) -> Generator[dtfx.Task[Any], Any, list[str]]:
    """Orchestrator code: make and await each call's task in turn; the error types of those that failed."""
    failures = []
    for call in calls:
        try:
            yield call()
        except dtfx.TaskFailedError as error:
            failures.append(error.details.error_type)
    return failures


class Outcome(BaseException):
    """A ``BaseException`` of a library's own, as pytest's outcomes and gevent's ``GreenletExit`` are."""


ESCAPING: dict[str, type[BaseException]] = {
    "cancelled": asyncio.CancelledError,
    "exit": SystemExit,
    "generator-exit": GeneratorExit,
    "own": Outcome,
    "stop-iteration": StopIteration,  # next() on an empty iterator
    "futures-cancelled": concurrent.futures.CancelledError,  # .result() of a cancelled future
}
"""What user code may raise that is no plain ``Exception``: no ``Exception`` at all, or one that
a future does not carry back from a thread as it is."""


def _raised_as(kind: str, where: str) -> str:
    """The error type that ``ESCAPING[kind]`` raised ``where`` fails its task with."""
    if kind == "stop-iteration" and where != "sync":  # a coroutine or generator turns it into a RuntimeError
        return "RuntimeError"
    return ESCAPING[kind].__qualname__


@pytest.mark.parametrize("eager", [True, False])
async def test_what_user_code_raises_that_is_no_plain_exception_fails_its_task_and_the_worker_carries_on(
    hub: Hub, app: dtfx.App, eager: bool
) -> None:
    @app.activity
    def sync_raiser(ctx: dtfx.ActivityContext, kind: str) -> None:
        raise ESCAPING[kind]()

    @app.activity
    async def async_raiser(ctx: dtfx.ActivityContext, kind: str) -> None:
        raise ESCAPING[kind]()

    @app.activity
    def coroutine_raiser(ctx: dtfx.ActivityContext, kind: str) -> Any:  # a sync function that returns one
        return async_raiser(ctx, kind)

    @app.orchestrator
    def calls(ctx: dtfx.OrchestrationContext, job: list[str]) -> Any:
        activity, kind = job
        try:
            yield ctx.call_activity(activity, input=kind)
        except dtfx.TaskFailedError as error:
            return error.details.error_type
        return "no failure"

    @app.entity
    def exiting(ctx: dtfx.EntityContext, kind: str) -> Any:
        async def exits() -> None:  # awaited on the worker's loop
            raise ESCAPING[kind]()

        if ctx.operation == "later":
            return exits()
        raise ESCAPING[kind]()

    @app.orchestrator
    def operates(ctx: dtfx.OrchestrationContext, kind: str) -> Any:
        entity = dtfx.EntityInstanceId("exiting", kind)
        return (
            yield from _failure_types(
                partial(ctx.call_entity, entity, operation, kind) for operation in ("now", "later")
            )
        )

    @app.orchestrator
    def raises(ctx: dtfx.OrchestrationContext, kind: str) -> Any:
        yield ctx.create_timer(timedelta(0))
        raise ESCAPING[kind]()

    jobs = [[activity, kind] for activity in ("sync_raiser", "async_raiser", "coroutine_raiser") for kind in ESCAPING]
    async with hub.worker(app, options=dtfx.WorkerOptions(eager_activities=eager)):
        caught = [(await hub.run(calls, job)).get_output() for job in jobs]
        operated = [(await hub.run(operates, kind)).get_output() for kind in ESCAPING]
        failed = [await hub.run(raises, kind) for kind in ESCAPING]
    assert [error_type.rsplit(".", 1)[-1] for error_type in caught] == [
        _raised_as(kind, "sync" if activity == "sync_raiser" else "async") for activity, kind in jobs
    ]
    assert [[error_type.rsplit(".", 1)[-1] for error_type in pair] for pair in operated] == [
        [_raised_as(kind, "sync"), _raised_as(kind, "async")] for kind in ESCAPING
    ]
    for state, kind in zip(failed, ESCAPING, strict=True):
        assert state.runtime_status == Status.FAILED and state.failure_details is not None
        assert state.failure_details.error_type.rsplit(".", 1)[-1] == _raised_as(kind, "generator")


class Exiting:
    """A value whose conversion to JSON (user code, run by the engine) exits."""

    def to_json(self) -> Any:
        raise SystemExit("no JSON for you")


@pytest.mark.parametrize("eager", [True, False])
async def test_a_conversion_to_json_that_exits_fails_its_task_or_instance(hub: Hub, app: dtfx.App, eager: bool) -> None:
    @app.activity
    def sync_result(ctx: dtfx.ActivityContext, _: Any) -> Any:
        return Exiting()

    @app.activity
    async def async_result(ctx: dtfx.ActivityContext, _: Any) -> Any:
        return Exiting()

    @app.orchestrator
    def calls(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (
            yield from _failure_types(partial(ctx.call_activity, activity) for activity in (sync_result, async_result))
        )

    @app.orchestrator
    def returns(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(timedelta(0))
        return Exiting()

    async with hub.worker(app, options=dtfx.WorkerOptions(eager_activities=eager)):
        caught = await hub.run(calls)
        failed = await hub.run(returns)
        still = await hub.run(calls)  # the worker carries on
    assert caught.get_output() == still.get_output() == ["SystemExit", "SystemExit"]
    assert failed.runtime_status == Status.FAILED and failed.failure_details is not None
    assert failed.failure_details.error_type == "SystemExit"


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words")

    @property
    def is_non_retriable(self) -> bool:
        raise AttributeError("no answer either")


def _raise_the_first_again() -> None:
    """Raise an error whose chain loops: the first error raised again while handling the second."""
    try:
        raise ConnectionError("refused")
    except ConnectionError as first:
        try:
            raise RuntimeError("cleanup failed") from first
        except RuntimeError:
            raise first  # noqa: B904 - its __context__ is now the second, whose cause it is


async def test_errors_that_cannot_describe_themselves_fail_their_task_once(hub: Hub, app: dtfx.App) -> None:
    runs: list[str] = []

    @app.activity
    def looping(ctx: dtfx.ActivityContext, _: Any) -> None:
        runs.append("looping")
        _raise_the_first_again()

    @app.activity
    def unprintable(ctx: dtfx.ActivityContext, _: Any) -> None:
        runs.append("unprintable")
        raise UnprintableError

    @app.entity
    def mute(ctx: dtfx.EntityContext, _: Any) -> None:
        runs.append("mute")
        raise UnprintableError

    @app.orchestrator
    def calls(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        failures = []
        for task in (
            lambda: ctx.call_activity(looping),
            lambda: ctx.call_activity(unprintable),
            lambda: ctx.call_entity(dtfx.EntityInstanceId("mute", "k"), "speak"),
        ):
            try:
                yield task()
            except dtfx.TaskFailedError as error:
                failures.append([error.details.error_type.rsplit(".", 1)[-1], error.details.message])
        return failures

    @app.orchestrator
    def raises(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(timedelta(0))
        raise UnprintableError

    async with hub.worker(app):
        caught = await hub.run(calls)
        failed = await hub.run(raises)
    assert caught.get_output() == [
        ["ConnectionError", "refused"],
        ["UnprintableError", "<str() of the UnprintableError raised RuntimeError>"],
        ["UnprintableError", "<str() of the UnprintableError raised RuntimeError>"],
    ]
    assert runs == ["looping", "unprintable", "mute"]
    assert failed.runtime_status == Status.FAILED and failed.failure_details is not None
    assert failed.failure_details.message == "<str() of the UnprintableError raised RuntimeError>"


async def test_arguments_of_the_wrong_type_raise_in_the_orchestrator_code(hub: Hub, app: dtfx.App) -> None:
    # Each would otherwise reach the commit, which could not store it, or a message no worker could read.
    @app.orchestrator
    def child(ctx: dtfx.OrchestrationContext, _: Any) -> None:
        return None

    @app.orchestrator
    def careless(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        counter = dtfx.EntityInstanceId("counter", "c")
        calls = [
            lambda: ctx.send_event(42, "approval"),
            lambda: ctx.send_event("other", None),
            lambda: ctx.call_sub_orchestrator(child, instance_id=7),
            lambda: ctx.call_sub_orchestrator(child, version=5),
            lambda: ctx.call_activity("act", tags={"a": 1}),
            lambda: ctx.call_activity("act", retry_policy={"max_number_of_attempts": 3}),
            lambda: ctx.wait_for_external_event(5),
            lambda: ctx.signal_entity(counter, 5),
            lambda: ctx.call_entity(counter, None),
            lambda: ctx.continue_as_new(None, new_version=2),
            lambda: dtfx.when_all([ctx.create_timer(timedelta(0)), 2]),
            lambda: dtfx.when_any([]),
        ]
        refused = []
        for call in calls:
            try:
                call()
            except (TypeError, ValueError) as error:
                refused.append(str(error))
        yield ctx.create_timer(timedelta(0))
        return refused

    async with hub.worker(app):
        state = await hub.run(careless)
    assert state.runtime_status == Status.COMPLETED
    assert state.get_output() == [
        "instance_id must be a str, not int",
        "event_name must be a str, not NoneType",
        "instance_id must be a str, not int",
        "version must be a str, not int",
        "tags must be a dict of str to str: 'a': 1 is not",
        "retry_policy must be a RetryPolicy, not dict",
        "name must be a str, not int",
        "operation_name must be a str, not int",
        "operation must be a str, not NoneType",
        "new_version must be a str, not int",
        "when_all and when_any take tasks, not int",
        "when_any needs at least one task",
    ]


async def test_retries_use_durable_timers_until_success(hub: Hub, app: dtfx.App) -> None:
    attempts: list[int] = []

    @app.activity
    def flaky(ctx: dtfx.ActivityContext, _: Any) -> str:
        attempts.append(ctx.task_id)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "finally"

    @app.orchestrator
    def persistent(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(flaky, retry_policy=FAST_RETRY))

    async with hub.worker(app):
        state = await hub.run(persistent)
    assert state.get_output() == "finally"
    assert len(attempts) == 3
    history = await hub.client.get_orchestration_history(state.instance_id)
    retry_timers = [e for e in history if isinstance(e, TimerCreated)]
    assert [t.retry_of for t in retry_timers] == attempts[:2]


async def test_retries_stop_after_max_attempts_and_back_off(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def always_fails(ctx: dtfx.ActivityContext, _: Any) -> None:
        raise ConnectionError("down")

    policy = dtfx.RetryPolicy(
        first_retry_interval=timedelta(milliseconds=50),
        backoff_coefficient=2.0,
        max_number_of_attempts=3,
    )

    @app.orchestrator
    def gives_up(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_activity(always_fails, retry_policy=policy)
        except dtfx.TaskFailedError as error:
            return error.details.message
        return None

    async with hub.worker(app):
        state = await hub.run(gives_up)
    assert state.get_output() == "down"
    history = await hub.client.get_orchestration_history(state.instance_id)
    assert sum(isinstance(e, TaskScheduled) for e in history) == 3
    waits = [(e.fire_at - e.timestamp).total_seconds() for e in history if isinstance(e, TimerCreated)]
    assert len(waits) == 2
    assert 0.04 < waits[0] < 0.06 and 0.09 < waits[1] < 0.11


async def test_non_retriable_failures_are_not_retried(hub: Hub, app: dtfx.App) -> None:
    calls: list[str] = []

    class InvalidOrder(dtfx.NonRetriableError):
        pass

    @app.activity
    def validate(ctx: dtfx.ActivityContext, _: Any) -> None:
        calls.append("validate")
        raise InvalidOrder("quantity must be positive")

    @app.orchestrator
    def order(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_activity(validate, retry_policy=FAST_RETRY)
        except dtfx.TaskFailedError as error:
            return [error.details.is_non_retriable, error.details.message]
        return None

    async with hub.worker(app):
        state = await hub.run(order)
    assert state.get_output() == [True, "quantity must be positive"]
    assert calls == ["validate"]


@dataclass
class Order:
    quantity: int


async def test_an_activity_input_that_cannot_be_read_is_not_retried(hub: Hub, app: dtfx.App) -> None:
    calls: list[Order] = []

    @app.activity
    def place(ctx: dtfx.ActivityContext, order: Order) -> None:
        calls.append(order)

    @app.orchestrator
    def ordering(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_activity(place, input={"quantity": "many"}, retry_policy=FAST_RETRY)
        except dtfx.TaskFailedError as error:
            inner = error.details.inner_failure
            return [error.details.is_non_retriable, error.details.message, inner and inner.error_type]
        return None

    async with hub.worker(app):
        state = await hub.run(ordering)
    non_retriable, message, inner_type = state.get_output()
    assert non_retriable and message.startswith("The input of activity 'place' cannot be read")
    assert inner_type == "dtfx.core.errors.SerializationError"
    history = await hub.client.get_orchestration_history(state.instance_id)
    assert sum(isinstance(event, TaskScheduled) for event in history) == 1 and calls == []


async def test_retry_timeout_stops_retrying(hub: Hub, app: dtfx.App) -> None:
    calls: list[int] = []

    @app.activity
    def slow_failure(ctx: dtfx.ActivityContext, _: Any) -> None:
        calls.append(1)
        raise TimeoutError("upstream")

    policy = dtfx.RetryPolicy(
        first_retry_interval=timedelta(milliseconds=150),
        max_number_of_attempts=10,
        retry_timeout=timedelta(milliseconds=100),
    )

    @app.orchestrator
    def bounded(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_activity(slow_failure, retry_policy=policy)
        except dtfx.TaskFailedError:
            return "gave up"
        return None

    async with hub.worker(app):
        state = await hub.run(bounded)
    assert state.get_output() == "gave up"
    assert len(calls) == 2  # the second attempt starts after the timeout has passed


async def test_sub_orchestration_retries(hub: Hub, app: dtfx.App) -> None:
    runs: list[str] = []

    @app.orchestrator
    def shaky(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        if not ctx.is_replaying:
            runs.append(ctx.instance_id)
        if len(runs) < 2:
            raise RuntimeError("first run fails")
        return "child ok"

    @app.orchestrator
    def parent(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_sub_orchestrator(shaky, instance_id="the-child", retry_policy=FAST_RETRY))

    async with hub.worker(app):
        state = await hub.run(parent)
    assert state.get_output() == "child ok"
    assert runs == ["the-child", "the-child"]


code_version = {"v": 1}


async def test_nondeterminism_fails_the_instance_naming_both_actions(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def step(ctx: dtfx.ActivityContext, _: Any) -> str:
        return "ok"

    @app.orchestrator
    def changing(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        if code_version["v"] == 1:
            yield ctx.call_activity(step)
        else:
            yield ctx.create_timer(timedelta(milliseconds=1))
        yield ctx.wait_for_external_event("next")
        return "done"

    async with hub.worker(app, options=dtfx.WorkerOptions(cached_instances=0)):
        instance_id = await hub.client.schedule_new_orchestration(changing)
        await hub.wait_for_history(instance_id, lambda history: any(isinstance(e, TaskCompleted) for e in history))
        code_version["v"] = 2  # "deploy" changed code while the instance waits
        await hub.client.raise_orchestration_event(instance_id, "next")
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    code_version["v"] = 1
    assert state is not None and state.runtime_status == Status.FAILED
    details = state.failure_details
    assert details is not None and details.error_type == "dtfx.core.errors.NonDeterminismError"
    assert "call_activity" in details.message and "create_timer" in details.message


async def test_an_activity_that_raises_never_kills_the_worker(hub: Hub, app: dtfx.App) -> None:
    @app.activity
    def explode(ctx: dtfx.ActivityContext, n: int) -> int:
        if n % 2:
            raise SystemError(f"boom {n}")
        return n

    @app.orchestrator
    def many(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        tasks = [ctx.call_activity(explode, input=n) for n in range(10)]
        outcomes = []
        for task in tasks:
            try:
                outcomes.append((yield task))
            except dtfx.TaskFailedError as error:
                outcomes.append(error.details.message)
        return outcomes

    async with hub.worker(app) as worker:
        state = await hub.run(many)
        assert worker.is_running
    assert state.get_output() == [0, "boom 1", 2, "boom 3", 4, "boom 5", 6, "boom 7", 8, "boom 9"]


SQLITE_LIMIT = 100_000
"""The longest text or blob that the SQLite connections of a test with :func:`small_sqlite` store."""


@pytest.fixture
def small_sqlite(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> str:
    """A SQLite task hub that refuses values over :data:`SQLITE_LIMIT` (SQLite's default limit
    is a billion bytes): the URL."""
    connect = sqlite3.connect

    def limited(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, SQLITE_LIMIT)
        return connection

    monkeypatch.setattr(sqlite3, "connect", limited)
    return f"sqlite:///{tmp_path}/hub.db"


BIG = "x" * (2 * SQLITE_LIMIT)


def returns_big(ctx: dtfx.ActivityContext, _: Any) -> str:
    return BIG


def small(ctx: dtfx.ActivityContext, _: Any) -> str:
    return "small"


def catches_a_big_result(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
    try:
        yield ctx.call_activity(returns_big)
    except dtfx.TaskFailedError as error:
        return error.details.error_type
    return "stored"


def returns_big_after_an_activity(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
    yield ctx.call_activity(small)
    return BIG


def big_state(ctx: dtfx.EntityContext, _: Any) -> None:
    if ctx.operation == "grow":
        ctx.set_state(BIG)


def calls_big_state(ctx: dtfx.OrchestrationContext, operation: str) -> Any:
    try:
        yield ctx.call_entity(dtfx.EntityInstanceId("big_state", "k"), operation)
    except dtfx.EntityOperationFailedError as error:
        return error.details.error_type
    return "stored"


async def test_what_the_store_refuses_fails_the_task_the_instance_or_the_operation_and_nothing_runs_for_ever(
    small_sqlite: str,
) -> None:
    """An activity's result, an episode after an eager activity (committed on the activity's
    thread), an entity's batch: each was retried for ever, the instance never ending."""
    app = dtfx.App()
    for activity in (returns_big, small):
        app.add_activity(activity)
    for orchestrator in (catches_a_big_result, returns_big_after_an_activity, calls_big_state):
        app.add_orchestrator(orchestrator)
    app.add_entity(big_state)
    refused = dtfx.UnstorableValueError.__module__ + ".UnstorableValueError"
    async with dtfx.Worker(small_sqlite, app=app, options=dtfx.WorkerOptions(eager_activities=False)) as worker:
        client = dtfx.AsyncClient(worker.backend)

        async def output(orchestrator: Callable[..., Any], argument: Any = None) -> Any:
            instance_id = await client.schedule_new_orchestration(orchestrator, input=argument)
            state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
            assert state is not None
            return state.get_output()

        assert await output(catches_a_big_result) == refused
        assert await output(calls_big_state, "grow") == refused
        assert await output(calls_big_state, "read") == "stored"  # the entity goes on
    async with dtfx.Worker(small_sqlite, app=app) as worker:  # eager activities: chains on their threads
        client = dtfx.AsyncClient(worker.backend)
        chained = await client.schedule_new_orchestration(returns_big_after_an_activity)
        state = await client.wait_for_orchestration_completion(chained, timeout=10)
    assert state is not None and state.runtime_status == Status.FAILED and state.failure_details is not None
    assert state.failure_details.is_caused_by(dtfx.UnstorableValueError)
