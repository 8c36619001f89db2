"""History events: the durable record an orchestration is replayed from.

The event types and their fields follow the Durable Task model (DurableTask.Core
``History/*`` and the sidecar protocol's ``HistoryEvent``), so the gRPC layer maps
them one to one. Payloads (inputs, outputs, event data) are kept as serialized
JSON strings: the engine moves them around without ever decoding user data.

Events are immutable ``msgspec`` structs; a history is encoded as a tagged union,
which is what the SQL backends store.
"""

from __future__ import annotations

import builtins
import enum
import re
import traceback
from datetime import datetime
from typing import Any

import msgspec


class OrchestrationStatus(enum.IntEnum):
    """Runtime status of an orchestration instance (values match the protocol)."""

    RUNNING = 0
    COMPLETED = 1
    CONTINUED_AS_NEW = 2
    FAILED = 3
    CANCELED = 4
    TERMINATED = 5
    PENDING = 6
    SUSPENDED = 7

    @property
    def is_terminal(self) -> bool:
        """True for statuses an instance never leaves on its own."""
        return self in TERMINAL_STATUSES

    def __str__(self) -> str:
        return self.name


TERMINAL_STATUSES = frozenset(
    {
        OrchestrationStatus.COMPLETED,
        OrchestrationStatus.FAILED,
        OrchestrationStatus.CANCELED,
        OrchestrationStatus.TERMINATED,
    }
)


