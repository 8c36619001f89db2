"""Durable entities: the model, pure.

An entity is a small stateful object addressed by :class:`EntityInstanceId`
(``@name@key``). It is stored as an instance whose inbox receives requests
(operation signals and calls, lock requests, unlocks). One work item processes a
batch of them:

1. :func:`plan_batch` walks the requests in arrival order against the entity's
   lock: requests from anyone but the lock holder wait in the entity's queue;
   lock requests take the lock and pass the request on along the lock set (the
   last entity grants the lock to the orchestration); unlocks release it.
   The result is the operations to run, in order.
2. An executor runs the operations (local entity functions, or an SDK worker over
   gRPC) and returns the new state, one result per operation and the actions the
   operations took (signals, new orchestrations).
3. :func:`apply_batch` turns all of it into a checkpoint: the state, the scheduler
   state, replies to callers, and the outbound messages.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import total_ordering
from typing import Any

import msgspec

from dtfx.core.history import (
    AnyHistoryEvent,
    EntityLockGranted,
    EntityLockRequested,
    EntityOperationCalled,
    EntityOperationCompleted,
    EntityOperationFailed,
    EntityOperationSignaled,
    EntityUnlockSent,
    ExecutionStarted,
    FailureDetails,
    HistoryEvent,
    OrchestrationInstance,
    OrchestrationStatus,
    TraceContext,
)
from dtfx.core.instance_ids import instance_id_error
from dtfx.core.moments import fields_as_utc
from dtfx.core.serialization import DEFAULT_CONVERTER, DataConverter
from dtfx.core.state import OrchestrationState
from dtfx.core.tokens import new_token
from dtfx.core.workitems import MessageId, OrchestrationCheckpoint, OrchestrationWorkItem, OutboundMessage


@total_ordering
@dataclass(frozen=True)
class EntityInstanceId:
    """Identifies an entity: its (case-insensitive) name and its key."""

    entity: str
    key: str

    def __post_init__(self) -> None:
        if not self.entity:
            raise ValueError("An entity name cannot be empty.")
        if "@" in self.entity:
            raise ValueError("An entity name cannot contain '@'.")
        if not isinstance(self.key, str):
            raise TypeError(f"An entity key is a string (got {type(self.key).__name__} {self.key!r}).")
        object.__setattr__(self, "entity", self.entity.lower())
        error = instance_id_error(str(self))  # a NUL in the key, say, which the store could not hold
        if error is not None:
            raise error

    def __str__(self) -> str:
        return f"@{self.entity}@{self.key}"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, EntityInstanceId):
            return NotImplemented
        return str(self) < str(other)

    @classmethod
    def parse(cls, instance_id: str) -> EntityInstanceId:
        """The id written as ``@name@key``."""
        if not instance_id.startswith("@") or instance_id.find("@", 1) < 0:
            raise ValueError(f"Not an entity id (expected '@name@key'): {instance_id!r}")
        _, name, key = instance_id.split("@", 2)
        return cls(name, key)


def entity_id_text(entity: object) -> str:
    """The instance id of ``entity``: an :class:`EntityInstanceId`, or anything whose text is
    ``@name@key`` (the id written out, the official SDK's ``EntityInstanceId``).

    Raises ``ValueError`` for anything else: a plain instance id would send an entity's
    message to an orchestration of that id.
    """
    if isinstance(entity, EntityInstanceId):
        return str(entity)
    return str(EntityInstanceId.parse(str(entity)))


class EntityLockHolder(msgspec.Struct, frozen=True):
    """Who holds an entity's lock: a critical section of an orchestration."""

    critical_section_id: str
    owner: str


_RELEASED_REMEMBERED = 32
"""Most critical sections an entity remembers as released before their lock request came."""


class EntitySchedulerState(msgspec.Struct, omit_defaults=True):
    """What an entity keeps besides its state: its lock, the requests waiting for it, and the
    critical sections released before their lock request reached it (an orchestration that
    ended while its request travelled along the lock set): the request is dropped when it comes."""

    lock: EntityLockHolder | None = None
    queue: list[AnyHistoryEvent] = msgspec.field(default_factory=list)
    released: list[str] = msgspec.field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """No lock, nothing waiting, nothing to remember."""
        return self.lock is None and not self.queue and not self.released


_scheduler_encoder = msgspec.json.Encoder()
_scheduler_decoder = msgspec.json.Decoder(EntitySchedulerState)


def decode_scheduler_state(data: str | None) -> EntitySchedulerState:
    """The scheduler state stored with an entity (empty when there is none)."""
    return _scheduler_decoder.decode(data) if data else EntitySchedulerState()


def encode_scheduler_state(state: EntitySchedulerState) -> str | None:
    """The stored form of the scheduler state (``None`` when empty)."""
    return None if state.is_empty else _scheduler_encoder.encode(state).decode()


OperationRequest = EntityOperationSignaled | EntityOperationCalled


@dataclass
class BatchPlan:
    """What one entity work item does: operations to run and lock traffic to send."""

    entity_id: EntityInstanceId
    operations: list[OperationRequest]
    scheduler: EntitySchedulerState
    lock_messages: list[OutboundMessage]
    consumed: list[MessageId]


@dataclass
class OperationResult:
    """The outcome of one operation: an output or a failure."""

    output: str | None = None
    failure: FailureDetails | None = None


@dataclass(frozen=True)
class SignalEntity:
    """An operation's request to signal an entity."""

    target: str
    operation: str
    input: str | None = None
    scheduled_time: datetime | None = None
    trace_context: TraceContext | None = None
    """The span of the operation that asked, which the signalled operation continues."""


@dataclass(frozen=True)
class StartOrchestration:
    """An operation's request to start an orchestration."""

    instance_id: str
    name: str
    input: str | None = None
    version: str | None = None
    scheduled_time: datetime | None = None
    trace_context: TraceContext | None = None
    """The span of the operation that asked, which the orchestration continues."""


EntityAction = SignalEntity | StartOrchestration


@dataclass
class BatchResult:
    """What an executor returns for a batch: the state after it, results and actions."""

    state: str | None
    results: list[OperationResult]
    actions: list[EntityAction] = field(default_factory=list)

    @classmethod
    def failing(cls, state: str | None, operations: Sequence[OperationRequest], failure: FailureDetails) -> BatchResult:
        """A batch that failed as a whole: every operation fails, and the state stays ``state``."""
        return cls(state, [OperationResult(failure=failure) for _ in operations])


def entity_target(event: HistoryEvent) -> str:
    """The entity an orchestration's entity message goes to (a lock request: the first of its set)."""
    if isinstance(event, EntityLockRequested):
        return event.lock_set[event.position]
    if isinstance(event, EntityOperationSignaled | EntityOperationCalled | EntityUnlockSent):
        return event.target_instance_id
    raise ValueError(f"{type(event).__name__} is not addressed to an entity")


def _from_holder(event: HistoryEvent, holder: EntityLockHolder) -> bool:
    if isinstance(event, EntityOperationCalled):
        return event.parent_instance_id == holder.owner
    if isinstance(event, EntityUnlockSent):
        return event.critical_section_id == holder.critical_section_id
    return False


def plan_batch(item: OrchestrationWorkItem, now: datetime) -> BatchPlan:
    """Order the entity's waiting and new requests against its lock."""
    entity_id = EntityInstanceId.parse(item.instance_id)
    stored = decode_scheduler_state(item.state.serialized_custom_status)
    lock = stored.lock
    released = list(stored.released)
    pending: deque[HistoryEvent] = deque([*stored.queue, *(message.event for message in item.messages)])
    waiting: list[HistoryEvent] = []
    operations: list[OperationRequest] = []
    lock_messages: list[OutboundMessage] = []
    while pending:
        event = pending.popleft()
        if isinstance(event, EntityLockRequested) and event.critical_section_id in released:
            released.remove(event.critical_section_id)  # its orchestration ended before it came
            continue
        if isinstance(event, EntityUnlockSent) and (lock is None or not _from_holder(event, lock)):
            # Its section never held this lock: its orchestration ended before the lock came.
            if not _withdrawn(waiting, event.critical_section_id):  # the request is still on its way
                released = [*released, event.critical_section_id][-_RELEASED_REMEMBERED:]
            continue
        if lock is not None and not _from_holder(event, lock):
            waiting.append(event)
            continue
        if isinstance(event, EntityOperationSignaled | EntityOperationCalled):
            operations.append(event)
        elif isinstance(event, EntityLockRequested):
            lock = EntityLockHolder(event.critical_section_id, event.parent_instance_id)
            lock_messages.append(_pass_lock_on(event, now))
        elif isinstance(event, EntityUnlockSent):
            lock = None
            pending.extendleft(reversed(waiting))  # what waited for the lock goes first
            waiting = []
    scheduler = EntitySchedulerState(lock=lock, queue=waiting, released=released)  # type: ignore[arg-type]
    return BatchPlan(entity_id, operations, scheduler, lock_messages, [m.id for m in item.messages])


def _withdrawn(waiting: list[HistoryEvent], critical_section_id: str) -> bool:
    """Take the section's lock request out of ``waiting``, if it waits there; whether it did."""
    for index, event in enumerate(waiting):
        if isinstance(event, EntityLockRequested) and event.critical_section_id == critical_section_id:
            del waiting[index]
            return True
    return False


def _pass_lock_on(request: EntityLockRequested, now: datetime) -> OutboundMessage:
    """Forward a lock request to the next entity of the lock set, or grant it after the last."""
    following = request.position + 1
    if following < len(request.lock_set):
        forwarded = msgspec.structs.replace(request, position=following, timestamp=now)
        return OutboundMessage(request.lock_set[following], forwarded)
    granted = EntityLockGranted(timestamp=now, critical_section_id=request.critical_section_id)
    return OutboundMessage(request.parent_instance_id, granted)


def apply_batch(
    item: OrchestrationWorkItem, plan: BatchPlan, result: BatchResult | None, now: datetime
) -> OrchestrationCheckpoint:
    """The checkpoint of an entity work item (``result`` is ``None`` when nothing ran)."""
    state = item.state.serialized_output if result is None else result.state
    messages = list(plan.lock_messages)
    if result is not None:
        for operation, outcome in zip(plan.operations, result.results, strict=True):
            if isinstance(operation, EntityOperationCalled):
                messages.append(_reply(operation, outcome, now))
        messages.extend(_action_message(action, item.instance_id, now) for action in result.actions)
    empty = state is None and plan.scheduler.is_empty
    return OrchestrationCheckpoint(
        instance_id=item.instance_id,
        lock_token=item.lock_token,
        consumed=plan.consumed,
        new_history=[],
        status=OrchestrationStatus.COMPLETED if empty else OrchestrationStatus.RUNNING,
        execution_id=item.state.execution_id,
        input=None,
        output=state,
        custom_status=encode_scheduler_state(plan.scheduler),
        failure_details=None,
        version=None,
        completed_at=None,
        updated_at=now,
        messages=messages,
    )


def _reply(call: EntityOperationCalled, outcome: OperationResult, now: datetime) -> OutboundMessage:
    reply: HistoryEvent
    if outcome.failure is not None:
        reply = EntityOperationFailed(timestamp=now, request_id=call.request_id, failure_details=outcome.failure)
    else:
        reply = EntityOperationCompleted(timestamp=now, request_id=call.request_id, output=outcome.output)
    return OutboundMessage(call.parent_instance_id, reply, call.parent_execution_id)


def _action_message(action: EntityAction, sender: str, now: datetime) -> OutboundMessage:
    if isinstance(action, SignalEntity):
        signal = EntityOperationSignaled(
            timestamp=now,
            request_id=new_token(),
            operation=action.operation,
            target_instance_id=action.target,
            input=action.input,
            scheduled_time=action.scheduled_time,
            trace_context=action.trace_context,
        )
        return OutboundMessage(action.target, signal, visible_at=action.scheduled_time)
    start = ExecutionStarted(
        timestamp=now,
        name=action.name,
        instance=OrchestrationInstance(instance_id=action.instance_id, execution_id=new_token()),
        version=action.version,
        input=action.input,
        scheduled_start_time=action.scheduled_time,
        trace_context=action.trace_context,
    )
    return OutboundMessage(action.instance_id, start, visible_at=action.scheduled_time)


@dataclass
class EntityMetadata:
    """What a client sees of an entity."""

    id: EntityInstanceId
    last_modified: datetime
    backlog_queue_size: int = 0
    """Requests waiting for the entity's lock to be released."""
    locked_by: str | None = None
    """The orchestration instance that holds the entity's lock."""
    serialized_state: str | None = None
    includes_state: bool = True
    converter: DataConverter = field(default=DEFAULT_CONVERTER, compare=False, repr=False)

    def get_state(self, intended_type: Any = None) -> Any:
        """The entity's state, rebuilt as ``intended_type`` when given."""
        return self.converter.deserialize(self.serialized_state, intended_type)

    @classmethod
    def of(
        cls, state: OrchestrationState, *, include_state: bool, include_transient: bool = False
    ) -> EntityMetadata | None:
        """The metadata of a stored entity instance; ``None`` if it has no state (unless
        ``include_transient``) and no lock."""
        scheduler = decode_scheduler_state(state.serialized_custom_status)
        if state.serialized_output is None and scheduler.lock is None and not include_transient:
            return None
        return cls(
            id=EntityInstanceId.parse(state.instance_id),
            last_modified=state.last_updated_at,
            backlog_queue_size=len(scheduler.queue),
            locked_by=scheduler.lock.owner if scheduler.lock else None,
            serialized_state=state.serialized_output if include_state else None,
            includes_state=include_state,
        )


@dataclass(frozen=True, kw_only=True)
class EntityQuery:
    """Which entities a query returns (the official SDK's shape)."""

    instance_id_starts_with: str | None = None
    """An id prefix such as ``"@counter@"`` or ``"@counter@a"``; a prefix without the leading
    ``@`` is taken as the start of an entity name."""
    last_modified_from: datetime | None = None
    last_modified_to: datetime | None = None
    include_state: bool = True
    include_transient: bool = False
    """Also return entities that have no state (for instance, one that is only locked)."""
    page_size: int | None = None

    def __post_init__(self) -> None:
        if self.page_size is not None and self.page_size < 1:
            raise ValueError(f"page_size must be at least 1 (got {self.page_size})")
        fields_as_utc(self)


@dataclass(frozen=True)
class CleanEntityStorageResult:
    """What :meth:`~dtfx.AsyncClient.clean_entity_storage` did."""

    empty_entities_removed: int
    orphaned_locks_released: int
