"""Processing entity work items: schedule the batch, run its operations, commit.

:class:`EntityProcessor` is the same whoever runs the operations; an
:class:`EntityRunner` runs them: :class:`LocalEntityRunner` here (registered entity
functions and classes), or the gRPC sidecar's runner for SDK workers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from datetime import timedelta
from typing import Any, Protocol

from dtfx._tracing import current_trace_context, entity_operation_span
from dtfx.backends.base import Backend
from dtfx.core.apply import unstorable_failure
from dtfx.core.entities import (
    BatchPlan,
    BatchResult,
    EntityInstanceId,
    OperationRequest,
    OperationResult,
    apply_batch,
    plan_batch,
)
from dtfx.core.entity_context import DurableEntity, EntityBatchState, EntityContext
from dtfx.core.errors import NotRegisteredError, UnstorableValueError
from dtfx.core.history import EntityOperationSignaled, FailureDetails
from dtfx.core.serialization import DataConverter, input_type_of, parameter_types
from dtfx.core.workitems import CommitResult, OrchestrationCheckpoint, OrchestrationWorkItem
from dtfx.worker.commit import GroupCommitter
from dtfx.worker.leases import keep_orchestration_lease
from dtfx.worker.orchestrations import Abandon
from dtfx.worker.registry import Registry
from dtfx.worker.user_code import awaited, called, escaped

logger = logging.getLogger(__name__)


class EntityRunner(Protocol):
    """Runs a batch of entity operations."""

    async def run(self, item: OrchestrationWorkItem, plan: BatchPlan) -> BatchResult | Abandon:
        """The state after the plan's operations (run on the entity's state in ``item``), one
        result per operation and their actions; or :class:`Abandon` to give the work item back."""


class EntityProcessor:
    """Takes an entity work item from lock to commit."""

    def __init__(
        self,
        backend: Backend,
        runner: EntityRunner,
        committer: GroupCommitter[OrchestrationCheckpoint, CommitResult],
        *,
        lease_duration: timedelta,
    ) -> None:
        self._backend = backend
        self._runner = runner
        self._committer = committer
        self._lease_duration = lease_duration

    async def process(self, item: OrchestrationWorkItem) -> None:
        """Run the operations the entity's lock lets through, renewing the work item's lease
        meanwhile (a batch may hold thousands of them), and commit the batch."""
        now = self._backend.now()
        plan = plan_batch(item, now)
        result: BatchResult | None = None
        if plan.operations:
            what = f"Entity {item.instance_id}"
            async with keep_orchestration_lease(self._backend, item, self._lease_duration, what):
                outcome = await self._runner.run(item, plan)
            if isinstance(outcome, Abandon):  # given back (over gRPC: no SDK worker can take it now)
                await self._backend.abandon_orchestration_work_item(
                    item, retry_at=outcome.retry_at(self._backend.now())
                )
                return
            result = outcome
        try:
            committed = await self._committer.commit(apply_batch(item, plan, result, now))
        except UnstorableValueError as error:  # it would be refused every time the batch ran
            logger.warning(
                "Entity %s: the store refused its batch (%s); failing its operations", item.instance_id, error
            )
            refusal = unstorable_failure(f"The outcome of the entity's batch of operations cannot be stored: {error}")
            refused = BatchResult.failing(item.state.serialized_output, plan.operations, refusal)
            committed = await self._committer.commit(apply_batch(item, plan, refused, now))
        if not committed:
            logger.warning("Entity %s: the lease was lost before the batch could be committed", item.instance_id)

    async def release(self, item: OrchestrationWorkItem, retry_after: timedelta | None = None) -> None:
        """Give the work item back after a failure or at shutdown (offered again after ``retry_after``)."""
        retry_at = Abandon(retry_after).retry_at(self._backend.now())
        await self._backend.abandon_orchestration_work_item(item, retry_at=retry_at)


class LocalEntityRunner:
    """Runs registered entity functions and classes.

    A batch runs on the thread pool (so sync entity code never blocks the event
    loop); an operation that returns an awaitable is awaited on the loop. A failed
    operation rolls back its own state change and actions, and only those.
    """

    def __init__(self, registry: Registry, converter: DataConverter, *, thread_pool: Executor | None) -> None:
        self._registry = registry
        self._converter = converter
        self._thread_pool = thread_pool

    async def run(self, item: OrchestrationWorkItem, plan: BatchPlan) -> BatchResult:
        loop = asyncio.get_running_loop()
        state = item.state.serialized_output
        stop = _Stop()
        try:
            return await loop.run_in_executor(
                self._thread_pool, self._run_batch, loop, plan.entity_id, state, plan.operations, stop
            )
        except asyncio.CancelledError:  # a stop: the batch's thread runs no more of it, nor its awaited code
            stop.now()
            raise

    def _run_batch(
        self,
        loop: asyncio.AbstractEventLoop,
        entity_id: EntityInstanceId,
        state: str | None,
        operations: Sequence[OperationRequest],
        stop: _Stop,
    ) -> BatchResult:
        entity = self._registry.entities.get(entity_id.entity)
        batch = EntityBatchState(state)
        results: list[OperationResult] = []
        for operation in operations:
            if stop.stopped:  # what it returns now goes nowhere
                break
            saved_state, saved_actions = batch.state, len(batch.actions)
            try:
                with entity_operation_span(entity_id, operation):  # over all that can fail it, its output too
                    if entity is None:
                        raise NotRegisteredError("entity", entity_id.entity)
                    traced = current_trace_context()  # the operation's span, when it has one
                    context = EntityContext(entity_id, operation.operation, batch, self._converter, traced)
                    output = called(self._invoke, entity, context, operation.input)
                    if inspect.isawaitable(output):
                        output = stop.awaiting(asyncio.run_coroutine_threadsafe(awaited(output), loop)).result()
                    results.append(OperationResult(output=self._converter.serialize(output)))
            except Exception as error:  # on a thread of the pool: none is the worker's
                if stop.stopped:  # cancelled by the stop, its outcome unknown: the batch goes back
                    break
                # A caller gets the failure; a signal's sender never hears of it, so the log says it.
                level = logging.WARNING if isinstance(operation, EntityOperationSignaled) else logging.DEBUG
                logger.log(level, "Entity %s: operation %s failed", entity_id, operation.operation, exc_info=True)
                batch.state = saved_state
                del batch.actions[saved_actions:]
                results.append(OperationResult(failure=FailureDetails.from_exception(escaped(error))))
        return BatchResult(batch.state, results, batch.actions)

    def _invoke(self, entity: Any, context: EntityContext, payload: str | None) -> Any:
        if isinstance(entity, type) and issubclass(entity, DurableEntity):
            instance = entity()
            instance._initialize_entity_context(context)
            method = _operation_method(instance, context.operation)
            types = parameter_types(method)
            if not types or (payload is None and not _requires_argument(method)):
                return method()  # as the official SDK: a parameter's default applies when no input came
            return method(self._converter.deserialize(payload, types[0]))
        value = self._converter.deserialize(payload, input_type_of(entity))
        return entity(context, value)


class _Stop:
    """Tells a batch's thread that the worker stopped it, and cancels the operation it awaits on the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stopped = False
        self._awaited: concurrent.futures.Future[Any] | None = None

    def now(self) -> None:
        """Stop the batch (on the loop)."""
        with self._lock:
            self.stopped = True
            if self._awaited is not None:
                self._awaited.cancel()

    def awaiting(self, awaited: concurrent.futures.Future[Any]) -> concurrent.futures.Future[Any]:
        """``awaited``, the operation's code on the loop (on the batch's thread), cancelled if stopped."""
        with self._lock:
            self._awaited = awaited
            if self.stopped:
                awaited.cancel()
        return awaited


_HELPERS = frozenset(
    {"get_state", "set_state", "delete_state", "signal_entity", "schedule_new_orchestration", "entity_context"}
)


def _requires_argument(method: Callable[..., Any]) -> bool:
    """Whether ``method`` has a parameter without a default (``*args`` and ``**kwargs`` aside)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return any(
        parameter.default is inspect.Parameter.empty
        for parameter in inspect.signature(method).parameters.values()
        if parameter.kind not in variadic
    )


def _operation_method(instance: DurableEntity, operation: str) -> Callable[..., Any]:
    """The public method named ``operation`` (case-insensitively); DurableEntity's helpers are not operations."""
    wanted = operation.casefold()
    for name in dir(type(instance)):
        if name.casefold() == wanted and not name.startswith("_") and name not in _HELPERS:
            method = getattr(instance, name)
            if callable(method):
                return method  # type: ignore[no-any-return]
    raise NotImplementedError(f"Entity '{type(instance).__name__}' has no operation '{operation}'.")