class FailureDetails(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Why an activity, sub-orchestration or orchestration failed."""

    error_type: str
    message: str
    stack_trace: str | None = None
    inner_failure: FailureDetails | None = None
    is_non_retriable: bool = False
    properties: dict[str, Any] | None = None
    """Custom properties of the failure (JSON values), as an SDK's exception properties provider gives them."""

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"

    def is_caused_by(self, error_type: str | type[BaseException]) -> bool:
        """True if the failure's error type is ``error_type`` (a class or a type name), as
        the official SDK's ``FailureDetails.is_caused_by`` decides.

        A class matches its own name and the names of its already-imported subclasses;
        a string matches the recorded name exactly, or by its last part unless both are
        qualified. A recorded name without a module (as older SDKs and other languages
        write it) matches a class by its name alone. A built-in's name matches with or
        without ``builtins.`` (the official Python SDK's workers write ``builtins.ValueError``,
        dtfx ``ValueError``).
        """
        recorded = self.error_type.removeprefix("builtins.")
        if not recorded:
            return False
        bare = "." not in recorded and not _is_builtin_error(recorded)  # dtfx writes builtins without a module
        if isinstance(error_type, str):
            wanted = error_type.removeprefix("builtins.")
            if recorded == wanted:
                return True
            if not bare and ("." in wanted or _is_builtin_error(wanted)):
                return False
            return bool(wanted) and recorded.rsplit(".", 1)[-1] == wanted.rsplit(".", 1)[-1]
        pending: list[type[BaseException]] = [error_type]
        seen: set[type[BaseException]] = set()
        while pending:
            candidate = pending.pop()
            if candidate in seen:
                continue
            seen.add(candidate)
            if recorded == qualified_name(candidate) or (bare and recorded == candidate.__name__):
                return True
            pending.extend(candidate.__subclasses__())
        return False

    @classmethod
    def from_exception(cls, error: BaseException, *, non_retriable: bool | None = None) -> FailureDetails:
        """Describe an exception, its stack trace and its cause chain (up to
        :data:`_CAUSES_DESCRIBED` causes, each once: a re-raised error's chain can loop).

        It never raises for what the error's own code does: a ``__str__`` or a property
        that raises gives a message that says so.
        """
        chain: list[BaseException] = []
        cause: BaseException | None = error
        while cause is not None and len(chain) <= _CAUSES_DESCRIBED and all(cause is not seen for seen in chain):
            chain.append(cause)
            cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
        inner: FailureDetails | None = None
        for link in reversed(chain):
            own = _attribute(link, "failure_details")
            inner = cls(
                error_type=qualified_name(type(link)),
                message=storable_text(_message(link)),
                stack_trace=storable_text(_stack_trace(link)),
                inner_failure=own if isinstance(own, FailureDetails) else inner,
                is_non_retriable=bool(_attribute(link, "is_non_retriable")),
            )
        assert inner is not None
        if non_retriable is not None:
            inner = msgspec.structs.replace(inner, is_non_retriable=non_retriable)
        return inner


_CAUSES_DESCRIBED = 10
"""How many causes of an error :meth:`FailureDetails.from_exception` describes, as the SDK does."""


def _attribute(error: BaseException, name: str) -> Any:
    """``error``'s attribute ``name`` (``None`` if it has none, or if reading it raises)."""
    try:
        return getattr(error, name, None)
    except KeyboardInterrupt:
        raise
    except BaseException:
        return None


def _stack_trace(error: BaseException) -> str:
    """The traceback of ``error`` as Python prints it, or what went wrong when it would not print."""
    try:
        return "".join(traceback.format_exception(type(error), error, error.__traceback__))
    except KeyboardInterrupt:
        raise
    except BaseException as failed:  # its __notes__, say, a property that raises
        return f"<the traceback of the {type(error).__name__} could not be written: {type(failed).__name__}>"


def _message(error: BaseException) -> str:
    """``str(error)``, or what went wrong when it would not give one."""
    try:
        return str(error)
    except KeyboardInterrupt:
        raise
    except BaseException as failed:  # a __str__ that raises, or returns no text
        return f"<str() of the {type(error).__name__} raised {type(failed).__name__}>"


def _is_builtin_error(name: str) -> bool:
    """Whether ``name`` is that of a built-in exception (``ValueError``)."""
    value = getattr(builtins, name, None)
    return isinstance(value, type) and issubclass(value, BaseException)


def storable_text(text: str) -> str:
    """``text``, with a lone surrogate (which no task hub stores, nor JSON encodes) written out
    as an escape: what Python makes of a file name that is not UTF-8, say."""
    if text.isascii():  # the usual case
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def qualified_name(error_type: type[BaseException]) -> str:
    """``ValueError`` for builtins, ``package.module.Name`` for everything else."""
    if error_type.__module__ == "builtins":
        return error_type.__qualname__
    return f"{error_type.__module__}.{error_type.__qualname__}"


class OrchestrationInstance(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An instance id with the execution (generation) it refers to."""

    instance_id: str
    execution_id: str | None = None


class ParentInstance(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The orchestration that started a sub-orchestration."""

    instance_id: str
    execution_id: str | None = None
    name: str | None = None
    version: str | None = None
    task_scheduled_id: int = -1


class TraceContext(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A W3C trace context (OpenTelemetry's): the span that an orchestration, an activity, a
    sub-orchestration or an entity operation continues. It is kept with the start, the task
    or the operation, so that whichever worker runs it (dtfx's, or an SDK's over gRPC)
    continues the trace, on any machine and however much later."""

    trace_parent: str
    """The ``traceparent`` header's value: ``00-<trace id>-<span id>-<flags>``."""
    trace_state: str | None = None
    """The ``tracestate`` header's value, if any."""
    span_id: str | None = None
    """The span's id alone, as some SDKs also send it."""


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-[!-~]*)?")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
MAX_TRACE_PARENT = 256
"""Characters of a ``traceparent``: 55 in version 00; later versions may add fields."""
MAX_TRACE_STATE = 512
"""Characters of a ``tracestate`` that W3C's Trace Context asks every system to carry."""


def trace_context_problem(context: TraceContext) -> str | None:
    """Why ``context`` is no W3C trace context (``None`` if it is one)."""
    parent = context.trace_parent
    match = _TRACEPARENT.fullmatch(parent) if len(parent) <= MAX_TRACE_PARENT else None
    if match is None or match[1] == "ff" or (match[1] == "00" and match[4] is not None):
        return f"trace_parent {parent[:80]!r} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"
    if set(match[2]) == {"0"} or set(match[3]) == {"0"}:
        return "trace_parent has an all-zero trace or span id"
    if context.trace_state is not None and len(context.trace_state) > MAX_TRACE_STATE:
        return f"trace_state is longer than {MAX_TRACE_STATE} characters"
    if context.span_id is not None and not is_span_id(context.span_id):
        return f"span_id {context.span_id[:80]!r} is not 16 hex digits"
    return None


def check_trace_context(context: TraceContext | None) -> TraceContext | None:
    """``context``, if it is a W3C trace context (or ``None``); raises ``ValueError`` if not."""
    problem = trace_context_problem(context) if context is not None else None
    if problem is not None:
        raise ValueError(f"Not a W3C trace context: {problem}.")
    return context


def is_span_id(value: str) -> bool:
    """Whether ``value`` is a W3C span id: 16 lowercase hex digits."""
    return _SPAN_ID.fullmatch(value) is not None


class OrchestrationSpan(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The span of an orchestration's execution as the worker that runs it began it: its id
    and start, handed back to that worker in each later episode so that the execution is one span."""

    span_id: str | None = None
    start_time: datetime | None = None


class HistoryEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every history event."""

    event_id: int = -1
    timestamp: datetime


class ExecutionStarted(HistoryEvent, tag="ExecutionStarted", frozen=True, kw_only=True, omit_defaults=True):
    name: str
    instance: OrchestrationInstance
    version: str | None = None
    input: str | None = None
    parent: ParentInstance | None = None
    scheduled_start_time: datetime | None = None
    tags: dict[str, str] | None = None
    trace_context: TraceContext | None = None
    """The span that started the execution (a client's, or the parent orchestration's)."""


class ExecutionCompleted(HistoryEvent, tag="ExecutionCompleted", frozen=True, kw_only=True, omit_defaults=True):
    status: OrchestrationStatus
    result: str | None = None
    failure_details: FailureDetails | None = None


class ExecutionTerminated(HistoryEvent, tag="ExecutionTerminated", frozen=True, kw_only=True, omit_defaults=True):
    input: str | None = None
    recurse: bool = False


class ExecutionSuspended(HistoryEvent, tag="ExecutionSuspended", frozen=True, kw_only=True, omit_defaults=True):
    input: str | None = None


class ExecutionResumed(HistoryEvent, tag="ExecutionResumed", frozen=True, kw_only=True, omit_defaults=True):
    input: str | None = None


class ExecutionRewound(HistoryEvent, tag="ExecutionRewound", frozen=True, kw_only=True, omit_defaults=True):
    reason: str | None = None
    parent: ParentInstance | None = None
    """The parent that rewinds this sub-orchestration with itself, and the task it called it as;
    ``None`` for a rewind asked for by a client."""


class TaskScheduled(HistoryEvent, tag="TaskScheduled", frozen=True, kw_only=True, omit_defaults=True):
    name: str
    version: str | None = None
    input: str | None = None
    tags: dict[str, str] | None = None
    trace_context: TraceContext | None = None
    """The span that scheduled the activity, which the activity's run continues."""


class TaskCompleted(HistoryEvent, tag="TaskCompleted", frozen=True, kw_only=True, omit_defaults=True):
    task_scheduled_id: int
    result: str | None = None


class TaskFailed(HistoryEvent, tag="TaskFailed", frozen=True, kw_only=True, omit_defaults=True):
    task_scheduled_id: int
    failure_details: FailureDetails


class SubOrchestrationInstanceCreated(
    HistoryEvent, tag="SubOrchestrationInstanceCreated", frozen=True, kw_only=True, omit_defaults=True
):
    instance_id: str
    name: str
    version: str | None = None
    input: str | None = None
    trace_context: TraceContext | None = None
    """The span that started the sub-orchestration, which its execution continues."""


class SubOrchestrationInstanceCompleted(
    HistoryEvent, tag="SubOrchestrationInstanceCompleted", frozen=True, kw_only=True, omit_defaults=True
):
    task_scheduled_id: int
    result: str | None = None


class SubOrchestrationInstanceFailed(
    HistoryEvent, tag="SubOrchestrationInstanceFailed", frozen=True, kw_only=True, omit_defaults=True
):
    task_scheduled_id: int
    failure_details: FailureDetails


class TimerCreated(HistoryEvent, tag="TimerCreated", frozen=True, kw_only=True, omit_defaults=True):
    fire_at: datetime
    retry_of: int | None = None
    """For the wait before a retry: the id of the failed attempt (rewind keeps such attempts)."""


class TimerFired(HistoryEvent, tag="TimerFired", frozen=True, kw_only=True, omit_defaults=True):
    timer_id: int
    fire_at: datetime


class OrchestratorStarted(HistoryEvent, tag="OrchestratorStarted", frozen=True, kw_only=True, omit_defaults=True):
    span: OrchestrationSpan | None = None
    """The execution's span, when the worker that ran this episode began or changed it."""


class OrchestratorCompleted(HistoryEvent, tag="OrchestratorCompleted", frozen=True, kw_only=True, omit_defaults=True):
    pass


class EventSent(HistoryEvent, tag="EventSent", frozen=True, kw_only=True, omit_defaults=True):
    instance_id: str
    name: str
    input: str | None = None


class EventRaised(HistoryEvent, tag="EventRaised", frozen=True, kw_only=True, omit_defaults=True):
    name: str
    input: str | None = None


class GenericEvent(HistoryEvent, tag="GenericEvent", frozen=True, kw_only=True, omit_defaults=True):
    """Carries no meaning for the orchestrator; used to wake an instance up."""

    data: str | None = None


class EntityOperationSignaled(
    HistoryEvent, tag="EntityOperationSignaled", frozen=True, kw_only=True, omit_defaults=True
):
    request_id: str
    operation: str
    target_instance_id: str
    input: str | None = None
    scheduled_time: datetime | None = None
    trace_context: TraceContext | None = None
    """The span that sent the operation, which the operation's run continues."""


class EntityOperationCalled(HistoryEvent, tag="EntityOperationCalled", frozen=True, kw_only=True, omit_defaults=True):
    request_id: str
    operation: str
    target_instance_id: str
    parent_instance_id: str
    parent_execution_id: str | None = None
    input: str | None = None
    scheduled_time: datetime | None = None
    trace_context: TraceContext | None = None
    """The span that sent the operation, which the operation's run continues."""


class EntityOperationCompleted(
    HistoryEvent, tag="EntityOperationCompleted", frozen=True, kw_only=True, omit_defaults=True
):
    request_id: str
    output: str | None = None


class EntityOperationFailed(HistoryEvent, tag="EntityOperationFailed", frozen=True, kw_only=True, omit_defaults=True):
    request_id: str
    failure_details: FailureDetails


class EntityLockRequested(HistoryEvent, tag="EntityLockRequested", frozen=True, kw_only=True, omit_defaults=True):
    critical_section_id: str
    lock_set: list[str]
    position: int
    parent_instance_id: str


class EntityLockGranted(HistoryEvent, tag="EntityLockGranted", frozen=True, kw_only=True, omit_defaults=True):
    critical_section_id: str


class EntityUnlockSent(HistoryEvent, tag="EntityUnlockSent", frozen=True, kw_only=True, omit_defaults=True):
    critical_section_id: str
    parent_instance_id: str
    target_instance_id: str


AnyHistoryEvent = (
    ExecutionStarted
    | ExecutionCompleted
    | ExecutionTerminated
    | ExecutionSuspended
    | ExecutionResumed
    | ExecutionRewound
    | TaskScheduled
    | TaskCompleted
    | TaskFailed
    | SubOrchestrationInstanceCreated
    | SubOrchestrationInstanceCompleted
    | SubOrchestrationInstanceFailed
    | TimerCreated
    | TimerFired
    | OrchestratorStarted
    | OrchestratorCompleted
    | EventSent
    | EventRaised
    | GenericEvent
    | EntityOperationSignaled
    | EntityOperationCalled
    | EntityOperationCompleted
    | EntityOperationFailed
    | EntityLockRequested
    | EntityLockGranted
    | EntityUnlockSent
)

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(AnyHistoryEvent)
_events_decoder = msgspec.json.Decoder(list[AnyHistoryEvent])
_failure_decoder = msgspec.json.Decoder(FailureDetails)


def encode_event(event: HistoryEvent) -> bytes:
    """One event as JSON (with its ``type`` tag)."""
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> HistoryEvent:
    """The inverse of :func:`encode_event`."""
    event: HistoryEvent = _event_decoder.decode(data)
    return event


def encode_events(events: list[HistoryEvent]) -> bytes:
    """A list of events as one JSON array."""
    return _encoder.encode(events)


def decode_events(data: bytes | str) -> list[HistoryEvent]:
    """The inverse of :func:`encode_events`."""
    events: list[HistoryEvent] = list(_events_decoder.decode(data))
    return events


def encode_failure(details: FailureDetails) -> bytes:
    """Failure details as JSON, for storage."""
    return _encoder.encode(details)


def decode_failure(data: bytes | str) -> FailureDetails:
    """The inverse of :func:`encode_failure`."""
    details: FailureDetails = _failure_decoder.decode(data)
    return details
