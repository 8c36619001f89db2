"""The SDK workers connected to the server, and the work items they hold.

A work item travels in three steps:

1. **assigned**: the dispatcher locked it for a connection with a free slot
   (:meth:`WorkerHub.assign`); the slot stays taken until processing ends
   (:meth:`WorkerHub.release`), or moves to another connection when this one
   cannot take it after all (:meth:`WorkerHub.worker_for`).
2. **dispatched**: the runner sent it on the connection's stream under a new
   completion token (:meth:`WorkerHub.dispatch`) and awaits the outcome.
3. **finished**: the worker completed or abandoned it, or its stream closed, or
   the server stopped waiting (:meth:`WorkerHub.finish`). The token is remembered
   for a while, so that a repeated completion is accepted again and a late one is
   told why it no longer counts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from dtfx.backends.base import WorkKind
from dtfx.core.actions import OrchestratorAction
from dtfx.core.entities import BatchResult, OperationRequest
from dtfx.core.history import TaskCompleted, TaskFailed
from dtfx.grpc.connections import WorkerConnection
from dtfx.grpc.protos import pb
from dtfx.grpc.status import failed_precondition, invalid_argument, not_found
from dtfx.worker.orchestrations import Abandon, EpisodeOutcome

logger = logging.getLogger(__name__)

Outcome = EpisodeOutcome | TaskCompleted | TaskFailed | BatchResult | Abandon
"""What a dispatched work item comes back as."""

_KIND_NAMES = {WorkKind.ORCHESTRATION: "orchestration", WorkKind.ACTIVITY: "activity", WorkKind.ENTITY: "entity"}

_KIND_OF_REQUEST = {
    "orchestratorRequest": WorkKind.ORCHESTRATION,
    "activityRequest": WorkKind.ACTIVITY,
    "entityRequest": WorkKind.ENTITY,
    "entityRequestV2": WorkKind.ENTITY,
}


@dataclass(frozen=True)
class EntityBatch:
    """The state an entity batch was sent with, and its operations in the order the worker runs them."""

    state: str | None
    operations: Sequence[OperationRequest]


@dataclass(eq=False)
class DispatchedWorkItem:
    """A work item sent to a worker and not answered yet."""

    token: str
    kind: WorkKind
    connection: WorkerConnection
    instance_id: str
    task_id: int | None
    """The activity's task id (``None`` for orchestrations and entities)."""
    outcome: asyncio.Future[Outcome]
    entity_batch: EntityBatch | None = None
    """What an entity work item sent (``None`` for orchestrations and activities)."""
    partial_actions: dict[int, list[OrchestratorAction]] = field(default_factory=dict)
    """Actions of a chunked orchestrator response, by chunk index, until its last chunk."""
    part_sizes: dict[int, int] = field(default_factory=dict)
    """The size of each chunk of a chunked orchestrator response so far, by chunk index."""


@dataclass(frozen=True)
class _Finished:
    kind: WorkKind
    completed: bool
    reason: str


def _capability_name(value: int) -> str:
    try:
        return str(pb.WorkerCapability.Name(value))
    except ValueError:
        return str(value)


