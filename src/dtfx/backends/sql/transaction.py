"""A write transaction of a SQL task hub: planned in memory, written set-based.

:class:`HubTransaction` reads the rows of the instances it touches once (locking them,
where the dialect locks rows), with a summary of their inboxes, then applies the
contract's rules to that in-memory picture in order, exactly as the memory backend
applies them to its dicts: lease checks, checkpoints, :mod:`~dtfx.backends.delivery`
routing, creations. Only :meth:`HubTransaction.flush` writes, a handful of set-based
statements whatever the number of checkpoints, so a group commit costs about as much
as a single one; it reads nothing, so a driver can send it with the commit.

Every transaction that writes an instance's inbox first locks the instance's row, so
the inbox summary read after the lock stays true until the commit: each instance's
``next_visible_at`` and the fate of a kept lease are worked out in memory. A commit under
a lease that the commit before kept may instead assume the row as that one left it
(:meth:`HubTransaction.assume`), checked by a statement that ends the transaction if
another writer changed it: on PostgreSQL the writes then go with the commit, one round
trip. Transactions lock instances' rows in one order (by id) and before any activity
task's row, so that two of them never deadlock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dtfx.backends.base import NewLease, WorkKind
from dtfx.backends.delivery import (
    Route,
    brings_the_start_forward,
    checkpointed_state,
    ends_wait,
    new_entity_state,
    new_instance_state,
    refusal,
    route,
    status_on_delivery,
    with_pending_requests,
    work_kind_of,
)
from dtfx.backends.sql.program import (
    Dialect,
    Execute,
    ExecuteMany,
    Expect,
    Fetch,
    FetchEach,
    InsertNew,
    Notify,
    Program,
    Row,
    update_sql,
)
from dtfx.backends.sql.rows import (
    STATE_COLUMNS,
    failure_text,
    optional_micros,
    state_columns,
    state_from_row,
    state_values,
    to_micros,
)
from dtfx.core.history import ExecutionStarted, HistoryEvent, OrchestrationStatus, encode_event
from dtfx.core.state import OrchestrationState
from dtfx.core.workitems import ActivityTask, MessageId, OrchestrationCheckpoint, OutboundMessage

# What flush writes, as (table and) columns: the dialect makes the statements.
_INSTANCE_COLUMNS = (*STATE_COLUMNS, "is_entity", "history_size", "next_visible_at", "lock_token", "locked_until")
"""A whole instance row: :func:`state_values`, the history size, ``next_visible_at`` and the lease."""
_REPLACED_COLUMNS = _INSTANCE_COLUMNS[1:]
"""A row replaced whole (key ``instance_id``): no lease survives it, but the one it is created with."""
_CHECKPOINTED_COLUMNS = (
    "status",
    "execution_id",
    "input",
    "output",
    "custom_status",
    "failure_details",
    "version",
    "completed_at",
    "last_updated_at",
    "history_size",
    "lock_token",
    "locked_until",
    "next_visible_at",
)
"""What a checkpoint changes in its instance's row (key ``instance_id``): see :func:`_checkpointed_values`."""
_STATUS_COLUMNS = ("status", "last_updated_at", "next_visible_at")
"""What a delivery changes in its target's row (key ``instance_id``)."""
_HISTORY_COLUMNS = ("instance_id", "sequence", "event")
_INBOX_COLUMNS = ("instance_id", "execution_id", "visible_at", "event")
_TASK_COLUMNS = ("instance_id", "execution_id", "name", "event", "visible_at", "lock_token", "dequeue_count")
_RECYCLE_TASK = update_sql("tasks", _TASK_COLUMNS[1:], "lock_token")
"""A finished task's row made the next task of the same instance (key: the finished task's token)."""
_INSERT_TASK_UNLESS_THERE = (
    f"INSERT INTO tasks ({', '.join(_TASK_COLUMNS)}) SELECT {', '.join('?' * len(_TASK_COLUMNS))}"
    " WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE lock_token = ?)"
)
"""A task's row, unless a row with its lock token is there already (parameters: the row, then the token)."""
_RECYCLE_OR_INSERT_TASK = (
    f"WITH recycled AS ({_RECYCLE_TASK} RETURNING 1) INSERT INTO tasks ({', '.join(_TASK_COLUMNS)})"
    f" SELECT {', '.join('?' * len(_TASK_COLUMNS))} WHERE NOT EXISTS (SELECT 1 FROM recycled)"
)
"""Both in one statement, where the dialect has :attr:`~Dialect.writes_in_with` (parameters: those
of ``_RECYCLE_TASK``, then the row)."""


