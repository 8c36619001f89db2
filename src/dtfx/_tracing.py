"""OpenTelemetry spans for native clients and workers, when the application traces.

dtfx needs only ``opentelemetry-api`` for them (the ``otel`` extra), and makes them only
once the application has set a tracer provider: without one, nothing is traced and no
trace context is stored. An application that sets a provider has imported OpenTelemetry
first, so dtfx never imports it itself. The spans follow the official SDKs' names, so
that native and SDK workers on one hub make the same traces:

- a client's start of an orchestration is a PRODUCER span ``create_orchestration:<name>``
  (``<name>@(<version>)`` for a version, in every span's name, as the SDKs name them),
  a child of the current span, unless the caller passes a trace context of its own (as
  the gRPC sidecar does for the SDKs, whose clients make that span themselves); the
  context is kept with the start;
- an activity's run is a SERVER span ``activity:<name>``, current while the activity's
  code runs, whose parent is the context kept with its task: the span of whatever
  scheduled it, or else the one that started its orchestration;
- an entity operation's run is a SERVER span ``entity:<name>:<operation>``, current while
  the operation's code runs, whose parent is the span that sent it (a client's current
  span, or the start's of the orchestration that sent it);
- an execution of an orchestration is a SERVER span ``orchestration:<name>``, from its
  start to the commit that ends it (completed, failed, terminated or continued as new),
  made by the worker that commits that end. Its parent is the start's span; the
  activities are its siblings, not its children: the OpenTelemetry API cannot give a span
  an id chosen before the span begins, in the first episode;
- a durable timer is an INTERNAL span ``orchestration:<name>:timer``, from the moment the
  orchestration created it to the episode it fired in, and an event an orchestration
  sends is a PRODUCER span ``orchestration_event:<event name>``; both are made once the
  episode has run (not when it is replayed), under the start's span;
- a client's raising of an event is a PRODUCER span ``orchestration_event:<event name>``,
  a child of the current span.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dtfx.core.context import Traced
from dtfx.core.entities import EntityInstanceId, OperationRequest
from dtfx.core.history import ExecutionStarted, OrchestrationStatus, TaskScheduled, TraceContext
from dtfx.core.workitems import OrchestrationCheckpoint

if TYPE_CHECKING:
    from opentelemetry import context as otel_context
    from opentelemetry import trace

_TRACEPARENT, _TRACESTATE = "traceparent", "tracestate"
_NOT_TRACED: AbstractContextManager[object] = nullcontext()


def _tracer() -> trace.Tracer | None:
    """dtfx's tracer, or ``None`` while the application has set no tracer provider."""
    api = sys.modules.get("opentelemetry.trace")
    if api is None:  # never imported: no provider can have been set
        return None
    provider = api.get_tracer_provider()
    if isinstance(provider, api.ProxyTracerProvider):  # none set yet
        return None
    tracer: trace.Tracer = provider.get_tracer("dtfx")
    return tracer


def flush(timeout: float = 5.0) -> None:
    """Export the spans the application's tracer provider holds, before a quit that skips its
    exit hooks (``os._exit``); at most ``timeout`` seconds."""
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return
    force_flush = getattr(api.get_tracer_provider(), "force_flush", None)  # the SDK's provider has one
    if force_flush is not None:
        try:
            force_flush(int(timeout * 1000))
        except Exception:  # an exporter's failure: the quit goes on
            logging.getLogger(__name__).warning("Exporting the last spans failed", exc_info=True)


def creation_span(
    name: str, instance_id: str, version: str | None = None
) -> AbstractContextManager[TraceContext | None]:
    """The span of a client's start of orchestration ``name``; it gives the context to keep
    with the start (``None`` when nothing is traced)."""
    tracer = _tracer()
    if tracer is None:  # the usual case: no generator for each creation
        return nullcontext(None)
    return _creation_span(tracer, name, instance_id, version)


@contextmanager
def _creation_span(
    tracer: trace.Tracer, name: str, instance_id: str, version: str | None
) -> Iterator[TraceContext | None]:
    from opentelemetry.trace import SpanKind

    attributes = {
        "durabletask.type": "orchestration",
        "durabletask.task.name": name,
        "durabletask.task.instance_id": instance_id,
    }
    span_name = _span_name("create_orchestration", name, version)
    with tracer.start_as_current_span(span_name, kind=SpanKind.PRODUCER, attributes=_versioned(attributes, version)):
        yield _current()


def _span_name(kind: str, name: str, version: str | None) -> str:
    """``kind:name``, or ``kind:name@(version)`` for a version, as the SDKs name spans."""
    return f"{kind}:{name}@({version})" if version else f"{kind}:{name}"


def _versioned(attributes: dict[str, str], version: str | None) -> dict[str, str]:
    """``attributes``, with the task's version if it has one."""
    if version:
        attributes["durabletask.task.version"] = version
    return attributes


def event_span(name: str, instance_id: str) -> AbstractContextManager[object]:
    """The span of a client's raising of event ``name`` on instance ``instance_id``."""
    tracer = _tracer()
    if tracer is None:
        return _NOT_TRACED
    from opentelemetry.trace import SpanKind

    attributes = _event_attributes(name, instance_id)
    return tracer.start_as_current_span(f"orchestration_event:{name}", kind=SpanKind.PRODUCER, attributes=attributes)


def _event_attributes(name: str, target: str, sender: str | None = None) -> dict[str, str]:
    """The attributes of the span of event ``name`` sent to instance ``target`` (by orchestration ``sender``)."""
    attributes = {"durabletask.type": "event", "durabletask.task.name": name}
    if sender is not None:
        attributes["durabletask.task.instance_id"] = sender
    attributes["durabletask.event.target_instance_id"] = target
    return attributes


