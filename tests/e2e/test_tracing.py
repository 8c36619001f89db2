"""OpenTelemetry spans of native clients and workers, once a tracer provider is set.

A start is a ``create_orchestration`` span under the caller's; each activity's run is an
``activity`` span under it, current while the activity's code runs, so that what that
code traces joins the trace; each execution is an ``orchestration`` span under it too.
An entity operation's run is an ``entity`` span under the span that sent it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import dtfx
from dtfx.core.history import ExecutionStarted, TaskScheduled, TimerCreated
from tests.e2e.conftest import Hub


def _request() -> Any:
    """A span of the test's own, as an application's request would be (the provider is the test's)."""
    return trace.get_tracer(__name__).start_as_current_span("request")


def _traced_app(app: dtfx.App, seen: list[trace.Span]) -> None:
    @app.activity
    def greet(ctx: dtfx.ActivityContext, name: str) -> str:
        seen.append(trace.get_current_span())
        return f"Hello, {name}!"

    @app.activity
    async def shout(ctx: dtfx.ActivityContext, name: str) -> str:
        seen.append(trace.get_current_span())
        return name.upper()

    @app.activity
    def refuse(ctx: dtfx.ActivityContext, _: Any) -> None:
        raise ValueError("no")

    @app.orchestrator
    def child(ctx: dtfx.OrchestrationContext, name: str) -> Any:
        return (yield ctx.call_activity("shout", input=name))

    @app.orchestrator
    def greetings(ctx: dtfx.OrchestrationContext, names: list[str]) -> Any:
        first = yield ctx.call_activity("greet", input=names[0])
        second = yield ctx.call_sub_orchestrator("child", input=names[1])
        try:
            yield ctx.call_activity("refuse")
            outcome = "accepted"
        except dtfx.TaskFailedError:
            outcome = "refused"
        return [first, second, outcome]

    @app.activity
    def unstorable(ctx: dtfx.ActivityContext, _: Any) -> object:
        return object()  # no JSON for it: the task fails after the code returned

    @app.orchestrator
    def tries_what_cannot_work(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        failed = []
        for name in ("unstorable", "nobody_registered_this"):
            try:
                yield ctx.call_activity(name)
            except dtfx.TaskFailedError:
                failed.append(name)
        try:
            yield ctx.call_entity(dtfx.EntityInstanceId("no_such_entity", "k"), "add", 1)
        except dtfx.TaskFailedError:
            failed.append("no_such_entity")
        return failed

    @app.orchestrator
    def doomed(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_activity("refuse")

    @app.entity
    def tally(ctx: dtfx.EntityContext, amount: int) -> int:
        seen.append(trace.get_current_span())
        if amount < 0:
            raise ValueError("no negative amounts")
        ctx.set_state(ctx.get_state(int, 0) + amount)
        return int(ctx.get_state(int, 0))

    @app.entity
    def relay(ctx: dtfx.EntityContext, amount: int) -> None:
        ctx.signal_entity(dtfx.EntityInstanceId("tally", "b"), "add", amount)
        ctx.schedule_new_orchestration("child", input="relayed", instance_id="relayed")

    @app.orchestrator
    def counts(ctx: dtfx.OrchestrationContext, amount: int) -> Any:
        return (yield ctx.call_entity(dtfx.EntityInstanceId("tally", "a"), "add", amount))

    @app.orchestrator
    def waits(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("never"))

    @app.orchestrator
    def naps(ctx: dtfx.OrchestrationContext, target: str) -> Any:
        yield ctx.create_timer(timedelta(milliseconds=50))
        ctx.send_event(target, "never", data="woken")
        return (yield ctx.call_activity("shout", input="rested"))

    @app.orchestrator
    def greets_then_again(ctx: dtfx.OrchestrationContext, round: int) -> Any:
        greeting = yield ctx.call_activity("greet", input=str(round))  # eager, ahead of the first commit
        if round < 2:
            ctx.continue_as_new(round + 1)
        return greeting

    @app.orchestrator
    def twice(ctx: dtfx.OrchestrationContext, round: int) -> Any:
        if round < 2:
            ctx.continue_as_new(round + 1)
            return None
        return (yield ctx.call_activity("shout", input="done"))


async def _ended(spans: InMemorySpanExporter, *names: str) -> list[ReadableSpan]:
    """The spans ended so far, once those named have (a name given twice: two of them). An
    orchestration's span ends just after the commit that a waiter for its completion may see first."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        found = list(spans.get_finished_spans())
        missing = Counter(names) - Counter(span.name for span in found)
        if not missing:
            return found
        assert asyncio.get_running_loop().time() < deadline, f"spans never ended: {dict(missing)}"
        await asyncio.sleep(0.01)


def _one_named(found: list[ReadableSpan], name: str) -> ReadableSpan:
    """The one span named ``name`` among ``found``."""
    (span,) = [span for span in found if span.name == name]
    return span


async def test_a_start_and_its_activities_are_spans_of_the_callers_trace(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter
) -> None:
    seen: list[trace.Span] = []
    _traced_app(app, seen)
    async with hub.worker(app):
        with _request() as request:
            instance_id = await hub.client.schedule_new_orchestration("greetings", input=["Ada", "Bob"])
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == ["Hello, Ada!", "BOB", "refused"]
    found = await _ended(spans, "orchestration:greetings", "orchestration:child")
    assert {span.context.trace_id for span in found} == {request.get_span_context().trace_id}
    create = _one_named(found, "create_orchestration:greetings")
    assert create.kind == SpanKind.PRODUCER and create.parent is not None
    assert create.parent.span_id == request.get_span_context().span_id
    assert create.attributes is not None and create.attributes["durabletask.task.instance_id"] == instance_id
    greet = _one_named(found, "activity:greet")
    assert greet.attributes is not None and greet.attributes["durabletask.task.task_id"] == "1"
    runs = [_one_named(found, f"activity:{name}") for name in ("greet", "shout", "refuse")]
    # Every activity continues the start's span, the sub-orchestration's too.
    assert all(run.kind == SpanKind.SERVER and run.parent is not None for run in runs)
    assert {run.parent.span_id for run in runs if run.parent} == {create.context.span_id}
    # The activities' code ran in their spans, sync on a thread and async on the loop alike.
    assert [span.get_span_context().span_id for span in seen] == [run.context.span_id for run in runs[:2]]
    refused = runs[2]
    assert refused.status.status_code == StatusCode.ERROR
    assert [event.name for event in refused.events] == ["exception"]
    # Each execution is a span under the start's too, from its start to its end.
    executions = [_one_named(found, f"orchestration:{name}") for name in ("greetings", "child")]
    assert {execution.parent.span_id for execution in executions if execution.parent} == {create.context.span_id}
    outer = executions[0]
    assert outer.kind == SpanKind.SERVER and outer.status.status_code == StatusCode.UNSET
    assert outer.attributes is not None and outer.attributes["durabletask.task.status"] == "Completed"
    assert outer.start_time is not None and outer.end_time is not None
    assert all(outer.start_time <= (run.start_time or 0) <= (run.end_time or 0) <= outer.end_time for run in runs)
    history = await hub.client.get_orchestration_history(instance_id)
    (started,) = [event for event in history if isinstance(event, ExecutionStarted)]
    assert (
        started.trace_context is not None and f"-{create.context.span_id:016x}-" in started.trace_context.trace_parent
    )


async def test_a_callers_own_trace_context_is_kept_and_no_start_span_is_made(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter
) -> None:
    seen: list[trace.Span] = []
    _traced_app(app, seen)
    given = dtfx.TraceContext(trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration("child", input="ada", trace_context=given)
        await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    run, execution = await _ended(spans, "activity:shout", "orchestration:child")
    assert (run.name, execution.name) == ("activity:shout", "orchestration:child")
    for span in (run, execution):
        assert span.parent is not None
        assert (span.context.trace_id, span.parent.span_id) == (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)
    history = await hub.client.get_orchestration_history(instance_id)
    scheduled = [event for event in history if isinstance(event, TaskScheduled)]
    assert [event.trace_context for event in scheduled] == [given]


async def test_failed_terminated_and_continued_executions_are_spans(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter
) -> None:
    _traced_app(app, [])
    async with hub.worker(app):
        with _request():
            doomed = await hub.client.schedule_new_orchestration("doomed")
            twice = await hub.client.schedule_new_orchestration("twice", input=0)
            waits = await hub.client.schedule_new_orchestration("waits")
        failed = await hub.client.wait_for_orchestration_completion(doomed, timeout=10)
        done = await hub.client.wait_for_orchestration_completion(twice, timeout=10)
        await hub.client.wait_for_orchestration_start(waits, timeout=10)
        await hub.client.terminate_orchestration(waits, output="enough")
        await hub.client.wait_for_orchestration_completion(waits, timeout=10)
    assert failed is not None and failed.runtime_status == dtfx.OrchestrationStatus.FAILED
    assert done is not None and done.get_output() == "DONE"
    found = await _ended(spans, "orchestration:doomed", "orchestration:waits", *["orchestration:twice"] * 3)
    failure = _one_named(found, "orchestration:doomed")
    assert failure.status.status_code == StatusCode.ERROR and failure.status.description
    assert failure.attributes is not None and failure.attributes["durabletask.task.status"] == "Failed"
    terminated = _one_named(found, "orchestration:waits")
    assert terminated.attributes is not None and terminated.attributes["durabletask.task.status"] == "Terminated"
    executions = [span for span in found if span.name == "orchestration:twice"]
    create = _one_named(found, "create_orchestration:twice")
    assert len(executions) == 3 and {span.parent.span_id for span in executions if span.parent} == {
        create.context.span_id
    }


async def test_tasks_that_fail_outside_the_users_code_are_failed_spans(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter
) -> None:
    """An output that cannot be stored, an activity or entity that is not registered."""
    _traced_app(app, [])
    async with hub.worker(app):
        with _request():
            instance_id = await hub.client.schedule_new_orchestration("tries_what_cannot_work")
        done = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert done is not None and done.get_output() == ["unstorable", "nobody_registered_this", "no_such_entity"]
    names = ["activity:unstorable", "activity:nobody_registered_this", "entity:no_such_entity:add"]
    found = await _ended(spans, *names)
    for name in names:
        span = _one_named(found, name)
        assert span.status.status_code == StatusCode.ERROR, name
        assert [event.name for event in span.events] == ["exception"], name


async def test_a_restart_is_a_start_of_its_own_traced_as_one(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter
) -> None:
    _traced_app(app, [])
    async with hub.worker(app):
        first = await hub.client.schedule_new_orchestration("child", input="ada")
        await hub.client.wait_for_orchestration_completion(first, timeout=10)
        spans.clear()
        with _request() as request:
            await hub.client.restart_orchestration(first)
            copy = await hub.client.restart_orchestration(first, restart_with_new_instance_id=True)
        for instance_id in (first, copy):
            await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    found = await _ended(spans, *["orchestration:child"] * 2, *["activity:shout"] * 2)
    creations = [span for span in found if span.name == "create_orchestration:child"]
    made_for = sorted((span.attributes or {})["durabletask.task.instance_id"] for span in creations)
    assert made_for == sorted([first, copy])
    assert {span.parent.span_id for span in creations if span.parent} == {request.get_span_context().span_id}
    runs = [span for span in found if span.name in ("orchestration:child", "activity:shout")]
    assert {span.parent.span_id for span in runs if span.parent} == {span.context.span_id for span in creations}


@pytest.mark.parametrize("eager", [True, False])
async def test_each_execution_after_an_activity_and_a_continue_as_new_is_a_span(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter, eager: bool
) -> None:
    _traced_app(app, [])
    async with hub.worker(app, options=dtfx.WorkerOptions(eager_activities=eager)):
        with _request():
            instance_id = await hub.client.schedule_new_orchestration("greets_then_again", input=0)
        done = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert done is not None and done.get_output() == "Hello, 2!"
    found = await _ended(spans, *["orchestration:greets_then_again"] * 3, *["activity:greet"] * 3)
    assert sum(span.name == "orchestration:greets_then_again" for span in found) == 3


async def test_a_version_is_in_the_spans_names_and_attributes(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter
) -> None:
    _traced_app(app, [])
    async with hub.worker(app):
        with _request():
            instance_id = await hub.client.schedule_new_orchestration("child", input="ada", version="2.0")
        await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    found = await _ended(spans, "orchestration:child@(2.0)")
    for name in ("create_orchestration:child@(2.0)", "orchestration:child@(2.0)"):
        attributes = _one_named(found, name).attributes
        assert attributes is not None and attributes["durabletask.task.version"] == "2.0"
    activity = _one_named(found, "activity:shout").attributes  # an activity has a version of its own: none
    assert activity is not None and "durabletask.task.version" not in activity


async def test_executions_that_end_before_any_of_their_code_runs_are_spans(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter
) -> None:
    """Not registered, of a version the worker fails, terminated before they started."""
    _traced_app(app, [])
    strict = dtfx.VersioningOptions(
        version="1.0",
        match_strategy=dtfx.VersionMatchStrategy.STRICT,
        failure_strategy=dtfx.VersionFailureStrategy.FAIL,
    )
    with _request():
        unknown = await hub.client.schedule_new_orchestration("nobody_registered_this")
        too_new = await hub.client.schedule_new_orchestration("child", input="x", version="2.0")
        stopped = await hub.client.schedule_new_orchestration("waits", version="1.0")
        later = await hub.client.schedule_new_orchestration("naps", start_at=datetime.now(UTC) + timedelta(hours=1))
    for instance_id in (stopped, later):
        await hub.client.terminate_orchestration(instance_id, output="never mind")
    async with hub.worker(app, versioning=strict):
        for instance_id in (unknown, too_new, stopped, later):
            await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    names = [
        "orchestration:nobody_registered_this",
        "orchestration:child@(2.0)",
        "orchestration:waits@(1.0)",
        "orchestration:naps",
    ]
    found = await _ended(spans, *names)
    statuses = [(_one_named(found, name).attributes or {}).get("durabletask.task.status") for name in names]
    assert statuses == ["Failed", "Failed", "Terminated", "Terminated"]
    assert _one_named(found, names[0]).status.status_code == StatusCode.ERROR
    scheduled = _one_named(found, names[3])  # it began where it was made, not an hour after it ended
    assert scheduled.start_time is not None and scheduled.end_time is not None
    assert scheduled.start_time <= scheduled.end_time


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "replayed"])
async def test_timers_and_events_are_spans_made_once(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter, cached: bool
) -> None:
    _traced_app(app, [])
    async with hub.worker(app, options=None if cached else dtfx.WorkerOptions(cached_instances=0)):
        with _request():
            woken = await hub.client.schedule_new_orchestration("waits")
            napper = await hub.client.schedule_new_orchestration("naps", input=woken)
        with _request() as request:
            raised = await hub.client.schedule_new_orchestration("waits")
            await hub.client.wait_for_orchestration_start(raised, timeout=10)
            await hub.client.raise_orchestration_event(raised, "never", data="raised")
        done = [await hub.client.wait_for_orchestration_completion(i, timeout=10) for i in (napper, woken, raised)]
    assert [state.get_output() for state in done if state] == ["RESTED", "woken", "raised"]
    found = await _ended(spans, "orchestration:naps", "orchestration:waits", "orchestration:waits")
    create = _one_named(found, "create_orchestration:naps")
    # The timer: from the episode that created it to the one it fired in, under the start's span.
    timer = _one_named(found, "orchestration:naps:timer")
    history = await hub.client.get_orchestration_history(napper)
    (created,) = [event for event in history if isinstance(event, TimerCreated)]
    assert timer.kind == SpanKind.INTERNAL and timer.parent is not None
    assert timer.parent.span_id == create.context.span_id
    assert timer.attributes is not None
    assert timer.attributes["durabletask.task.task_id"] == str(created.event_id)
    assert timer.attributes["durabletask.fire_at"] == created.fire_at.isoformat()
    assert timer.start_time is not None and timer.end_time is not None
    assert timer.end_time - timer.start_time >= 50_000_000  # it covers the wait
    # The event the orchestration sent, and the one the client raised under the caller's span.
    events = [span for span in found if span.name == "orchestration_event:never"]
    by_parent = {span.parent.span_id if span.parent else None: span for span in events}
    sent, by_client = by_parent[create.context.span_id], by_parent[request.get_span_context().span_id]
    assert len(events) == 2
    assert sent.kind == by_client.kind == SpanKind.PRODUCER
    assert sent.attributes is not None and sent.attributes["durabletask.task.instance_id"] == napper
    assert sent.attributes["durabletask.event.target_instance_id"] == woken
    assert by_client.attributes is not None and by_client.attributes["durabletask.event.target_instance_id"] == raised


def test_the_sync_clients_start_is_a_child_of_the_callers_span(app: dtfx.App, spans: InMemorySpanExporter) -> None:
    seen: list[trace.Span] = []
    _traced_app(app, seen)
    with dtfx.Worker(dtfx.MemoryBackend(), app=app) as worker, dtfx.Client(worker.backend) as client:
        with _request() as request:
            instance_id = client.schedule_new_orchestration("child", input="ada")
        client.wait_for_orchestration_completion(instance_id, timeout=10)
    create = _one_named(list(spans.get_finished_spans()), "create_orchestration:child")
    assert create.parent is not None and create.parent.span_id == request.get_span_context().span_id


async def test_nothing_is_traced_without_a_tracer_provider(hub: Hub, app: dtfx.App) -> None:
    seen: list[trace.Span] = []
    _traced_app(app, seen)
    async with hub.worker(app):
        instance_id = await hub.client.schedule_new_orchestration("child", input="ada")
        await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    history = await hub.client.get_orchestration_history(instance_id)
    assert all(getattr(event, "trace_context", None) is None for event in history)
    assert not seen[0].get_span_context().is_valid


async def test_a_trace_context_that_is_not_w3c_is_refused(hub: Hub, app: dtfx.App) -> None:
    _traced_app(app, [])
    garbled = dtfx.TraceContext(trace_parent="00-" + "x" * 5000)
    with pytest.raises(ValueError, match="not a W3C traceparent"):
        await hub.client.schedule_new_orchestration("child", input="ada", instance_id="garbled", trace_context=garbled)
    assert await hub.client.get_orchestration_state("garbled") is None
    with pytest.raises(ValueError, match="Not a W3C trace context"):
        await hub.client.signal_entity(dtfx.EntityInstanceId("tally", "g"), "add", 1, trace_context=garbled)
    assert await hub.client.get_entity(dtfx.EntityInstanceId("tally", "g")) is None


async def test_entity_operations_are_spans_under_whatever_sent_them(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter
) -> None:
    seen: list[trace.Span] = []
    _traced_app(app, seen)
    tally = dtfx.EntityInstanceId("tally", "a")
    async with hub.worker(app):
        with _request() as request:
            await hub.client.signal_entity(tally, "add", 2)
            await hub.client.signal_entity(tally, "add", -1)
            instance_id = await hub.client.schedule_new_orchestration("counts", input=3)
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == 5
    found = await _ended(spans, *["entity:tally:add"] * 3, "create_orchestration:counts")
    operations = [span for span in found if span.name == "entity:tally:add"]
    assert [span.kind for span in operations] == [SpanKind.SERVER] * 3
    create = _one_named(found, "create_orchestration:counts")
    parents = [span.parent.span_id if span.parent else None for span in operations]
    assert parents == [request.get_span_context().span_id] * 2 + [create.context.span_id]
    assert [span.status.status_code for span in operations] == [StatusCode.UNSET, StatusCode.ERROR, StatusCode.UNSET]
    assert [span.get_span_context().span_id for span in seen] == [span.context.span_id for span in operations]


async def test_what_an_entity_operation_signals_or_starts_continues_its_span(
    hub: Hub, app: dtfx.App, spans: InMemorySpanExporter
) -> None:
    _traced_app(app, [])
    async with hub.worker(app):
        with _request():
            await hub.client.signal_entity(dtfx.EntityInstanceId("relay", "r"), "pass", 4)
        done = await hub.wait_for_state("relayed", lambda state: state.runtime_status.is_terminal)
        assert done.get_output() == "RELAYED"
        await hub.wait_for_state("@tally@b", lambda entity: entity.serialized_output == "4")
    found = await _ended(spans, "entity:relay:pass", "entity:tally:add", "orchestration:child")
    relayed = _one_named(found, "entity:relay:pass")
    for span in (_one_named(found, "entity:tally:add"), _one_named(found, "orchestration:child")):
        assert span.parent is not None and span.parent.span_id == relayed.context.span_id