class WorkerHub:
    """Connected workers, their slots, and the completion tokens of what they hold."""

    def __init__(self, *, default_concurrency: int, remembered_tokens: int = 10_000) -> None:
        self._default_concurrency = default_concurrency
        self._remembered_tokens = remembered_tokens
        self._connection_ids = itertools.count(1)
        self._connections: dict[int, WorkerConnection] = {}
        self._assigned_counts = dict.fromkeys(_KIND_NAMES, 0)
        self._assignments: dict[str, tuple[WorkerConnection, WorkKind]] = {}
        self._dispatched: dict[str, DispatchedWorkItem] = {}
        self._finished: OrderedDict[str, _Finished] = OrderedDict()
        self._capacity_listeners: list[Callable[[Collection[WorkKind]], None]] = []

    # -- connections --------------------------------------------------------------------------

    @property
    def connections(self) -> list[WorkerConnection]:
        """The open streams."""
        return list(self._connections.values())

    def connect(self, request: pb.GetWorkItemsRequest) -> WorkerConnection:
        """Register a new ``GetWorkItems`` stream."""
        connection = WorkerConnection(next(self._connection_ids), request, self._default_concurrency)
        self._connections[connection.id] = connection
        logger.info(
            "SDK worker connected (stream %d: %d orchestration(s), %d activity(ies) and %d entity batch(es) at once%s;"
            " capabilities: %s)",
            connection.id,
            connection.free_slots(WorkKind.ORCHESTRATION),
            connection.free_slots(WorkKind.ACTIVITY),
            connection.free_slots(WorkKind.ENTITY),
            ", with work-item filters" if connection.filters.orchestrations is not None else "",
            ", ".join(sorted(_capability_name(value) for value in connection.capabilities)) or "none",
        )
        self._capacity_changed(tuple(WorkKind))
        return connection

    def disconnect(self, connection: WorkerConnection) -> None:
        """Forget a stream that ended; what it held is abandoned, to be dispatched again."""
        if self._connections.pop(connection.id, None) is None:
            return
        connection.closed = True
        held = [self._dispatched[token] for token in connection.pending_tokens if token in self._dispatched]
        for item in held:
            self.finish(item, Abandon(), reason="the stream of the worker that held it closed")
        logger.info("SDK worker disconnected (stream %d); %d work item(s) given back", connection.id, len(held))

    def close_all(self) -> None:
        """End every stream (at shutdown)."""
        for connection in self.connections:
            connection.close()

    def with_free_slots(self, kind: WorkKind) -> list[WorkerConnection]:
        """Connections with a free slot for ``kind``, in turns: each assignment moves the first one on.

        The turn moves with assignments, not calls, so a work item that comes back
        (a worker abandoned it) is offered to the next worker, however many empty
        fetches happen in between.
        """
        ready = [connection for connection in self._connections.values() if connection.free_slots(kind) > 0]
        if ready:
            turn = self._assigned_counts[kind] % len(ready)
            ready = ready[turn:] + ready[:turn]
        return ready

    def on_capacity(self, listener: Callable[[Collection[WorkKind]], None]) -> None:
        """Call ``listener`` with the kinds of work there is more room for, whenever a worker
        connects (every kind) or frees a slot (that slot's kind)."""
        self._capacity_listeners.append(listener)

    def _capacity_changed(self, kinds: Collection[WorkKind]) -> None:
        for listener in self._capacity_listeners:
            listener(kinds)

    # -- assignments ------------------------------------------------------------------------------

    def assign(self, lock_token: str, connection: WorkerConnection, kind: WorkKind) -> None:
        """Take one of the connection's slots for the work item locked under ``lock_token``."""
        connection.take_slot(kind)
        self._assignments[lock_token] = (connection, kind)
        self._assigned_counts[kind] += 1

    def worker_for(self, lock_token: str, name: str, version: str | None) -> WorkerConnection | None:
        """The open connection to send the work item locked under ``lock_token`` to.

        That is the one it was locked for, if its filters accept ``version`` (the lock
        only filtered names); otherwise the slot moves to another connection with a
        free slot that accepts it. ``None`` if there is no such connection.
        """
        assignment = self._assignments.get(lock_token)
        if assignment is None:
            return None
        connection, kind = assignment
        if not connection.closed and connection.filters.accepts(kind, name, version):
            return connection
        for candidate in self.with_free_slots(kind):
            if candidate.filters.accepts(kind, name, version):
                self.release(lock_token)
                self.assign(lock_token, candidate, kind)
                return candidate
        return None

    def release(self, lock_token: str) -> None:
        """Give the work item's slot back (idempotent)."""
        assignment = self._assignments.pop(lock_token, None)
        if assignment is not None:
            connection, kind = assignment
            connection.return_slot(kind)
            if not connection.closed:
                self._capacity_changed((kind,))

    # -- completion tokens ------------------------------------------------------------------------

    def dispatch(
        self,
        connection: WorkerConnection,
        work_item: pb.WorkItem,
        instance_id: str,
        task_id: int | None = None,
        entity_batch: EntityBatch | None = None,
    ) -> DispatchedWorkItem:
        """Send ``work_item`` on the connection's stream under a new completion token."""
        kind = _KIND_OF_REQUEST[str(work_item.WhichOneof("request"))]
        token = uuid.uuid4().hex  # handed to a remote peer: unpredictable, unlike new_token's
        work_item.completionToken = token
        item = DispatchedWorkItem(
            token, kind, connection, instance_id, task_id, asyncio.get_running_loop().create_future(), entity_batch
        )
        self._dispatched[token] = item
        connection.pending_tokens.add(token)
        connection.send(work_item)
        return item

    def lookup(self, token: str, kind: WorkKind, *, completing: bool) -> DispatchedWorkItem | None:
        """The dispatched work item of ``token``, for a Complete (``completing``) or Abandon request.

        Returns ``None`` when the same request was already honoured (a retry, which
        is accepted again). Raises :class:`~dtfx.grpc.status.RpcStatusError` for an
        unknown token, a token of another kind of work item, and a work item that
        has meanwhile finished the other way.
        """
        what = _KIND_NAMES[kind]
        if not token:
            raise invalid_argument("completionToken is required: echo the one the work item came with.")
        item = self._dispatched.get(token)
        finished = self._finished.get(token) if item is None else None
        token_kind = item.kind if item is not None else finished.kind if finished is not None else None
        if token_kind is None:
            raise not_found(f"Unknown completion token {token!r}: no {what} work item is waiting for it.")
        if token_kind is not kind:
            raise invalid_argument(
                f"Completion token {token!r} belongs to an {_KIND_NAMES[token_kind]} work item, not an {what} one."
            )
        if finished is None:
            return item
        if finished.completed == completing:
            return None
        if finished.completed:
            raise failed_precondition(f"The {what} work item of completion token {token!r} was already completed.")
        raise failed_precondition(
            f"The {what} work item of completion token {token!r} was already abandoned ({finished.reason}); "
            "it is dispatched again, and its new token counts instead."
        )

    def finish(self, item: DispatchedWorkItem, outcome: Outcome, *, reason: str = "") -> None:
        """Hand ``outcome`` to whoever awaits the work item, and remember how it ended."""
        if self._dispatched.pop(item.token, None) is None:
            return
        item.connection.pending_tokens.discard(item.token)
        self._finished[item.token] = _Finished(item.kind, not isinstance(outcome, Abandon), reason)
        while len(self._finished) > self._remembered_tokens:
            self._finished.popitem(last=False)
        if not item.outcome.done():
            item.outcome.set_result(outcome)