def current_trace_context() -> TraceContext | None:
    """The current span's context, to keep with what it sends (``None`` when nothing is traced)."""
    return _current() if _tracer() is not None else None


def _current() -> TraceContext | None:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    parent = carrier.get(_TRACEPARENT)
    return TraceContext(trace_parent=parent, trace_state=carrier.get(_TRACESTATE)) if parent else None


def activity_span(scheduled: TaskScheduled, instance_id: str) -> AbstractContextManager[object]:
    """The span of an activity's run, current while its code runs (an exception it raises is
    recorded on it); no span when its task carries no trace context."""
    if scheduled.trace_context is None:  # before building attributes: the usual case, untraced
        return _NOT_TRACED
    attributes = {
        "durabletask.type": "activity",
        "durabletask.task.name": scheduled.name,
        "durabletask.task.instance_id": instance_id,
        "durabletask.task.task_id": str(scheduled.event_id),  # a string, as the SDKs give it
    }
    name = _span_name("activity", scheduled.name, scheduled.version)
    return _server_span(name, scheduled.trace_context, _versioned(attributes, scheduled.version))


def entity_operation_span(entity_id: EntityInstanceId, operation: OperationRequest) -> AbstractContextManager[object]:
    """The span of an entity operation's run, current while its code runs; no span when the
    operation carries no trace context."""
    if operation.trace_context is None:
        return _NOT_TRACED
    attributes = {
        "durabletask.type": "entity",
        "durabletask.task.name": entity_id.entity,
        "durabletask.task.instance_id": str(entity_id),
        "durabletask.entity.operation": operation.operation,
    }
    return _server_span(f"entity:{entity_id.entity}:{operation.operation}", operation.trace_context, attributes)


def _server_span(name: str, context: TraceContext, attributes: dict[str, Any]) -> AbstractContextManager[object]:
    """A SERVER span continuing ``context``, current while the work it covers runs."""
    tracer = _tracer()
    if tracer is None:
        return _NOT_TRACED
    from opentelemetry.trace import SpanKind

    return tracer.start_as_current_span(name, context=_parent(context), kind=SpanKind.SERVER, attributes=attributes)


def execution_ended(started: ExecutionStarted, checkpoint: OrchestrationCheckpoint) -> None:
    """Make the span of the execution that ``started`` began, if ``checkpoint`` (committed) ended it."""
    context = started.trace_context
    if context is None:
        return
    if not checkpoint.status.is_terminal and checkpoint.execution_id == started.instance.execution_id:
        return  # it goes on (a continue-as-new begins another execution)
    tracer = _tracer()
    if tracer is None:
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode

    attributes = {
        "durabletask.type": "orchestration",
        "durabletask.task.name": started.name,
        "durabletask.task.instance_id": checkpoint.instance_id,
        "durabletask.task.status": _STATUS_NAMES.get(checkpoint.status, "Completed"),
    }
    began = started.scheduled_start_time or started.timestamp
    if began > checkpoint.updated_at:  # terminated before its scheduled start: it ends where it was made
        began = started.timestamp
    span = tracer.start_span(
        _span_name("orchestration", started.name, started.version),
        context=_parent(context),
        kind=SpanKind.SERVER,
        attributes=_versioned(attributes, started.version),
        start_time=_nanoseconds(began),
    )
    if checkpoint.status == OrchestrationStatus.FAILED:
        details = checkpoint.failure_details
        span.set_status(Status(StatusCode.ERROR, details.message if details is not None else None))
    span.end(end_time=_nanoseconds(checkpoint.updated_at))


def episode_traced(started: ExecutionStarted, instance_id: str, traced: Traced | None) -> None:
    """Make the spans of the timers that fired and the events sent in episodes of the execution
    that ``started`` began, once they have run (``traced``, from :meth:`OrchestrationExecutor.take_traced`)."""
    context = started.trace_context
    if traced is None or context is None:
        return
    tracer = _tracer()
    if tracer is None:
        return
    from opentelemetry.trace import SpanKind

    parent = _parent(context)
    for timer in traced.fired_timers:
        attributes = {
            "durabletask.type": "timer",
            "durabletask.task.name": started.name,
            "durabletask.task.instance_id": instance_id,
            "durabletask.task.task_id": str(timer.timer_id),
            "durabletask.fire_at": timer.fire_at.isoformat(),
        }
        name = f"orchestration:{started.name}:timer"
        start = _nanoseconds(timer.created_at)
        tracer.start_span(name, context=parent, kind=SpanKind.INTERNAL, attributes=attributes, start_time=start).end()
    for target, event_name in traced.sent_events:
        attributes = _event_attributes(event_name, target, sender=instance_id)
        tracer.start_span(
            f"orchestration_event:{event_name}", context=parent, kind=SpanKind.PRODUCER, attributes=attributes
        ).end()


_STATUS_NAMES = {OrchestrationStatus.FAILED: "Failed", OrchestrationStatus.TERMINATED: "Terminated"}
"""How an execution ended, as the SDKs name it (any other end, a continue-as-new too, is "Completed")."""


def _parent(context: TraceContext) -> otel_context.Context:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {_TRACEPARENT: context.trace_parent}
    if context.trace_state:
        carrier[_TRACESTATE] = context.trace_state
    return TraceContextTextMapPropagator().extract(carrier)


def _nanoseconds(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000) * 1000
