"""Distributed tracing through the sidecar: the official SDK's OpenTelemetry spans make one trace.

The SDK's client and worker emit the spans; the sidecar emits none. What links them
passes through it: the client's trace context to the orchestration, the
orchestration's to its activities and sub-orchestrations, and the orchestration's own
span (its id and start) from one episode to the next, so that an execution is one span
whichever episode ends it.
"""

from __future__ import annotations

from typing import Any

import pytest
from durabletask import client as sdk_client
from durabletask.client import OrchestrationStatus
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from tests.grpc import sdk_app
from tests.polling import wait_until

import dtfx
from dtfx.core.history import ExecutionStarted, OrchestratorStarted, TaskScheduled

pytestmark = pytest.mark.usefixtures("sdk_worker_running")


def traced_run(
    client: sdk_client.TaskHubGrpcClient, spans: InMemorySpanExporter, orchestrator: Any, value: Any, count: int
) -> tuple[ReadableSpan, list[ReadableSpan], str]:
    """Start ``orchestrator`` under a span of the test's and wait for it: that span, the
    ``count`` other spans of its trace once they have all ended, and the instance's id."""
    with trace.get_tracer(__name__).start_as_current_span("request") as request:
        instance_id = client.schedule_new_orchestration(orchestrator, input=value)
    state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    trace_id = request.get_span_context().trace_id

    def spans_of_the_trace() -> list[ReadableSpan]:
        found = [span for span in spans.get_finished_spans() if span.context.trace_id == trace_id]
        return found if len(found) == count + 1 else []

    found = wait_until(spans_of_the_trace)
    (root,) = [span for span in found if span.name == "request"]
    return root, [span for span in found if span is not root], instance_id


def named(found: list[ReadableSpan], name: str, kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in found if span.name == name and span.kind == kind]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_an_orchestration_and_its_activities_make_one_trace(
    client: sdk_client.TaskHubGrpcClient, spans: InMemorySpanExporter
) -> None:
    root, found, _ = traced_run(client, spans, sdk_app.sequence, None, count=8)
    (create,) = named(found, "create_orchestration:sequence", SpanKind.PRODUCER)
    (orchestration,) = named(found, "orchestration:sequence", SpanKind.SERVER)
    scheduled = named(found, "activity:say_hello", SpanKind.CLIENT)
    ran = named(found, "activity:say_hello", SpanKind.SERVER)
    assert parent_id(create) == root.context.span_id
    assert parent_id(orchestration) == create.context.span_id
    # The activities of all three episodes hang under the one span of the execution...
    assert len(scheduled) == 3 and {parent_id(span) for span in scheduled} == {orchestration.context.span_id}
    assert sorted(parent_id(span) or 0 for span in ran) == sorted(span.context.span_id for span in scheduled)
    # ...which began with the first episode, not the last, and before any of them.
    assert orchestration.start_time is not None
    assert all(orchestration.start_time <= (span.start_time or 0) for span in scheduled + ran)


def test_a_sub_orchestration_continues_its_parents_trace(
    client: sdk_client.TaskHubGrpcClient, spans: InMemorySpanExporter
) -> None:
    _, found, _ = traced_run(client, spans, sdk_app.parent, None, count=10)
    (parent,) = named(found, "orchestration:parent", SpanKind.SERVER)
    started = named(found, "orchestration:child", SpanKind.CLIENT)
    children = named(found, "orchestration:child", SpanKind.SERVER)
    assert len(started) == 2 and {parent_id(span) for span in started} == {parent.context.span_id}
    assert sorted(parent_id(span) or 0 for span in children) == sorted(span.context.span_id for span in started)
    child_ids = {span.context.span_id for span in children}
    assert {parent_id(span) for span in named(found, "activity:square", SpanKind.CLIENT)} == child_ids


def test_each_execution_of_a_continued_orchestration_is_a_span_of_the_same_trace(
    client: sdk_client.TaskHubGrpcClient, spans: InMemorySpanExporter
) -> None:
    _, found, _ = traced_run(client, spans, sdk_app.counter, {"n": 0, "until": 2}, count=4)
    (create,) = named(found, "create_orchestration:counter", SpanKind.PRODUCER)
    executions = named(found, "orchestration:counter", SpanKind.SERVER)
    assert len(executions) == 3 and len({span.context.span_id for span in executions}) == 3
    assert {parent_id(span) for span in executions} == {create.context.span_id}


def test_the_history_keeps_what_links_the_spans(
    client: sdk_client.TaskHubGrpcClient, spans: InMemorySpanExporter, native_client: dtfx.Client
) -> None:
    _, found, instance_id = traced_run(client, spans, sdk_app.sequence, None, count=8)
    (create,) = named(found, "create_orchestration:sequence", SpanKind.PRODUCER)
    (orchestration,) = named(found, "orchestration:sequence", SpanKind.SERVER)
    events = native_client.get_orchestration_history(instance_id)
    (started,) = [event for event in events if isinstance(event, ExecutionStarted)]
    assert started.trace_context is not None
    assert f"-{create.context.span_id:016x}-" in started.trace_context.trace_parent
    scheduled = [event for event in events if isinstance(event, TaskScheduled)]
    assert len(scheduled) == 3 and all(event.trace_context is not None for event in scheduled)
    # The execution's span is recorded once, by the episode that began it.
    spans_recorded = [event.span for event in events if isinstance(event, OrchestratorStarted) and event.span]
    assert len(spans_recorded) == 1 and spans_recorded[0].span_id == f"{orchestration.context.span_id:016x}"


def test_an_event_a_client_raises_is_a_span_of_the_clients_alone(
    client: sdk_client.TaskHubGrpcClient, spans: InMemorySpanExporter
) -> None:
    instance_id = client.schedule_new_orchestration(sdk_app.waiter)
    client.wait_for_orchestration_start(instance_id, timeout=15)
    with trace.get_tracer(__name__).start_as_current_span("request") as request:
        client.raise_orchestration_event(instance_id, "proceed", data="go")
    state = client.wait_for_orchestration_completion(instance_id, timeout=15)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    # The SDK's client made the event's span; the sidecar, which raised it, made none.
    (raised,) = [span for span in spans.get_finished_spans() if span.name == "orchestration_event:proceed"]
    assert raised.kind == SpanKind.PRODUCER and parent_id(raised) == request.get_span_context().span_id