@dataclass(frozen=True)
class KeptRow:
    """An instance row as a commit of this process left it, leased to one of its work items:
    what the next commit of that work item may assume instead of reading it (see
    :meth:`HubTransaction.assume`)."""

    state: OrchestrationState
    lock_token: str
    history_size: int
    next_visible_at: int | None
    inbox: Mapping[MessageId, int] = field(default_factory=dict)
    """Its inbox's messages with their visible-at times, where the commit knew them all (a new
    instance's start); otherwise empty, and ``next_visible_at`` sums the inbox up."""


@dataclass
class _Instance:
    """The transaction's picture of one instance row."""

    state: OrchestrationState
    """Without payloads unless this transaction wrote them."""
    lock_token: str | None
    history_size: int
    in_db: bool
    """A row with this id existed when the transaction read it."""
    loaded_status: OrchestrationStatus | None
    next_visible_at: int | None = None
    """The row's ``next_visible_at`` as stored."""
    inbox_rest: int | None = None
    """The earliest visible-at time of its inbox messages other than ``consumable`` (``None``: none)."""
    consumable: dict[MessageId, int] = field(default_factory=dict)
    """The messages of its inbox that the transaction may consume, with their visible-at times."""


@dataclass
class _Writes:
    """What the transaction writes for one instance."""

    new_row: bool = False
    """Write the whole row (created or replaced by this transaction)."""
    checkpointed: bool = False
    status_changed: bool = False
    reset_history: bool = False
    ends_wait: bool = False
    """A delivery ends the wait of the instance if no worker holds it (:func:`~dtfx.backends.delivery.ends_wait`)."""
    start_forward: bool = False
    """Its inbox's messages are visible at once (:func:`~dtfx.backends.delivery.brings_the_start_forward`)."""
    history: list[tuple[int, HistoryEvent]] = field(default_factory=list)
    consumed: list[MessageId] = field(default_factory=list)
    inbox: list[tuple[str | None, datetime, HistoryEvent]] = field(default_factory=list)
    tasks: list[ActivityTask] = field(default_factory=list)


