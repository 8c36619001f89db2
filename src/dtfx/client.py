"""Clients: start, query and manage orchestration instances.

:class:`AsyncClient` does the work; :class:`Client` is the same API for sync code,
running each call on a private event loop. Method names and signatures follow the
official ``durabletask`` SDK's ``TaskHubGrpcClient``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
import warnings
from collections.abc import Awaitable, Callable, Collection, Coroutine
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any, TypeVar

from dtfx._portal import LoopThread, refuse_to_wait_on_a_workers_loop
from dtfx._tracing import creation_span, current_trace_context, event_span
from dtfx.backends import open_backend
from dtfx.backends.base import Backend
from dtfx.core import arguments
from dtfx.core.apply import (
    created_children,
    failed_children,
    locks_a_rewind_cannot_take_back,
)
from dtfx.core.context import function_name
from dtfx.core.entities import (
    CleanEntityStorageResult,
    EntityInstanceId,
    EntityMetadata,
    EntityQuery,
    decode_scheduler_state,
    entity_id_text,
)
from dtfx.core.errors import (
    OrchestrationAlreadyExistsError,
    OrchestrationNotFoundError,
    OrchestrationStateError,
    OrchestrationTimeoutError,
)
from dtfx.core.history import (
    EntityOperationSignaled,
    EntityUnlockSent,
    EventRaised,
    ExecutionResumed,
    ExecutionRewound,
    ExecutionStarted,
    ExecutionSuspended,
    ExecutionTerminated,
    HistoryEvent,
    OrchestrationInstance,
    OrchestrationStatus,
    TraceContext,
    check_trace_context,
)
from dtfx.core.instance_ids import check_orchestration_id
from dtfx.core.moments import as_utc
from dtfx.core.serialization import DEFAULT_CONVERTER, DataConverter
from dtfx.core.state import (
    TERMINAL_REUSE_POLICY,
    OrchestrationIdReusePolicy,
    OrchestrationQuery,
    OrchestrationState,
    Page,
    PurgeResult,
)
from dtfx.core.tokens import new_token

T = TypeVar("T")

_TERMINAL = sorted(
    (
        OrchestrationStatus.COMPLETED,
        OrchestrationStatus.FAILED,
        OrchestrationStatus.TERMINATED,
        OrchestrationStatus.CANCELED,
    )
)


class AsyncClient:
    """Manage orchestrations from async code.

    Args:
        backend: A backend object or URL (as for :class:`~dtfx.Worker`). A backend
            given as a URL is owned by the client and closed with it; pass the same
            ``MemoryBackend`` object to a worker and a client to share it.
        data_converter: How payloads are (de)serialized.
        default_version: The version given to new orchestrations that name none.
    """

    def __init__(
        self,
        backend: Backend | str | None = None,
        *,
        data_converter: DataConverter | None = None,
        default_version: str | None = None,
    ) -> None:
        self._owns_backend = not isinstance(backend, Backend)
        self._url = None if isinstance(backend, Backend) else backend
        self.backend: Backend = backend if isinstance(backend, Backend) else open_backend(backend)
        self.converter = data_converter or DEFAULT_CONVERTER
        self.default_version = default_version
        self._started = False
        self._closed = False
        self._reopening = threading.Lock()

    async def _ready(self) -> Backend:
        if self._owns_backend and not self._closed and self.backend.opened_in_another_process():
            # This process forked from the one that opened it (gunicorn --preload, say): it opens
            # its own. The other's is left alone: closing it here would close that process's connections.
            with self._reopening:
                if self.backend.opened_in_another_process():  # not already done by a caller on another thread
                    self.backend, self._started = open_backend(self._url), False
        if not self._started:
            await self.backend.start()
            self._started = True
        return self.backend

    async def close(self) -> None:
        """Close the backend if this client opened it (in this process: another's is left to it)."""
        self._closed = True
        if self._owns_backend and not self.backend.opened_in_another_process():
            await self.backend.close()

    def __del__(self) -> None:
        # As an unclosed file or event loop does: the connections stay open until the process ends.
        # (getattr: __init__ may have failed before setting them, on a bad URL say.)
        if getattr(self, "_started", False) and self._owns_backend and not self._closed:
            if self.backend.opened_in_another_process():  # a forked child's copy: the parent's to close
                return
            warnings.warn(
                f"A dtfx client ({type(self.backend).__name__}) was never closed: its connections stay open "
                "until the process ends (make one client per application and close it, or use it in a with block)",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    async def __aenter__(self) -> AsyncClient:
        await self._ready()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- starting -----------------------------------------------------------------------------

    async def schedule_new_orchestration(
        self,
        orchestrator: Callable[..., Any] | str,
        *,
        input: Any = None,
        instance_id: str | None = None,
        start_at: datetime | None = None,
        reuse_id_policy: OrchestrationIdReusePolicy | None = None,
        tags: dict[str, str] | None = None,
        version: str | None = None,
        trace_context: TraceContext | None = None,
    ) -> str:
        """Start a new instance of ``orchestrator`` (a function or a registered name); returns its id.

        If the id is taken, the existing instance is replaced only if its status is in
        ``reuse_id_policy``; otherwise :class:`~dtfx.OrchestrationAlreadyExistsError`
        is raised. ``start_at`` delays the start; the instance is PENDING until then.
        An id no orchestration can have (empty, longer than 1024 characters, with control
        characters, or an entity's ``@name@key``) raises :class:`~dtfx.InvalidInstanceIdError`.
        ``trace_context`` is the W3C trace context (OpenTelemetry's) the execution continues
        (another raises ``ValueError``). Without one, once a tracer provider is set, the
        start is a span of its own (``create_orchestration:<name>``), a child of the current
        span, and the execution continues that. Either is kept with the start for the
        workers, which trace the activities' runs (see the README's "Tracing").
        """
        instance_id = uuid.uuid4().hex if instance_id is None else check_orchestration_id(instance_id)
        check_trace_context(trace_context)
        version, tags = arguments.optional_text("version", version), arguments.tags(tags)
        backend = await self._ready()
        scheduled = as_utc(start_at) if start_at is not None else None
        name = function_name(orchestrator)
        if not name:
            raise ValueError("An orchestration needs the name of its orchestrator; the name given is empty.")
        version = version or self.default_version
        traced = nullcontext(trace_context) if trace_context is not None else creation_span(name, instance_id, version)
        with traced as context:
            start = ExecutionStarted(
                timestamp=self.backend.now(),
                name=name,
                instance=OrchestrationInstance(instance_id=instance_id, execution_id=new_token()),
                version=version,
                input=self.converter.serialize(input),
                scheduled_start_time=scheduled,
                tags=tags,  # a copy: the caller's dict may change after the call
                trace_context=context,
            )
            await backend.create_instance(start, scheduled_start_at=scheduled, reuse_policy=reuse_id_policy)
        return instance_id

    # -- reading ----------------------------------------------------------------------------

    async def get_orchestration_state(
        self, instance_id: str, *, fetch_payloads: bool = True
    ) -> OrchestrationState | None:
        """The instance's state, or ``None`` if there is no such instance."""
        backend = await self._ready()
        return self._with_converter(await backend.get_instance(instance_id, fetch_payloads=fetch_payloads))

    async def get_orchestration_history(self, instance_id: str) -> list[HistoryEvent]:
        """The history events of the instance's current execution."""
        backend = await self._ready()
        if await backend.get_instance(instance_id, fetch_payloads=False) is None:
            raise OrchestrationNotFoundError(instance_id)
        return await backend.get_history(instance_id)

    async def query_orchestrations(
        self, query: OrchestrationQuery | None = None, continuation_token: str | None = None
    ) -> Page[OrchestrationState]:
        """One page of instances matching ``query`` (``max_instance_count`` per page)."""
        backend = await self._ready()
        page = await backend.query_instances(query or OrchestrationQuery(), continuation_token)
        for state in page.items:
            state.converter = self.converter
        return page

    async def get_all_orchestration_states(self, query: OrchestrationQuery | None = None) -> list[OrchestrationState]:
        """Every instance matching ``query``, across all pages."""
        return await _every_page(lambda token: self.query_orchestrations(query, token))

    async def list_instance_ids(
        self,
        runtime_status: Collection[OrchestrationStatus] | None = None,
        completed_time_from: datetime | None = None,
        completed_time_to: datetime | None = None,
        page_size: int | None = None,
        continuation_token: str | None = None,
    ) -> Page[str]:
        """Ids of instances that have ended, one page at a time (of ``runtime_status``, those
        that are ended statuses; the others match nothing, as over gRPC)."""
        statuses = [status for status in (runtime_status or _TERMINAL) if status.is_terminal]
        if not statuses:
            return Page([], None)
        query = OrchestrationQuery(
            runtime_status=statuses,
            completed_time_from=completed_time_from,
            completed_time_to=completed_time_to,
            max_instance_count=page_size or 100,
        )
        page = await self.query_orchestrations(query, continuation_token)
        return Page([state.instance_id for state in page.items], page.continuation_token)

    async def wait_for_orchestration_start(
        self, instance_id: str, *, fetch_payloads: bool = False, timeout: float | timedelta = 60
    ) -> OrchestrationState | None:
        """Wait until the instance has left PENDING; ``None`` if it does not exist.

        Raises :class:`~dtfx.OrchestrationTimeoutError` (a ``TimeoutError``) after ``timeout`` seconds.
        """
        return await self._wait(
            instance_id, lambda status: status != OrchestrationStatus.PENDING, "start", timeout, fetch_payloads
        )

    async def wait_for_orchestration_completion(
        self, instance_id: str, *, fetch_payloads: bool = True, timeout: float | timedelta = 60
    ) -> OrchestrationState | None:
        """Wait until the instance has ended; ``None`` if it does not exist.

        Raises :class:`~dtfx.OrchestrationTimeoutError` (a ``TimeoutError``) after ``timeout`` seconds.
        """
        return await self._wait(instance_id, lambda status: status.is_terminal, "complete", timeout, fetch_payloads)

    async def _wait(
        self,
        instance_id: str,
        until: Callable[[OrchestrationStatus], bool],
        what: str,
        timeout: float | timedelta,
        fetch_payloads: bool,
    ) -> OrchestrationState | None:
        if isinstance(timeout, timedelta):  # as purge_orchestrations_by takes it
            timeout = timeout.total_seconds()
        if not timeout >= 0:  # NaN too, which no clock reaches (math.inf: no timeout, as the sidecar asks)
            raise ValueError(f"timeout must be a number of seconds, at least 0 (got {timeout})")
        backend = await self._ready()
        try:
            state = await backend.wait_for_instance(
                instance_id,
                lambda state: until(state.runtime_status),
                timeout,
                fetch_payloads=fetch_payloads,
                may_satisfy=until,
            )
        except TimeoutError:
            raise OrchestrationTimeoutError(instance_id, what, timeout) from None
        return self._with_converter(state)

    # -- acting ---------------------------------------------------------------------------------

    async def raise_orchestration_event(self, instance_id: str, event_name: str, *, data: Any = None) -> None:
        """Send an external event; it waits in the instance's inbox until the orchestrator asks for it."""
        arguments.text("event_name", event_name)
        event = EventRaised(timestamp=self.backend.now(), name=event_name, input=self.converter.serialize(data))
        with event_span(event_name, instance_id):
            await self._send(instance_id, event)

    async def terminate_orchestration(self, instance_id: str, *, output: Any = None, recursive: bool = True) -> None:
        """End the instance (and, if ``recursive``, its running sub-orchestrations) as TERMINATED."""
        event = ExecutionTerminated(
            timestamp=self.backend.now(),
            input=self.converter.serialize(output),
            recurse=arguments.flag("recursive", recursive),
        )
        await self._send(instance_id, event)

    async def suspend_orchestration(self, instance_id: str, *, reason: str | None = None) -> None:
        """Pause the instance; events that arrive meanwhile are kept for when it resumes."""
        event = ExecutionSuspended(timestamp=self.backend.now(), input=arguments.optional_text("reason", reason))
        await self._send(instance_id, event)

    async def resume_orchestration(self, instance_id: str, *, reason: str | None = None) -> None:
        """Resume a suspended instance."""
        event = ExecutionResumed(timestamp=self.backend.now(), input=arguments.optional_text("reason", reason))
        await self._send(instance_id, event)

    async def rewind_orchestration(self, instance_id: str, *, reason: str | None = None) -> None:
        """Run a FAILED instance again from its last good state: failed activities and
        sub-orchestrations run again; what succeeded is not repeated. An instance that would
        run work again inside a critical section is refused: the section's locks are gone."""
        backend = await self._ready()
        state = await backend.get_instance(check_orchestration_id(instance_id), fetch_payloads=False)
        if state is None:
            raise OrchestrationNotFoundError(instance_id)
        if state.runtime_status != OrchestrationStatus.FAILED:
            raise OrchestrationStateError(instance_id, state.runtime_status, "only failed instances can be rewound.")
        unrewindable = await self._locks_a_rewind_cannot_take_back(backend, instance_id, {instance_id})
        if unrewindable is not None:
            which, released = unrewindable
            who = "it" if which == instance_id else f"its sub-orchestration '{which}', which it rewinds too,"
            raise OrchestrationStateError(
                instance_id,
                state.runtime_status,
                f"a rewind would take {who} back inside a critical section, whose locks on"
                f" {', '.join(released)} are gone (released when it failed); it would go on inside the section"
                " without them. Restart it instead.",
            )
        rewind = ExecutionRewound(timestamp=self.backend.now(), reason=arguments.optional_text("reason", reason))
        await self._send(instance_id, rewind)

    async def _locks_a_rewind_cannot_take_back(
        self, backend: Backend, instance_id: str, seen: set[str]
    ) -> tuple[str, list[str]] | None:
        """The instance (this one, or a failed sub-orchestration its rewind rewinds) that would
        run work again inside a critical section, with the entities the section had locked."""
        history = await backend.get_history(instance_id)
        released = locks_a_rewind_cannot_take_back(history)
        if released:
            return instance_id, released
        for child_id in failed_children(history):
            if child_id in seen:
                continue
            child = await backend.get_instance(child_id, fetch_payloads=False)
            if child is None or child.runtime_status != OrchestrationStatus.FAILED:
                continue
            seen.add(child_id)
            found = await self._locks_a_rewind_cannot_take_back(backend, child_id, seen)
            if found is not None:
                return found
        return None

    async def _send(self, instance_id: str, event: HistoryEvent) -> None:
        """Leave ``event`` in the orchestration's inbox; an entity's id is refused (the entity
        would drop the event), and so is any other id no orchestration can have."""
        await (await self._ready()).send_event(check_orchestration_id(instance_id), event)

    async def restart_orchestration(self, instance_id: str, *, restart_with_new_instance_id: bool = False) -> str:
        """Start an instance again with its original name, input, version and tags; returns the id.

        Under the same id the instance must have ended; under a new one it may be running
        still, as in the .NET SDK.
        """
        check_orchestration_id(instance_id)  # an entity's id, say: restarting it would start no orchestration
        backend = await self._ready()
        state = await backend.get_instance(instance_id)
        if state is None:
            raise OrchestrationNotFoundError(instance_id)
        if not state.runtime_status.is_terminal and not restart_with_new_instance_id:
            raise _not_restartable(instance_id, state.runtime_status)
        new_id = uuid.uuid4().hex if restart_with_new_instance_id else instance_id
        original_input = await self._original_input(state)
        with creation_span(state.name, new_id, state.version) as context:  # a new start: traced as one
            start = ExecutionStarted(
                timestamp=self.backend.now(),
                name=state.name,
                instance=OrchestrationInstance(instance_id=new_id, execution_id=new_token()),
                version=state.version,
                input=original_input,
                tags=state.tags,
                trace_context=context,
            )
            try:
                await backend.create_instance(start, reuse_policy=TERMINAL_REUSE_POLICY)
            except OrchestrationAlreadyExistsError as error:  # another restart came first
                if restart_with_new_instance_id:
                    raise
                raise _not_restartable(instance_id, error.status) from None
        return new_id

    async def _original_input(self, state: OrchestrationState) -> str | None:
        history = await self.backend.get_history(state.instance_id)
        started = next((event for event in history if isinstance(event, ExecutionStarted)), None)
        return started.input if started is not None else state.serialized_input

    async def purge_orchestration(self, instance_id: str, recursive: bool = True) -> PurgeResult:
        """Delete an ended instance and its history (and its sub-orchestrations', if ``recursive``)."""
        backend = await self._ready()
        state = await backend.get_instance(instance_id, fetch_payloads=False)
        if state is None:
            return PurgeResult(0)
        ids = await self._with_children([instance_id]) if recursive else [instance_id]
        return PurgeResult(await backend.purge_instances(ids))

    async def purge_orchestrations_by(
        self,
        created_time_from: datetime | None = None,
        created_time_to: datetime | None = None,
        runtime_status: Collection[OrchestrationStatus] | None = None,
        recursive: bool = False,
        timeout: timedelta | None = None,
    ) -> PurgeResult:
        """Delete every ended instance matching the filter; returns how many were deleted.

        ``timeout`` bounds the time spent; the result's ``is_complete`` says whether
        the purge got through everything.
        """
        backend = await self._ready()
        statuses = [status for status in (runtime_status or _TERMINAL) if status.is_terminal]
        if not statuses:  # only instances that have ended can be purged
            return PurgeResult(0, True)
        query = OrchestrationQuery(
            runtime_status=statuses,
            created_time_from=created_time_from,
            created_time_to=created_time_to,
            max_instance_count=500,
        )
        deadline = None if timeout is None else _deadline(self.backend.now(), timeout)
        deleted = 0
        unpurged: list[str] = []
        while True:
            page = await backend.query_instances(query)
            ids = [state.instance_id for state in page.items]
            if not ids:
                return PurgeResult(deleted, True)
            if ids == unpurged:  # still there, though a purge of them deleted none
                return PurgeResult(deleted, False)
            found = ids
            if recursive:
                ids = await self._with_children(ids)
            removed = await backend.purge_instances(ids)
            deleted += removed
            # None deleted: another caller purged them first, or they changed status meanwhile.
            unpurged = found if removed == 0 else []
            if deadline is not None and self.backend.now() >= deadline:
                left = await backend.query_instances(dataclasses.replace(query, max_instance_count=1))
                return PurgeResult(deleted, not left.items)

    async def _with_children(self, instance_ids: list[str]) -> list[str]:
        """The instances and, transitively, the sub-orchestrations their histories created that
        are still theirs (not refused at their start, nor purged and their ids used again)."""
        found = dict.fromkeys(instance_ids)
        pending = list(instance_ids)
        while pending:
            parent_id = pending.pop()
            for child_id in created_children(await self.backend.get_history(parent_id)):
                if child_id in found:
                    continue
                child = await self.backend.get_instance(child_id, fetch_payloads=False)
                if child is not None and child.parent_instance_id == parent_id:
                    found[child_id] = None
                    pending.append(child_id)
        return list(found)

    # -- entities ---------------------------------------------------------------------------------

    async def signal_entity(
        self,
        entity_instance_id: EntityInstanceId,
        operation_name: str,
        input: Any = None,
        signal_time: datetime | None = None,
        *,
        request_id: str | None = None,
        trace_context: TraceContext | None = None,
    ) -> None:
        """Send an entity an operation (now, or at ``signal_time``); the entity is created if needed.

        ``request_id`` identifies the operation in the entity's work (a new id by
        default); give one to use an id of your own, as SDK clients do over gRPC.
        ``trace_context`` is the W3C trace context the operation's run continues (another
        raises ``ValueError``; by default, once a tracer provider is set, the current span's).
        """
        check_trace_context(trace_context)
        target = entity_id_text(entity_instance_id)
        scheduled = as_utc(signal_time) if signal_time is not None else None
        signal = EntityOperationSignaled(
            timestamp=self.backend.now(),
            request_id=arguments.optional_text("request_id", request_id) or new_token(),
            operation=arguments.text("operation_name", operation_name),
            target_instance_id=target,
            input=self.converter.serialize(input),
            scheduled_time=scheduled,
            trace_context=trace_context or current_trace_context(),
        )
        await (await self._ready()).send_event(target, signal, visible_at=scheduled)

    async def get_entity(
        self, entity_instance_id: EntityInstanceId, include_state: bool = True
    ) -> EntityMetadata | None:
        """The entity's state, last-modified time and lock holder; ``None`` if it has no state and no lock."""
        backend = await self._ready()
        state = await backend.get_instance(entity_id_text(entity_instance_id))
        metadata = EntityMetadata.of(state, include_state=include_state) if state is not None else None
        if metadata is not None:
            metadata.converter = self.converter
        return metadata

    async def query_entities(
        self, query: EntityQuery | None = None, continuation_token: str | None = None
    ) -> Page[EntityMetadata]:
        """One page of entities matching ``query``.

        ``instance_id_starts_with`` may leave out the leading ``@``, and matches entity
        names in any case (``"Counter@"``, ``"@counter@"``); keys match as written
        (``"counter@KeyA"``).
        """
        query = query or EntityQuery()
        prefix = query.instance_id_starts_with
        instances = OrchestrationQuery(
            instance_id_prefix=_entity_id_prefix(prefix) if prefix is not None else None,
            last_updated_time_from=query.last_modified_from,
            last_updated_time_to=query.last_modified_to,
            max_instance_count=query.page_size or 100,
            fetch_inputs_and_outputs=True,
        )
        backend = await self._ready()
        page = await backend.query_instances(instances, continuation_token, entities=True)
        entities = []
        for state in page.items:
            metadata = EntityMetadata.of(
                state, include_state=query.include_state, include_transient=query.include_transient
            )
            if metadata is not None:
                metadata.converter = self.converter
                entities.append(metadata)
        return Page(entities, page.continuation_token)

    async def get_all_entities(self, query: EntityQuery | None = None) -> list[EntityMetadata]:
        """Every entity matching ``query``, across all pages."""
        return await _every_page(lambda token: self.query_entities(query, token))

    async def clean_entity_storage(
        self, remove_empty_entities: bool = True, release_orphaned_locks: bool = True
    ) -> CleanEntityStorageResult:
        """Remove entities that have neither state nor lock, and release locks whose
        orchestration has ended or is gone."""
        backend = await self._ready()
        query = OrchestrationQuery(max_instance_count=500, fetch_inputs_and_outputs=True)
        removed = released = 0
        token: str | None = None
        while True:
            page = await backend.query_instances(query, token, entities=True)
            if remove_empty_entities:
                empty = [s.instance_id for s in page.items if s.runtime_status == OrchestrationStatus.COMPLETED]
                removed += await backend.purge_instances(empty) if empty else 0
            if release_orphaned_locks:
                for state in page.items:
                    released += await self._release_if_orphaned(state)
            token = page.continuation_token
            if token is None:
                return CleanEntityStorageResult(removed, released)

    async def _release_if_orphaned(self, entity: OrchestrationState) -> int:
        lock = decode_scheduler_state(entity.serialized_custom_status).lock
        if lock is None:
            return 0
        owner = await self.backend.get_instance(lock.owner, fetch_payloads=False)
        if owner is not None and not owner.runtime_status.is_terminal:
            return 0
        unlock = EntityUnlockSent(
            timestamp=self.backend.now(),
            critical_section_id=lock.critical_section_id,
            parent_instance_id=lock.owner,
            target_instance_id=entity.instance_id,
        )
        await self.backend.send_event(entity.instance_id, unlock)
        return 1

    def _with_converter(self, state: OrchestrationState | None) -> OrchestrationState | None:
        if state is not None:
            state.converter = self.converter
        return state


def _deadline(now: datetime, timeout: timedelta) -> datetime | None:
    """``now`` plus ``timeout`` (a negative one: ``now``); ``None`` (no limit) past the last datetime."""
    try:
        return now + max(timeout, timedelta(0))
    except OverflowError:
        return None


def _not_restartable(instance_id: str, status: OrchestrationStatus) -> OrchestrationStateError:
    return OrchestrationStateError(instance_id, status, "only ended instances can be restarted under the same id.")


def _entity_id_prefix(starts_with: str) -> str:
    """An entity query's ``instance_id_starts_with`` as a prefix of stored ids (``@name@key``).

    Entity names are stored in lower case, keys as they are: so the name part (up to
    the ``@`` before the key, or all of it if there is none) is lower-cased, and a
    missing leading ``@`` is added, as the official .NET SDK's ``EntityQuery`` does.
    """
    prefix = starts_with if starts_with.startswith("@") else "@" + starts_with
    name_end = prefix.find("@", 1)
    if name_end < 0:
        return prefix.lower()
    return prefix[:name_end].lower() + prefix[name_end:]


async def _every_page(query_page: Callable[[str | None], Awaitable[Page[T]]]) -> list[T]:
    """The items of every page ``query_page`` gives, from the first (token ``None``) to the last."""
    items: list[T] = []
    token: str | None = None
    while True:
        page = await query_page(token)
        items.extend(page.items)
        token = page.continuation_token
        if token is None:
            return items


class Client:
    """The :class:`AsyncClient` API for sync code (each call runs on a private event loop)."""

    def __init__(
        self,
        backend: Backend | str | None = None,
        *,
        data_converter: DataConverter | None = None,
        default_version: str | None = None,
    ) -> None:
        self._async = AsyncClient(backend, data_converter=data_converter, default_version=default_version)
        self._portal = LoopThread("dtfx-client")
        self._pid = os.getpid()
        self._closed = False
        self._forking = threading.Lock()

    @property
    def backend(self) -> Backend:
        """The task hub's backend."""
        return self._async.backend

    def close(self) -> None:
        """Close the backend if this client opened it, and the client's loop; again, nothing."""
        if self._closed:
            return
        self._closed = True
        if self._portal.closed:  # in a process forked from the one that used it, say
            self._async._closed = True  # nothing of it can be closed from here: no warning that it was not
            return
        try:
            self._portal.run(self._async.close())
        finally:
            self._portal.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the client's loop, and return its result."""
        if self._pid != os.getpid() and not self._closed:  # forked: the loop's thread did not come along
            with self._forking:
                if self._pid != os.getpid():  # not already done by a caller on another thread
                    self._portal, self._pid = LoopThread("dtfx-client"), os.getpid()
        return self._portal.run(coroutine)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def schedule_new_orchestration(
        self,
        orchestrator: Callable[..., Any] | str,
        *,
        input: Any = None,
        instance_id: str | None = None,
        start_at: datetime | None = None,
        reuse_id_policy: OrchestrationIdReusePolicy | None = None,
        tags: dict[str, str] | None = None,
        version: str | None = None,
        trace_context: TraceContext | None = None,
    ) -> str:
        """See :meth:`AsyncClient.schedule_new_orchestration`."""
        return self._run(
            self._async.schedule_new_orchestration(
                orchestrator,
                input=input,
                instance_id=instance_id,
                start_at=start_at,
                reuse_id_policy=reuse_id_policy,
                tags=tags,
                version=version,
                trace_context=trace_context,
            )
        )

    def get_orchestration_state(self, instance_id: str, *, fetch_payloads: bool = True) -> OrchestrationState | None:
        """See :meth:`AsyncClient.get_orchestration_state`."""
        return self._run(self._async.get_orchestration_state(instance_id, fetch_payloads=fetch_payloads))

    def get_orchestration_history(self, instance_id: str) -> list[HistoryEvent]:
        """See :meth:`AsyncClient.get_orchestration_history`."""
        return self._run(self._async.get_orchestration_history(instance_id))

    def query_orchestrations(
        self, query: OrchestrationQuery | None = None, continuation_token: str | None = None
    ) -> Page[OrchestrationState]:
        """See :meth:`AsyncClient.query_orchestrations`."""
        return self._run(self._async.query_orchestrations(query, continuation_token))

    def get_all_orchestration_states(self, query: OrchestrationQuery | None = None) -> list[OrchestrationState]:
        """See :meth:`AsyncClient.get_all_orchestration_states`."""
        return self._run(self._async.get_all_orchestration_states(query))

    def list_instance_ids(
        self,
        runtime_status: Collection[OrchestrationStatus] | None = None,
        completed_time_from: datetime | None = None,
        completed_time_to: datetime | None = None,
        page_size: int | None = None,
        continuation_token: str | None = None,
    ) -> Page[str]:
        """See :meth:`AsyncClient.list_instance_ids`."""
        return self._run(
            self._async.list_instance_ids(
                runtime_status, completed_time_from, completed_time_to, page_size, continuation_token
            )
        )

    def wait_for_orchestration_start(
        self, instance_id: str, *, fetch_payloads: bool = False, timeout: float | timedelta = 60
    ) -> OrchestrationState | None:
        """See :meth:`AsyncClient.wait_for_orchestration_start`."""
        refuse_to_wait_on_a_workers_loop("wait for an orchestration")
        return self._run(
            self._async.wait_for_orchestration_start(instance_id, fetch_payloads=fetch_payloads, timeout=timeout)
        )

    def wait_for_orchestration_completion(
        self, instance_id: str, *, fetch_payloads: bool = True, timeout: float | timedelta = 60
    ) -> OrchestrationState | None:
        """See :meth:`AsyncClient.wait_for_orchestration_completion`."""
        refuse_to_wait_on_a_workers_loop("wait for an orchestration")
        return self._run(
            self._async.wait_for_orchestration_completion(instance_id, fetch_payloads=fetch_payloads, timeout=timeout)
        )

    def raise_orchestration_event(self, instance_id: str, event_name: str, *, data: Any = None) -> None:
        """See :meth:`AsyncClient.raise_orchestration_event`."""
        self._run(self._async.raise_orchestration_event(instance_id, event_name, data=data))

    def terminate_orchestration(self, instance_id: str, *, output: Any = None, recursive: bool = True) -> None:
        """See :meth:`AsyncClient.terminate_orchestration`."""
        self._run(self._async.terminate_orchestration(instance_id, output=output, recursive=recursive))

    def suspend_orchestration(self, instance_id: str, *, reason: str | None = None) -> None:
        """See :meth:`AsyncClient.suspend_orchestration`."""
        self._run(self._async.suspend_orchestration(instance_id, reason=reason))

    def resume_orchestration(self, instance_id: str, *, reason: str | None = None) -> None:
        """See :meth:`AsyncClient.resume_orchestration`."""
        self._run(self._async.resume_orchestration(instance_id, reason=reason))

    def rewind_orchestration(self, instance_id: str, *, reason: str | None = None) -> None:
        """See :meth:`AsyncClient.rewind_orchestration`."""
        self._run(self._async.rewind_orchestration(instance_id, reason=reason))

    def restart_orchestration(self, instance_id: str, *, restart_with_new_instance_id: bool = False) -> str:
        """See :meth:`AsyncClient.restart_orchestration`."""
        return self._run(
            self._async.restart_orchestration(instance_id, restart_with_new_instance_id=restart_with_new_instance_id)
        )

    def purge_orchestration(self, instance_id: str, recursive: bool = True) -> PurgeResult:
        """See :meth:`AsyncClient.purge_orchestration`."""
        return self._run(self._async.purge_orchestration(instance_id, recursive))

    def purge_orchestrations_by(
        self,
        created_time_from: datetime | None = None,
        created_time_to: datetime | None = None,
        runtime_status: Collection[OrchestrationStatus] | None = None,
        recursive: bool = False,
        timeout: timedelta | None = None,
    ) -> PurgeResult:
        """See :meth:`AsyncClient.purge_orchestrations_by`."""
        return self._run(
            self._async.purge_orchestrations_by(created_time_from, created_time_to, runtime_status, recursive, timeout)
        )

    def signal_entity(
        self,
        entity_instance_id: EntityInstanceId,
        operation_name: str,
        input: Any = None,
        signal_time: datetime | None = None,
        *,
        request_id: str | None = None,
        trace_context: TraceContext | None = None,
    ) -> None:
        """See :meth:`AsyncClient.signal_entity`."""
        self._run(
            self._async.signal_entity(
                entity_instance_id,
                operation_name,
                input,
                signal_time,
                request_id=request_id,
                trace_context=trace_context,
            )
        )

    def get_entity(self, entity_instance_id: EntityInstanceId, include_state: bool = True) -> EntityMetadata | None:
        """See :meth:`AsyncClient.get_entity`."""
        return self._run(self._async.get_entity(entity_instance_id, include_state))

    def query_entities(
        self, query: EntityQuery | None = None, continuation_token: str | None = None
    ) -> Page[EntityMetadata]:
        """See :meth:`AsyncClient.query_entities`."""
        return self._run(self._async.query_entities(query, continuation_token))

    def get_all_entities(self, query: EntityQuery | None = None) -> list[EntityMetadata]:
        """See :meth:`AsyncClient.get_all_entities`."""
        return self._run(self._async.get_all_entities(query))

    def clean_entity_storage(
        self, remove_empty_entities: bool = True, release_orphaned_locks: bool = True
    ) -> CleanEntityStorageResult:
        """See :meth:`AsyncClient.clean_entity_storage`."""
        return self._run(self._async.clean_entity_storage(remove_empty_entities, release_orphaned_locks))
