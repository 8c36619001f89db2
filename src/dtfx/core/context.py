"""The orchestration context: the API an orchestrator function programs against.

Every call that does durable work records an action with the next sequence number
and returns a task; the replay engine (:mod:`dtfx.core.replay`) completes the task
when the matching history event is applied. The names and signatures follow the
official ``durabletask`` Python SDK.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from dtfx.core import arguments
from dtfx.core.actions import (
    CompleteOrchestration,
    CreateSubOrchestration,
    CreateTimer,
    OrchestratorAction,
    ScheduleTask,
    SendEntityMessage,
    SendEvent,
)
from dtfx.core.entities import EntityInstanceId, entity_id_text
from dtfx.core.errors import LockingRulesViolationError
from dtfx.core.history import (
    EntityLockRequested,
    EntityOperationCalled,
    EntityOperationSignaled,
    EntityUnlockSent,
    EventRaised,
    OrchestrationStatus,
    ParentInstance,
)
from dtfx.core.moments import as_utc
from dtfx.core.serialization import DEFAULT_CONVERTER, DataConverter, output_type_of
from dtfx.core.tasks import CancellableTask, CompletableTask, RetryableTask, RetryPolicy, TimerTask

T = TypeVar("T")

# The namespace .NET's DurableTask.Core uses for deterministic orchestration UUIDs.
_UUID_NAMESPACE = uuid.UUID("9e952958-5e33-4daf-827f-2fa12937b875")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def function_name(fn: Callable[..., Any] | str) -> str:
    """The name an orchestrator, activity or entity is registered and called by."""
    if isinstance(fn, str):
        return fn
    if not callable(fn):
        raise TypeError(f"a name must be a str or a function, not {type(fn).__name__}")
    registered = getattr(fn, "__dtfx_name__", None)
    if isinstance(registered, str):
        return registered
    name = getattr(fn, "__name__", None)
    if not name or name == "<lambda>":
        raise ValueError(f"Cannot infer a name for {fn!r}; register it with an explicit name.")
    return str(name)


@dataclass
class PendingTask:
    """A task waiting for the history event that answers action ``id``."""

    task: CompletableTask[Any]
    retry: RetryCall | None = None
    is_retry_timer: bool = False
    since: datetime | None = None
    """For a timer: the orchestration's time when it was created."""


@dataclass(frozen=True)
class FiredTimer:
    """A timer that fired in an episode run anew (not replayed)."""

    timer_id: int
    created_at: datetime
    fire_at: datetime


@dataclass
class Traced:
    """What episodes run anew (not replayed) did that makes spans of its own: the timers that
    fired, and the events sent, as (target instance, event name)."""

    fired_timers: list[FiredTimer] = field(default_factory=list)
    sent_events: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class RetryCall:
    """How to schedule the next attempt of a call that has a retry policy."""

    task: RetryableTask[Any]
    make_action: Callable[[int], OrchestratorAction]


@dataclass
class EntityRequest:
    """An entity call or lock request waiting for its answer."""

    task: CompletableTask[Any]
    entity_id: str
    operation: str


@dataclass
class CriticalSection:
    """The entities an orchestration has locked (or asked to lock)."""

    id: str
    lock_set: list[str]
    granted: bool = False
    calls_in_flight: set[str] = field(default_factory=set)


class EntityLock:
    """The result of ``ctx.lock_entities``: leaving its ``with`` block releases the locks."""

    def __init__(self, context: OrchestrationContext) -> None:
        self._context = context

    def __enter__(self) -> EntityLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._context.release_locks()


class ReplaySafeLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger adapter that stays silent while the orchestrator replays."""

    def __init__(self, logger: logging.Logger, context: OrchestrationContext) -> None:
        super().__init__(logger, {"instance_id": context.instance_id})
        self._context = context

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's own name
        return not self._context.is_replaying and self.logger.isEnabledFor(level)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs.setdefault("extra", {}).setdefault("instance_id", self._context.instance_id)
        return msg, kwargs


class OrchestrationContext:
    """What an orchestrator function receives as ``ctx``."""

    def __init__(
        self,
        instance_id: str,
        *,
        converter: DataConverter = DEFAULT_CONVERTER,
        default_version: str | None = None,
    ) -> None:
        self._instance_id = instance_id
        self._converter = converter
        self._default_version = default_version
        self._name = ""
        self._version: str | None = None
        self._parent: ParentInstance | None = None
        self._execution_id: str | None = None
        self._current_utc_datetime = _EPOCH
        self._is_replaying = False
        self._sequence = 0
        self._uuid_counter = 0
        self._custom_status: str | None = None
        self._save_events = False
        # Engine state, read and written by the replay engine.
        self.pending_actions: dict[int, OrchestratorAction] = {}
        self.pending_tasks: dict[int, PendingTask] = {}
        self.event_waiters: dict[str, list[CancellableTask[Any]]] = {}
        self.buffered_events: dict[str, list[EventRaised]] = {}
        self.completion: CompleteOrchestration | None = None
        self.entity_requests: dict[str, EntityRequest] = {}
        self.traced = Traced()
        self.critical_section: CriticalSection | None = None

    # -- properties ---------------------------------------------------------------

    @property
    def instance_id(self) -> str:
        """The id of this orchestration instance."""
        return self._instance_id

    @property
    def execution_id(self) -> str | None:
        """The id of the current execution (it changes with continue-as-new)."""
        return self._execution_id

    @property
    def name(self) -> str:
        """The orchestrator's registered name."""
        return self._name

    @property
    def version(self) -> str | None:
        """The orchestration's version, from ``ExecutionStarted``."""
        return self._version

    @property
    def parent_instance_id(self) -> str | None:
        """The id of the orchestration that started this one as a sub-orchestration."""
        return self._parent.instance_id if self._parent else None

    @property
    def current_utc_datetime(self) -> datetime:
        """Deterministic 'now': the time the current episode started, replayed from history."""
        return self._current_utc_datetime

    @property
    def is_replaying(self) -> bool:
        """True while the orchestrator re-runs code for events already in history."""
        return self._is_replaying

    @property
    def custom_status(self) -> str | None:
        """The serialized custom status set by :meth:`set_custom_status`."""
        return self._custom_status

    # -- durable operations -----------------------------------------------------------

    def set_custom_status(self, custom_status: Any) -> None:
        """Publish a JSON value that clients see in the instance's state."""
        self._custom_status = self._converter.serialize(custom_status)

    def create_timer(self, fire_at: datetime | timedelta) -> TimerTask:
        """A task that completes at ``fire_at`` (a moment, or a delay from now)."""
        if isinstance(fire_at, timedelta):
            moment = self._current_utc_datetime + fire_at
        elif isinstance(fire_at, datetime):
            moment = as_utc(fire_at)
        else:  # a number of seconds, say: which unit would be a guess
            raise TypeError(f"create_timer takes a datetime or a timedelta, not {type(fire_at).__name__}")
        task = TimerTask()
        action_id = self._record(lambda action_id: CreateTimer(id=action_id, fire_at=moment))
        self.pending_tasks[action_id] = PendingTask(task, since=self._current_utc_datetime)
        return task

    def call_activity(
        self,
        activity: Callable[..., Any] | str,
        *,
        input: Any = None,
        retry_policy: RetryPolicy | None = None,
        tags: dict[str, str] | None = None,
        return_type: Any = None,
    ) -> CompletableTask[Any]:
        """Schedule an activity; the task completes with its result."""
        name = function_name(activity)
        if return_type is None and not isinstance(activity, str):
            return_type = output_type_of(activity)
        payload = self._converter.serialize(input)
        tags = arguments.tags(tags)
        return self._call(
            lambda action_id: ScheduleTask(id=action_id, name=name, input=payload, tags=tags),
            retry_policy,
            return_type,
        )

    def call_sub_orchestrator(
        self,
        orchestrator: Callable[..., Any] | str,
        *,
        input: Any = None,
        instance_id: str | None = None,
        retry_policy: RetryPolicy | None = None,
        version: str | None = None,
        return_type: Any = None,
    ) -> CompletableTask[Any]:
        """Start a sub-orchestration; the task completes with its output.

        Without ``instance_id`` the child gets ``"<parent id>:<action id as 4 hex digits>"``.
        """
        if self.critical_section is not None:
            raise LockingRulesViolationError("Sub-orchestrations cannot be started inside a critical section.")
        name = function_name(orchestrator)
        if return_type is None and not isinstance(orchestrator, str):
            return_type = output_type_of(orchestrator)
        payload = self._converter.serialize(input)
        instance_id = arguments.optional_text("instance_id", instance_id)
        child_version = arguments.optional_text("version", version) or self._default_version

        def make_action(action_id: int) -> OrchestratorAction:
            child_id = instance_id or f"{self._instance_id}:{action_id:04x}"
            return CreateSubOrchestration(
                id=action_id, instance_id=child_id, name=name, version=child_version, input=payload
            )

        return self._call(make_action, retry_policy, return_type)

    def wait_for_external_event(self, name: str, *, data_type: Any = None) -> CancellableTask[Any]:
        """A task that completes with the data of the next event named ``name`` (any case).

        Events raised before anyone waits are buffered and delivered in arrival order.
        """
        key = arguments.text("name", name).casefold()
        task: CancellableTask[Any] = CancellableTask(data_type)
        buffered = self.buffered_events.get(key)
        if buffered:
            event = buffered.pop(0)
            if not buffered:
                del self.buffered_events[key]
            try:
                task.complete(self._converter.deserialize(event.input, data_type))
            except Exception as error:  # raised where the task is awaited, as for an event that comes later
                task.fail(error)
            return task
        waiters = self.event_waiters.setdefault(key, [])
        waiters.append(task)

        def stop_waiting() -> None:
            if task in waiters:
                waiters.remove(task)

        task._on_cancel = stop_waiting
        return task

    def call_entity(
        self, entity: EntityInstanceId, operation: str, input: Any = None, *, return_type: Any = None
    ) -> CompletableTask[Any]:
        """Call an entity operation; the task completes with its result (or its failure)."""
        target = entity_id_text(entity)
        section = self.critical_section
        if section is not None:
            if not section.granted:
                raise LockingRulesViolationError("Wait for the lock_entities task before calling entities.")
            if target not in section.lock_set:
                raise LockingRulesViolationError(f"Entity '{target}' is not locked by this critical section.")
            if target in section.calls_in_flight:
                raise LockingRulesViolationError(f"Entity '{target}' already has a call in flight.")
            section.calls_in_flight.add(target)
        arguments.text("operation", operation)
        request_id = self.new_uuid()
        payload = self._converter.serialize(input)
        self._record(
            lambda action_id: SendEntityMessage(
                id=action_id,
                event=EntityOperationCalled(
                    event_id=action_id,
                    timestamp=self._current_utc_datetime,
                    request_id=request_id,
                    operation=operation,
                    target_instance_id=target,
                    parent_instance_id=self._instance_id,
                    parent_execution_id=self._execution_id,
                    input=payload,
                ),
            )
        )
        task: CompletableTask[Any] = CompletableTask(return_type)
        self.entity_requests[request_id] = EntityRequest(task, target, operation)
        return task

    def signal_entity(
        self, entity_id: EntityInstanceId, operation_name: str, input: Any = None, signal_time: datetime | None = None
    ) -> None:
        """Send an entity an operation without waiting for it, now or at ``signal_time``."""
        target = entity_id_text(entity_id)
        section = self.critical_section
        if section is not None and target in section.lock_set:
            raise LockingRulesViolationError(f"Entity '{target}' is locked by this orchestration; call it instead.")
        arguments.text("operation_name", operation_name)
        request_id = self.new_uuid()
        payload = self._converter.serialize(input)
        scheduled = as_utc(signal_time) if signal_time is not None else None
        self._record(
            lambda action_id: SendEntityMessage(
                id=action_id,
                event=EntityOperationSignaled(
                    event_id=action_id,
                    timestamp=self._current_utc_datetime,
                    request_id=request_id,
                    operation=operation_name,
                    target_instance_id=target,
                    input=payload,
                    scheduled_time=scheduled,
                ),
            )
        )

    def lock_entities(self, entities: list[EntityInstanceId]) -> CompletableTask[EntityLock]:
        """Lock entities for a critical section; yield the task, then use the lock in ``with``.

        Locks are taken in a global order (the sorted ids), so two orchestrations never
        deadlock; they are released when the ``with`` block ends, and when the
        orchestration completes or fails.
        """
        if self.critical_section is not None:
            raise LockingRulesViolationError("Critical sections cannot be nested.")
        lock_set = sorted({entity_id_text(entity) for entity in entities})
        if not lock_set:
            raise ValueError("lock_entities needs at least one entity.")
        section_id = self.new_uuid()
        self._record(
            lambda action_id: SendEntityMessage(
                id=action_id,
                event=EntityLockRequested(
                    event_id=action_id,
                    timestamp=self._current_utc_datetime,
                    critical_section_id=section_id,
                    lock_set=lock_set,
                    position=0,
                    parent_instance_id=self._instance_id,
                ),
            )
        )
        self.critical_section = CriticalSection(section_id, lock_set)
        task: CompletableTask[EntityLock] = CompletableTask()
        self.entity_requests[section_id] = EntityRequest(task, lock_set[0], "lock")
        return task

    def release_locks(self) -> None:
        """End the critical section: send every locked entity its unlock."""
        section, self.critical_section = self.critical_section, None
        if section is None:
            return
        for target in section.lock_set:
            self._record(functools.partial(self._unlock, section.id, target))

    def _unlock(self, section_id: str, target: str, action_id: int) -> SendEntityMessage:
        unlock = EntityUnlockSent(
            event_id=action_id,
            timestamp=self._current_utc_datetime,
            critical_section_id=section_id,
            parent_instance_id=self._instance_id,
            target_instance_id=target,
        )
        return SendEntityMessage(id=action_id, event=unlock)

    def send_event(self, instance_id: str, event_name: str, *, data: Any = None) -> None:
        """Raise an event on another instance; dropped if it does not exist or has ended."""
        arguments.text("instance_id", instance_id)
        arguments.text("event_name", event_name)
        payload = self._converter.serialize(data)
        self._record(lambda action_id: SendEvent(id=action_id, instance_id=instance_id, name=event_name, data=payload))
        if not self._is_replaying:
            self.traced.sent_events.append((instance_id, event_name))

    def continue_as_new(self, new_input: Any, *, save_events: bool = False, new_version: str | None = None) -> None:
        """Restart this instance with a fresh history; return right after calling it.

        With ``save_events``, external events not yet received carry over to the new run.
        """
        arguments.optional_text("new_version", new_version)
        self._save_events = save_events
        carryover = [event for events in self.buffered_events.values() for event in events] if save_events else []
        self.complete(
            OrchestrationStatus.CONTINUED_AS_NEW,
            result=self._converter.serialize(new_input),
            new_version=new_version,
            carryover_events=sorted(carryover, key=lambda event: event.timestamp),
        )

    def new_uuid(self) -> str:
        """A UUID that is the same on every replay (name-based, RFC 4122 section 4.3)."""
        name = f"{self._instance_id}_{self._current_utc_datetime.isoformat()}_{self._uuid_counter}"
        self._uuid_counter += 1
        return str(uuid.uuid5(_UUID_NAMESPACE, name))

    def create_replay_safe_logger(self, logger: logging.Logger) -> ReplaySafeLogger:
        """Wrap ``logger`` so that it logs nothing while the orchestrator replays."""
        return ReplaySafeLogger(logger, self)

    # -- engine-facing -------------------------------------------------------------------

    def next_action_id(self) -> int:
        """Action ids are sequential per execution and start at 1, as in the Python SDK."""
        self._sequence += 1
        return self._sequence

    def complete(
        self,
        status: OrchestrationStatus,
        *,
        result: str | None = None,
        failure_details: Any = None,
        new_version: str | None = None,
        carryover_events: list[Any] | None = None,
    ) -> None:
        """Record the orchestration's end (releasing any entity locks); later events are ignored."""
        if self.completion is not None:
            return
        self.release_locks()
        self.completion = CompleteOrchestration(
            id=self.next_action_id(),
            status=status,
            result=result,
            failure_details=failure_details,
            new_version=new_version,
            carryover_events=carryover_events or [],
        )

    def _record(self, make_action: Callable[[int], OrchestratorAction]) -> int:
        action_id = self.next_action_id()
        self.pending_actions[action_id] = make_action(action_id)
        return action_id

    def _call(
        self,
        make_action: Callable[[int], OrchestratorAction],
        retry_policy: RetryPolicy | None,
        return_type: Any,
    ) -> CompletableTask[Any]:
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise TypeError(f"retry_policy must be a RetryPolicy, not {type(retry_policy).__name__}")
        action_id = self._record(make_action)
        if retry_policy is None:
            task: CompletableTask[Any] = CompletableTask(return_type)
            self.pending_tasks[action_id] = PendingTask(task)
            return task
        retryable: RetryableTask[Any] = RetryableTask(retry_policy, return_type, self._current_utc_datetime)
        self.pending_tasks[action_id] = PendingTask(retryable, retry=RetryCall(retryable, make_action))
        return retryable