class HubTransaction:
    """The rules of the storage contract over the rows one transaction touches (see the module docstring)."""

    def __init__(self, dialect: Dialect) -> None:
        self.now = dialect.now()
        self._dialect = dialect
        self._instances: dict[str, _Instance | None] = {}
        self._writes: dict[str, _Writes] = {}
        self._wiped: dict[str, None] = {}
        self._deleted_tasks: list[int] = []
        self._finished_tasks: list[str] = []
        self._terminated: list[str] = []
        self._recycled: list[tuple[str, ActivityTask]] = []
        """Finished eager tasks whose rows become the next eager task of the same instance."""
        self._keeping: dict[str, int] = {}  # instance id -> until when its lease is kept, if nothing is ready
        self._new_leases: dict[str, int] = {}  # instance id -> until when the lease it is created with lasts
        self._assumed_absent = False
        """Instances were taken to be absent (:meth:`assume_absent`): their inserts check it."""
        self.released: set[str] = set()
        """After :meth:`flush`: the instances whose kept lease was released (messages were ready)."""
        self.kept: dict[str, KeptRow] = {}
        """After :meth:`flush`: the rows of the instances whose lease was kept, or that were
        created leased, as written."""

    # -- reading -----------------------------------------------------------------------------

    def load(
        self, instance_ids: Iterable[str], consumable: Collection[MessageId] = (), *, then: Fetch | None = None
    ) -> Program[list[Row]]:
        """Read (and lock) the rows of those instances this transaction has not read yet, and
        summarize their inboxes: the ``consumable`` messages (those that checkpoints of this
        transaction may consume) and the earliest visible-at time of the others.

        ``then``, if given, runs after, in the same round trip; its rows are returned. It is
        where a transaction locks rows of other tables (tasks): after the instances', as
        every transaction does, so that two of them never wait for each other.
        """
        missing = sorted({instance_id for instance_id in instance_ids if instance_id not in self._instances})
        fetches = [] if then is None else [then]
        if not missing:
            return (yield FetchEach(fetches))[0] if fetches else []
        dialect = self._dialect
        ids = dialect.list_param(missing)
        # Two statements, the summary after the lock: it must see what the lock waited for.
        rows, inbox, *then_rows = yield FetchEach(
            (
                Fetch(
                    f"SELECT {state_columns(payloads=False)}, lock_token, history_size, next_visible_at"
                    f" FROM instances WHERE {dialect.in_list('instance_id')} ORDER BY instance_id{dialect.for_update}",
                    (ids,),
                ),
                _inbox_summary(dialect, ids, consumable),
                *fetches,
            )
        )
        for instance_id in missing:
            self._instances[instance_id] = None
        for row in rows:
            state = state_from_row(row)
            lock_token, history_size, next_visible_at = row[-3:]
            self._instances[state.instance_id] = _Instance(
                state, lock_token, history_size, True, state.runtime_status, next_visible_at
            )
        for instance_id, message_id, visible_at in inbox:
            instance = self._instances.get(instance_id)
            if instance is None:
                continue
            if message_id is None:
                instance.inbox_rest = visible_at
            else:
                instance.consumable[message_id] = visible_at
        return then_rows[0] if then_rows else []

    def assume(self, row: KeptRow) -> Program[None]:
        """Take (and lock) an instance's row as a commit of this process left it, instead of
        reading it, if the columns that any other writer changes show it unchanged: its
        lease, its history's size, its status and ``next_visible_at`` (every write of its
        inbox keeps that the earliest visible-at time there, so it sums the inbox up too),
        and, where the row's inbox was known message by message, that no other message has
        joined them. If anything changed, the transaction ends with :class:`AssumptionFailed`."""
        dialect = self._dialect
        state = row.state
        yield Expect(
            "SELECT 1 FROM instances WHERE instance_id = ? AND lock_token = ? AND history_size = ? AND status = ?"
            f" AND {dialect.is_same('next_visible_at')}{dialect.for_update}",
            (state.instance_id, row.lock_token, row.history_size, int(state.runtime_status), row.next_visible_at),
        )
        if row.inbox:  # a statement of its own: it sees what the lock above waited for
            yield Expect(
                "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?"
                f" AND NOT {dialect.in_list('id')})",
                (state.instance_id, dialect.list_param(list(row.inbox))),
            )
        self._instances[state.instance_id] = _Instance(
            state,
            row.lock_token,
            row.history_size,
            True,
            state.runtime_status,
            row.next_visible_at,
            inbox_rest=None if row.inbox else row.next_visible_at,
            consumable=dict(row.inbox),
        )

    def assume_absent(self, instance_ids: Collection[str]) -> None:
        """Take it that none of those instances exists, instead of reading their rows: if one
        does (or another transaction creates it meanwhile), the insert of its row finds its
        key taken and the transaction ends with :class:`AssumptionFailed` (:class:`InsertNew`)."""
        for instance_id in instance_ids:
            self._instances[instance_id] = None
        self._assumed_absent = True

    def state(self, instance_id: str) -> OrchestrationState | None:
        """The instance's state as this transaction sees it (it must have been loaded)."""
        instance = self._instances[instance_id]
        return None if instance is None else instance.state

    # -- changing ----------------------------------------------------------------------------

    def create(
        self, start: ExecutionStarted, scheduled_start_at: datetime | None = None, lease: NewLease | None = None
    ) -> None:
        """Create or replace the instance of ``start`` (loaded), leased by ``lease`` if given, and
        put ``start`` in its inbox."""
        instance_id = start.instance.instance_id
        instance = self._replace(new_instance_state(start, self.now, scheduled_start_at))
        if lease is not None:
            instance.lock_token = lease.lock_token
            self._new_leases[instance_id] = to_micros(lease.locked_until)
        self._enqueue(instance_id, start, start.instance.execution_id, scheduled_start_at or self.now)

    def holds(self, instance_id: str, lease: NewLease) -> bool:
        """Whether the instance is leased by ``lease`` as this transaction leaves it."""
        instance = self._instances.get(instance_id)
        return instance is not None and instance.lock_token == lease.lock_token

    def commit(self, checkpoint: OrchestrationCheckpoint) -> Program[bool]:
        """Apply ``checkpoint`` if its instance's lease is still held (it must have been loaded)."""
        instance_id = checkpoint.instance_id
        instance = self._instances[instance_id]
        if instance is None or instance.lock_token != checkpoint.lock_token:
            return False
        instance.state = checkpointed_state(instance.state, checkpoint)
        if checkpoint.keep_lease_for is None:
            instance.lock_token = None
        else:
            self._keeping[instance_id] = to_micros(self.now + checkpoint.keep_lease_for)
        # A chain of eager steps finishes one task and queues the next, both leased: the row is reused.
        leased = (task for task in checkpoint.activity_tasks if task.lock_token is not None)
        recycled = list(zip(checkpoint.finished_tasks, leased, strict=False))  # [] without finished tasks
        self._recycled.extend(recycled)
        self._finished_tasks.extend(checkpoint.finished_tasks[len(recycled) :])
        if checkpoint.status is OrchestrationStatus.TERMINATED:  # its activities not yet begun never will
            self._terminated.append(instance_id)
        writes = self._writes_of(instance_id)
        writes.checkpointed = True
        if checkpoint.replace_history:
            writes.reset_history = True
            writes.history.clear()
        size = checkpoint.history_size_after(instance.history_size)
        for sequence, event in enumerate(checkpoint.new_history, size - len(checkpoint.new_history)):
            writes.history.append((sequence, event))
        instance.history_size = size
        writes.consumed.extend(checkpoint.consumed)
        reused = {id(task) for _, task in recycled} if recycled else ()
        for task in checkpoint.activity_tasks:
            if id(task) not in reused:
                self._writes_of(task.instance_id).tasks.append(task)
        for message in checkpoint.messages:
            yield from self.deliver(message, instance_id)
        return True

    def deliver(self, message: OutboundMessage, sender_id: str) -> Program[None]:
        """Put ``message`` where :func:`~dtfx.backends.delivery.route` says."""
        yield from self.load([message.instance_id])
        target = self._instances[message.instance_id]
        decision = route(message, sender_id, None if target is None else target.state)
        if decision is Route.DROP:
            return
        if decision is Route.REFUSE:
            refused = refusal(message, None if target is None else target.state, self.now)
            if refused is not None:
                yield from self.deliver(refused, message.instance_id)
            return
        if decision is Route.CREATE:
            assert isinstance(message.event, ExecutionStarted)
            self.create(message.event, message.visible_at)
            return
        if decision is Route.CREATE_ENTITY:
            target = self._replace(new_entity_state(message.instance_id, self.now))
        assert target is not None
        status = status_on_delivery(target.state, message.event)
        if status != target.state.runtime_status:
            target.state = dataclasses.replace(target.state, runtime_status=status, last_updated_at=self.now)
            self._writes_of(message.instance_id).status_changed = True
        if ends_wait(message.event):
            self._writes_of(message.instance_id).ends_wait = True
        if brings_the_start_forward(target.state, target.history_size, message.event):
            self._writes_of(message.instance_id).start_forward = True
        self._enqueue(message.instance_id, message.event, message.execution_id, message.visible_at or self.now)

    def delete_task(self, task_id: int) -> None:
        """Delete an activity task (its result is being delivered)."""
        self._deleted_tasks.append(task_id)

    def _replace(self, state: OrchestrationState) -> _Instance:
        """Make ``state`` the instance's new row, dropping its history, inbox and tasks."""
        instance_id = state.instance_id
        previous = self._instances[instance_id]
        in_db = previous is not None and previous.in_db
        if in_db:
            self._wiped[instance_id] = None
        loaded_status = None if previous is None else previous.loaded_status
        # Its inbox starts empty: wiped, or never there.
        instance = self._instances[instance_id] = _Instance(state, None, 0, in_db, loaded_status)
        self._writes[instance_id] = _Writes(new_row=True)
        return instance

    def _enqueue(self, instance_id: str, event: HistoryEvent, execution_id: str | None, visible_at: datetime) -> None:
        self._writes_of(instance_id).inbox.append((execution_id, visible_at, event))

    def _writes_of(self, instance_id: str) -> _Writes:
        writes = self._writes.get(instance_id)
        if writes is None:
            writes = self._writes[instance_id] = _Writes()
        return writes

    # -- writing -----------------------------------------------------------------------------

    def flush(self) -> Program[None]:
        """Write everything planned, then say whom to wake."""
        dialect = self._dialect
        in_list = dialect.in_list
        now = to_micros(self.now)
        if self._deleted_tasks:
            yield Execute(f"DELETE FROM tasks WHERE {in_list('id')}", (dialect.list_param(self._deleted_tasks),))
        if self._finished_tasks:
            finished = dialect.list_param(self._finished_tasks)
            yield Execute(f"DELETE FROM tasks WHERE {in_list('lock_token')}", (finished,))
        if self._terminated:  # the tasks no worker holds: not leased, or their lease (their visible_at) ran out
            terminated = dialect.list_param(self._terminated)
            sql = f"DELETE FROM tasks WHERE {in_list('instance_id')} AND (lock_token IS NULL OR visible_at <= ?)"
            yield Execute(sql, (terminated, now))
        recycled = [(finished, task, _task_row(task, now)) for finished, task in self._recycled]  # rows built once
        if recycled and dialect.writes_in_with:
            yield ExecuteMany(_RECYCLE_OR_INSERT_TASK, [(*row[1:], finished, *row) for finished, _, row in recycled])
        elif recycled:  # then a new row for a finished task whose row was gone (a lease that expired long ago)
            yield ExecuteMany(_RECYCLE_TASK, [(*row[1:], finished) for finished, _, row in recycled])
            yield ExecuteMany(_INSERT_TASK_UNLESS_THERE, [(*row, task.lock_token) for _, task, row in recycled])
        if self._wiped:
            wiped = dialect.list_param(list(self._wiped))
            for table in ("history", "inbox", "tasks"):
                yield Execute(f"DELETE FROM {table} WHERE {in_list('instance_id')}", (wiped,))

        inserted: list[tuple[Any, ...]] = []
        replaced: list[tuple[Any, ...]] = []
        checkpointed: list[tuple[Any, ...]] = []
        updated: list[tuple[Any, ...]] = []
        history_reset: list[str] = []
        waits_ended: list[str] = []
        starts_forward: list[str] = []
        consumed: list[MessageId] = []
        history: list[tuple[Any, ...]] = []
        inbox: list[tuple[Any, ...]] = []
        tasks: list[tuple[Any, ...]] = []
        kinds: set[WorkKind] = set()
        delayed: list[tuple[WorkKind, datetime]] = []
        changed: dict[str, OrchestrationStatus] = {}
        ended: dict[str, OrchestrationState] = {}
        for instance_id, writes in self._writes.items():
            instance = self._instances.get(instance_id)
            if instance is not None:
                next_visible_at = _next_visible_at(instance, writes)
                if next_visible_at is not None:
                    instance.state = with_pending_requests(instance.state)
                state = instance.state
                kept_until = self._keeping.get(instance_id)
                ready = next_visible_at is not None and next_visible_at <= now
                if ready and kept_until is not None:  # messages wait: the lease goes, the queue takes over
                    instance.lock_token = kept_until = None
                    self.released.add(instance_id)
                if ready and instance.lock_token is None:
                    kinds.add(work_kind_of(instance_id))
                if writes.new_row:
                    leased_until = None if instance.lock_token is None else self._new_leases[instance_id]
                    lease = (instance.lock_token, leased_until)
                    values = (*state_values(state), instance.history_size, next_visible_at, *lease)
                    if instance.in_db:
                        replaced.append((*values[1:], instance_id))
                    else:
                        inserted.append(values)
                elif writes.checkpointed:
                    checkpointed.append(_checkpointed_values(instance, kept_until, next_visible_at))
                elif writes.status_changed or next_visible_at != instance.next_visible_at:
                    status = int(state.runtime_status)
                    updated.append((status, to_micros(state.last_updated_at), next_visible_at, instance_id))
                if instance.lock_token is not None and (kept_until is not None or writes.new_row):
                    self.kept[instance_id] = KeptRow(state, instance.lock_token, instance.history_size, next_visible_at)
                if state.runtime_status != instance.loaded_status:
                    changed[instance_id] = state.runtime_status
                    if writes.checkpointed and state.runtime_status.is_terminal:  # a checkpoint writes the payloads
                        ended[instance_id] = state
                if writes.ends_wait and instance.lock_token is None and not writes.new_row:
                    waits_ended.append(instance_id)
                if writes.start_forward:
                    starts_forward.append(instance_id)
            if writes.reset_history:
                history_reset.append(instance_id)
            consumed.extend(writes.consumed)
            history.extend((instance_id, sequence, encode_event(event).decode()) for sequence, event in writes.history)
            inbox.extend(
                (instance_id, execution_id, to_micros(visible_at), encode_event(event).decode())
                for execution_id, visible_at, event in writes.inbox
            )
            delayed.extend(
                (work_kind_of(instance_id), visible_at) for _, visible_at, _ in writes.inbox if visible_at > self.now
            )
            for task in writes.tasks:
                tasks.append(_task_row(task, now))
                if task.lock_token is None:
                    kinds.add(WorkKind.ACTIVITY)

        # Instance rows are changed only once load() has locked them (by id). Rows go in in
        # the order planned, so inbox messages are numbered in the order they were sent.
        if inserted:
            insert = dialect.insert_rows("instances", _INSTANCE_COLUMNS, inserted)
            yield InsertNew(insert) if self._assumed_absent else insert
        if replaced:
            yield dialect.update_rows("instances", _REPLACED_COLUMNS, "instance_id", replaced)
        if checkpointed:
            yield dialect.update_rows("instances", _CHECKPOINTED_COLUMNS, "instance_id", checkpointed)
        if updated:
            yield dialect.update_rows("instances", _STATUS_COLUMNS, "instance_id", updated)
        if waits_ended:  # the back-off or deferral of a work item given back with a retry_at
            sql = f"UPDATE instances SET locked_until = NULL WHERE {in_list('instance_id')} AND lock_token IS NULL"
            yield Execute(sql, (dialect.list_param(waits_ended),))
        if starts_forward:
            sql = f"UPDATE inbox SET visible_at = ? WHERE {in_list('instance_id')} AND visible_at > ?"
            yield Execute(sql, (to_micros(self.now), dialect.list_param(starts_forward), to_micros(self.now)))
        if history_reset:
            yield Execute(f"DELETE FROM history WHERE {in_list('instance_id')}", (dialect.list_param(history_reset),))
        if consumed:
            yield Execute(f"DELETE FROM inbox WHERE {in_list('id')}", (dialect.list_param(consumed),))
        if history:
            yield dialect.insert_rows("history", _HISTORY_COLUMNS, history)
        if inbox:
            yield dialect.insert_rows("inbox", _INBOX_COLUMNS, inbox)
        if tasks:
            yield dialect.insert_rows("tasks", _TASK_COLUMNS, tasks)
        if kinds or changed or delayed:
            yield from dialect.notify(Notify(frozenset(kinds), changed, delayed=delayed, ended=ended))


