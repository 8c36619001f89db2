"""The replay engine: drive an orchestrator generator from its history.

An :class:`OrchestrationExecutor` holds one live generator. :meth:`~OrchestrationExecutor.replay`
feeds it the recorded history (``is_replaying`` is true, and every action the code
takes must match the event recorded for its id); :meth:`~OrchestrationExecutor.execute`
feeds it the new events of an episode and returns the actions it took. An executor
that is kept between episodes (the worker's cache) continues with the next episode's
new events without replaying anything.

Whatever the orchestrator's code raises fails the orchestration (or the task whose result it
was reading), ``sys.exit()``, ``GeneratorExit`` and any other ``BaseException`` too, but
``KeyboardInterrupt``, which stops the process.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Generator, Iterable
from typing import Any

from dtfx.core.actions import (
    CompleteOrchestration,
    CreateSubOrchestration,
    CreateTimer,
    OrchestratorAction,
    ScheduleTask,
    SendEntityMessage,
    SendEvent,
)
from dtfx.core.context import EntityLock, FiredTimer, OrchestrationContext, PendingTask, Traced
from dtfx.core.entities import entity_target
from dtfx.core.errors import EntityOperationFailedError, NonDeterminismError, TaskFailedError
from dtfx.core.history import (
    EntityLockGranted,
    EntityLockRequested,
    EntityOperationCalled,
    EntityOperationCompleted,
    EntityOperationFailed,
    EntityOperationSignaled,
    EntityUnlockSent,
    EventRaised,
    EventSent,
    ExecutionResumed,
    ExecutionStarted,
    ExecutionSuspended,
    ExecutionTerminated,
    FailureDetails,
    HistoryEvent,
    OrchestrationStatus,
    OrchestratorStarted,
    SubOrchestrationInstanceCompleted,
    SubOrchestrationInstanceCreated,
    SubOrchestrationInstanceFailed,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TimerCreated,
    TimerFired,
)
from dtfx.core.serialization import DEFAULT_CONVERTER, DataConverter, input_type_of
from dtfx.core.tasks import CompletableTask, Task

logger = logging.getLogger(__name__)

Orchestrator = Callable[[OrchestrationContext, Any], Any]

_METHOD_OF_EVENT: dict[type[HistoryEvent], str] = {
    TaskScheduled: "call_activity",
    TimerCreated: "create_timer",
    SubOrchestrationInstanceCreated: "call_sub_orchestrator",
    EventSent: "send_event",
    EntityOperationCalled: "call_entity",
    EntityOperationSignaled: "signal_entity",
    EntityLockRequested: "lock_entities",
    EntityUnlockSent: "a critical section's end",
}
_EVENT_OF_ACTION: dict[type[OrchestratorAction], type[HistoryEvent]] = {
    ScheduleTask: TaskScheduled,
    CreateTimer: TimerCreated,
    CreateSubOrchestration: SubOrchestrationInstanceCreated,
    SendEvent: EventSent,
}


def _method_of(action: OrchestratorAction) -> str:
    recorded = type(action.event) if isinstance(action, SendEntityMessage) else _EVENT_OF_ACTION[type(action)]
    return _METHOD_OF_EVENT[recorded]


# Events that answer the orchestrator; while it is suspended they wait for the resume.
_HELD_WHILE_SUSPENDED = (
    TaskCompleted,
    TaskFailed,
    SubOrchestrationInstanceCompleted,
    SubOrchestrationInstanceFailed,
    TimerFired,
    EventRaised,
    EntityOperationCompleted,
    EntityOperationFailed,
    EntityLockGranted,
)


class OrchestrationExecutor:
    """Runs one orchestration instance's generator against its history."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        instance_id: str,
        *,
        converter: DataConverter = DEFAULT_CONVERTER,
        default_version: str | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.context = OrchestrationContext(instance_id, converter=converter, default_version=default_version)
        self._converter = converter
        self._generator: Generator[Any, Any, Any] | None = None
        self._awaited: Task[Any] | None = None
        self._suspended = False
        self._held_while_suspended: list[HistoryEvent] = []

    @property
    def is_complete(self) -> bool:
        """True once the orchestration has produced its completion action."""
        return self.context.completion is not None

    @property
    def only_awaited_task(self) -> int | None:
        """The action id of the one task the orchestration waits for, when it waits for
        nothing else (no other task or timer, no external event, no entity); else ``None``."""
        context = self.context
        if len(context.pending_tasks) != 1 or context.event_waiters or context.entity_requests:
            return None
        return next(iter(context.pending_tasks))

    def replay(self, past_events: Iterable[HistoryEvent]) -> None:
        """Rebuild the generator's state from recorded history."""
        self.context._is_replaying = True
        try:
            self._process_all(past_events)
        finally:
            self.context._is_replaying = False
        # Everything recorded is confirmed; what is left pending is new work.

    def execute(self, new_events: Iterable[HistoryEvent]) -> list[OrchestratorAction]:
        """Apply an episode's new events; return the actions not yet in history, in id order.

        The actions are handed over: the caller must persist them (or discard this
        executor), because the next call only returns actions taken after this one.
        """
        self.context._is_replaying = False
        self._process_all(new_events)
        context = self.context
        actions = [context.pending_actions[action_id] for action_id in sorted(context.pending_actions)]
        context.pending_actions.clear()
        if context.completion is not None:
            actions.append(context.completion)
        return actions

    def take_traced(self) -> Traced | None:
        """What the episodes since the last call did that makes spans of its own (see
        :class:`Traced`); ``None``: nothing."""
        traced = self.context.traced
        if not traced.fired_timers and not traced.sent_events:
            return None
        self.context.traced = Traced()
        return traced

    @property
    def completion(self) -> CompleteOrchestration | None:
        """The completion action, once there is one."""
        return self.context.completion

    # -- event processing ------------------------------------------------------------------

    def _process_all(self, events: Iterable[HistoryEvent]) -> None:
        for event in events:
            try:
                self._process(event)
            except NonDeterminismError as error:
                self._fail(error)
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # an engine bug (or a hook's SystemExit) fails the instance
                logger.exception("Processing %s for instance %s failed", type(event).__name__, self.context.instance_id)
                self._fail(error)

    def _process(self, event: HistoryEvent) -> None:
        if self.context.completion is not None:
            self._after_completion(event)
            return
        if self._suspended and isinstance(event, _HELD_WHILE_SUSPENDED):
            self._held_while_suspended.append(event)
            return
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    def _after_completion(self, event: HistoryEvent) -> None:
        completion = self.context.completion
        assert completion is not None
        if (
            isinstance(event, EventRaised)
            and completion.status == OrchestrationStatus.CONTINUED_AS_NEW
            and self.context._save_events
        ):
            completion.carryover_events.append(event)

    def _on_orchestrator_started(self, event: OrchestratorStarted) -> None:
        self.context._current_utc_datetime = event.timestamp

    def _on_execution_started(self, event: ExecutionStarted) -> None:
        context = self.context
        if self._generator is not None:
            return
        context._name = event.name
        context._version = event.version
        context._parent = event.parent
        context._execution_id = event.instance.execution_id
        if context._current_utc_datetime.year == 1970:
            context._current_utc_datetime = event.timestamp
        try:  # an input that cannot be read as the orchestrator's type fails it, as its own error would
            orchestrator_input = self._converter.deserialize(event.input, input_type_of(self.orchestrator))
            result = self.orchestrator(context, orchestrator_input)
        except KeyboardInterrupt:
            raise
        except BaseException as error:
            self._fail(error)
            return
        if inspect.isgenerator(result):
            self._generator = result
            self._advance()
        else:
            self._succeed(result)

    def _on_action_recorded(self, event: HistoryEvent) -> None:
        recorded = _METHOD_OF_EVENT[type(event)]
        action = self.context.pending_actions.pop(event.event_id, None)
        if action is None:
            raise NonDeterminismError(
                f"A previous execution called {recorded} with ID={event.event_id}, "
                "but the current execution does not call it. This happens when the orchestrator has "
                "non-deterministic logic or its code changed after this instance started."
            )
        if _method_of(action) != recorded:
            raise NonDeterminismError(
                f"A previous execution called {recorded} with ID={event.event_id}, "
                f"but the current execution calls {_method_of(action)} instead."
            )
        if isinstance(action, ScheduleTask | CreateSubOrchestration):
            recorded_name = getattr(event, "name", action.name)
            if action.name.casefold() != recorded_name.casefold():
                raise NonDeterminismError(
                    f"A previous execution called {recorded} with ID={event.event_id} "
                    f"and name '{recorded_name}', but the current execution calls it with name '{action.name}'."
                )
        elif isinstance(action, SendEntityMessage):
            before, now = _entity_request_of(event), _entity_request_of(action.event)
            if before[0] != now[0] or before[1].casefold() != now[1].casefold():
                raise NonDeterminismError(
                    f"A previous execution called {recorded} with ID={event.event_id} for entity '{before[0]}'"
                    f"{_operation_text(before[1])}, but the current execution calls it for '{now[0]}'"
                    f"{_operation_text(now[1])}."
                )
        elif isinstance(action, SendEvent) and isinstance(event, EventSent):
            if action.name.casefold() != event.name.casefold() or action.instance_id != event.instance_id:
                raise NonDeterminismError(
                    f"A previous execution called send_event with ID={event.event_id} for event '{event.name}' "
                    f"to '{event.instance_id}', but the current execution sends '{action.name}' "
                    f"to '{action.instance_id}'."
                )

    def _on_result(self, event: TaskCompleted | SubOrchestrationInstanceCompleted) -> None:
        pending = self.context.pending_tasks.pop(event.task_scheduled_id, None)
        if pending is None:
            logger.debug("Ignoring a result for unknown task %d", event.task_scheduled_id)
            return
        task = pending.task
        try:
            value = self._converter.deserialize(event.result, task.result_type)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # a converter's hooks are user code
            self._resolve(task, error=error)
            return
        self._resolve(task, result=value)

    def _on_failure(self, event: TaskFailed | SubOrchestrationInstanceFailed) -> None:
        pending = self.context.pending_tasks.pop(event.task_scheduled_id, None)
        if pending is None:
            logger.debug("Ignoring a failure for unknown task %d", event.task_scheduled_id)
            return
        details = event.failure_details
        what = "Sub-orchestration" if isinstance(event, SubOrchestrationInstanceFailed) else "Activity task"
        error = TaskFailedError(f"{what} #{event.task_scheduled_id} failed: {details.message}", details)
        if (
            pending.retry is not None
            and not details.is_non_retriable
            and self._schedule_retry(pending, event.task_scheduled_id)
        ):
            return
        self._resolve(pending.task, error=error)

    def _on_entity_result(self, event: EntityOperationCompleted | EntityOperationFailed) -> None:
        request = self.context.entity_requests.pop(event.request_id, None)
        if request is None:
            logger.debug("Ignoring an answer to unknown entity request %s", event.request_id)
            return
        section = self.context.critical_section
        if section is not None:
            section.calls_in_flight.discard(request.entity_id)
        if isinstance(event, EntityOperationFailed):
            error = EntityOperationFailedError(request.entity_id, request.operation, event.failure_details)
            self._resolve(request.task, error=error)
            return
        try:
            value = self._converter.deserialize(event.output, request.task.result_type)
        except KeyboardInterrupt:
            raise
        except BaseException as error:
            self._resolve(request.task, error=error)
            return
        self._resolve(request.task, result=value)

    def _on_lock_granted(self, event: EntityLockGranted) -> None:
        request = self.context.entity_requests.pop(event.critical_section_id, None)
        section = self.context.critical_section
        if request is None or section is None or section.id != event.critical_section_id:
            return
        section.granted = True
        self._resolve(request.task, result=EntityLock(self.context))

    def _schedule_retry(self, pending: PendingTask, failed_id: int) -> bool:
        assert pending.retry is not None
        task = pending.retry.task
        context = self.context
        delay = task.policy.next_delay(task.attempts, context._current_utc_datetime - task.started)
        if delay is None:
            return False
        try:
            fire_at = context._current_utc_datetime + delay
        except OverflowError:  # after the year 9999: no attempt left either
            return False
        timer_id = context.next_action_id()
        context.pending_actions[timer_id] = CreateTimer(id=timer_id, fire_at=fire_at, retry_of=failed_id)
        context.pending_tasks[timer_id] = PendingTask(
            task, retry=pending.retry, is_retry_timer=True, since=context._current_utc_datetime
        )
        return True

    def _on_timer_fired(self, event: TimerFired) -> None:
        pending = self.context.pending_tasks.pop(event.timer_id, None)
        if pending is None:
            return
        if pending.since is not None and not self.context._is_replaying:
            self.context.traced.fired_timers.append(FiredTimer(event.timer_id, pending.since, event.fire_at))
        if pending.is_retry_timer and pending.retry is not None:
            retry = pending.retry
            retry.task.attempts += 1
            action_id = self.context.next_action_id()
            self.context.pending_actions[action_id] = retry.make_action(action_id)
            self.context.pending_tasks[action_id] = PendingTask(retry.task, retry=retry)
            return
        self._resolve(pending.task, result=None)

    def _on_event_raised(self, event: EventRaised) -> None:
        context = self.context
        key = event.name.casefold()
        waiters = context.event_waiters.get(key)
        if not waiters:
            context.buffered_events.setdefault(key, []).append(event)
            return
        task = waiters.pop(0)
        if not waiters:
            del context.event_waiters[key]
        try:
            value = self._converter.deserialize(event.input, task.result_type)
        except KeyboardInterrupt:
            raise
        except BaseException as error:
            self._resolve(task, error=error)
            return
        self._resolve(task, result=value)

    def _on_suspended(self, event: ExecutionSuspended) -> None:
        self._suspended = True

    def _on_resumed(self, event: ExecutionResumed) -> None:
        if not self._suspended:
            return
        self._suspended = False
        held, self._held_while_suspended = self._held_while_suspended, []
        for held_event in held:
            self._process(held_event)

    def _on_terminated(self, event: ExecutionTerminated) -> None:
        self.context.complete(OrchestrationStatus.TERMINATED, result=event.input)

    # -- driving the generator ----------------------------------------------------------------

    def _resolve(self, task: CompletableTask[Any], *, result: Any = None, error: BaseException | None = None) -> None:
        if task.is_complete:
            return
        if error is not None:
            task.fail(error)
        else:
            task.complete(result)
        self._resume()

    def _resume(self) -> None:
        awaited = self._awaited
        generator = self._generator
        if awaited is None or generator is None or not awaited.is_complete or self.context.completion is not None:
            return
        if awaited.is_failed:
            self._advance(error=awaited.get_exception())
        else:
            self._advance(awaited._result)

    def _advance(self, value: Any = None, error: BaseException | None = None) -> None:
        """Send ``value`` (or throw ``error``) into the generator, and keep going while it
        yields tasks that are already complete."""
        generator = self._generator
        assert generator is not None
        while True:
            try:
                yielded = generator.throw(error) if error is not None else generator.send(value)
            except StopIteration as stop:
                self._succeed(stop.value)
                return
            except KeyboardInterrupt:
                raise
            except BaseException as raised:
                self._fail(raised)
                return
            if self.context.completion is not None:  # continue_as_new() was called
                return
            if not isinstance(yielded, Task):
                value, error = (
                    None,
                    TypeError(
                        "Orchestrators must yield tasks (from ctx.call_activity, ctx.create_timer, when_all, ...), "
                        f"not {type(yielded).__qualname__}."
                    ),
                )
                continue
            self._awaited = yielded
            if not yielded.is_complete:
                return
            if yielded.is_failed:
                value, error = None, yielded.get_exception()
            else:
                value, error = yielded._result, None

    def _succeed(self, result: Any) -> None:
        if self.context.completion is not None:
            return
        try:
            output = self._converter.serialize(result)
        except KeyboardInterrupt:
            raise
        except BaseException as error:
            self._fail(error)
            return
        self.context.complete(OrchestrationStatus.COMPLETED, result=output)

    def _fail(self, error: BaseException) -> None:
        self._close_generator()
        details = FailureDetails.from_exception(error)
        self.context.complete(OrchestrationStatus.FAILED, failure_details=details)

    def _close_generator(self) -> None:
        generator, self._generator = self._generator, None
        if generator is not None:
            try:
                generator.close()
            except KeyboardInterrupt:
                raise
            except BaseException:  # its finally blocks are user code
                logger.debug("Closing the generator of %s raised", self.context.instance_id, exc_info=True)