def _task_row(task: ActivityTask, now: int) -> tuple[Any, ...]:
    """The values of ``_TASK_COLUMNS`` for a task queued at ``now`` (microseconds); a leased one is
    visible when its lease ends."""
    visible_at = to_micros(task.locked_until) if task.locked_until is not None else now
    event = encode_event(task.event).decode()
    leased = task.lock_token is not None
    return (task.instance_id, task.execution_id, task.event.name, event, visible_at, task.lock_token, int(leased))


def _inbox_summary(dialect: Dialect, ids: Any, consumable: Collection[MessageId]) -> Fetch:
    """The rows :meth:`HubTransaction.load` reads an inbox summary from: ``(instance id, NULL,
    earliest visible-at time of its other messages)`` for each instance of ``ids`` (a list
    parameter), and ``(instance id, message id, visible-at time)`` for each ``consumable`` message."""
    in_list = dialect.in_list
    earliest = "SELECT visible_at FROM inbox WHERE inbox.instance_id = instances.instance_id"
    if not consumable:  # the common case of a step that consumed nothing from the inbox (an eager one)
        return Fetch(
            f"SELECT instance_id, NULL, ({earliest} ORDER BY visible_at LIMIT 1)"
            f" FROM instances WHERE {in_list('instance_id')}",
            (ids,),
        )
    consumable_ids = dialect.list_param(list(consumable))
    return Fetch(
        f"SELECT instance_id, NULL, ({earliest} AND NOT {in_list('id')} ORDER BY visible_at LIMIT 1)"
        f" FROM instances WHERE {in_list('instance_id')}"
        f" UNION ALL SELECT instance_id, id, visible_at FROM inbox WHERE {in_list('id')}",
        (consumable_ids, ids, consumable_ids),
    )


def _next_visible_at(instance: _Instance, writes: _Writes) -> int | None:
    """The earliest visible-at time in the instance's inbox once the transaction is written."""
    times = [to_micros(visible_at) for _, visible_at, _ in writes.inbox]
    if instance.inbox_rest is not None:
        times.append(instance.inbox_rest)
    if instance.consumable:
        deleted = set(writes.consumed)
        times.extend(time for message_id, time in instance.consumable.items() if message_id not in deleted)
    return min(times, default=None)


def _checkpointed_values(instance: _Instance, kept_until: int | None, next_visible_at: int | None) -> tuple[Any, ...]:
    """The values of ``_CHECKPOINTED_COLUMNS``, then the key (``kept_until``: the lease is kept until then)."""
    state = instance.state
    return (
        int(state.runtime_status),
        state.execution_id,
        state.serialized_input,
        state.serialized_output,
        state.serialized_custom_status,
        failure_text(state.failure_details),
        state.version,
        optional_micros(state.completed_at),
        to_micros(state.last_updated_at),
        instance.history_size,
        instance.lock_token if kept_until is not None else None,
        kept_until,
        next_visible_at,
        state.instance_id,
    )