_HANDLERS: dict[type[HistoryEvent], Callable[[OrchestrationExecutor, Any], None]] = {
    OrchestratorStarted: OrchestrationExecutor._on_orchestrator_started,
    ExecutionStarted: OrchestrationExecutor._on_execution_started,
    TaskScheduled: OrchestrationExecutor._on_action_recorded,
    TimerCreated: OrchestrationExecutor._on_action_recorded,
    SubOrchestrationInstanceCreated: OrchestrationExecutor._on_action_recorded,
    EventSent: OrchestrationExecutor._on_action_recorded,
    EntityOperationCalled: OrchestrationExecutor._on_action_recorded,
    EntityOperationSignaled: OrchestrationExecutor._on_action_recorded,
    EntityLockRequested: OrchestrationExecutor._on_action_recorded,
    EntityUnlockSent: OrchestrationExecutor._on_action_recorded,
    EntityOperationCompleted: OrchestrationExecutor._on_entity_result,
    EntityOperationFailed: OrchestrationExecutor._on_entity_result,
    EntityLockGranted: OrchestrationExecutor._on_lock_granted,
    TaskCompleted: OrchestrationExecutor._on_result,
    SubOrchestrationInstanceCompleted: OrchestrationExecutor._on_result,
    TaskFailed: OrchestrationExecutor._on_failure,
    SubOrchestrationInstanceFailed: OrchestrationExecutor._on_failure,
    TimerFired: OrchestrationExecutor._on_timer_fired,
    EventRaised: OrchestrationExecutor._on_event_raised,
    ExecutionSuspended: OrchestrationExecutor._on_suspended,
    ExecutionResumed: OrchestrationExecutor._on_resumed,
    ExecutionTerminated: OrchestrationExecutor._on_terminated,
}
"""How each history event is applied (events not listed change nothing)."""


def _entity_request_of(event: HistoryEvent) -> tuple[str, str]:
    """The entity an orchestration's entity message goes to, and its operation ("" for a lock)."""
    operation = event.operation if isinstance(event, EntityOperationCalled | EntityOperationSignaled) else ""
    return entity_target(event), operation


def _operation_text(operation: str) -> str:
    return f" with operation '{operation}'" if operation else ""
