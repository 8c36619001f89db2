"""One program per method of the storage contract (see :mod:`dtfx.backends.base` for what each does).

Writes go through :class:`~dtfx.backends.sql.transaction.HubTransaction`; leases,
queries and reads are written here, a statement or two each. Every program takes the
moment it runs at from the hub's clock (:meth:`Dialect.now`) when it starts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import msgspec

from dtfx.backends.base import NewLease, WorkKind
from dtfx.backends.delivery import work_kind_of
from dtfx.backends.paging import encode_token
from dtfx.backends.sql.program import Dialect, Execute, ExecuteMany, Fetch, Notify, Program
from dtfx.backends.sql.rows import (
    from_micros,
    optional_micros,
    optional_moment,
    state_columns,
    state_from_row,
    to_micros,
)
from dtfx.backends.sql.transaction import HubTransaction, KeptRow
from dtfx.core.apply import unlock_messages
from dtfx.core.errors import OrchestrationAlreadyExistsError, OrchestrationNotFoundError
from dtfx.core.history import TERMINAL_STATUSES, ExecutionStarted, HistoryEvent, TaskScheduled, decode_event
from dtfx.core.instance_ids import is_entity_id
from dtfx.core.state import OrchestrationIdReusePolicy, OrchestrationQuery, OrchestrationState, Page
from dtfx.core.workitems import (
    ActivityResult,
    ActivityTask,
    ActivityWorkItem,
    CommitResult,
    InboxMessage,
    OrchestrationCheckpoint,
    OrchestrationWorkItem,
    OutboundMessage,
)

_TERMINAL = sorted(int(status) for status in TERMINAL_STATUSES)

# -- instances ----------------------------------------------------------------------------------


CreateRequest = tuple[ExecutionStarted, datetime | None, OrchestrationIdReusePolicy | None, NewLease | None]
"""``(start, scheduled_start_at, reuse_policy, lease)``: see :meth:`Backend._create_instance`."""


@dataclass(frozen=True)
class LeasedCreation:
    """A new instance created leased: its work item, and its row as the creation left it (what
    the work item's first commit may assume, :meth:`HubTransaction.assume`)."""

    item: OrchestrationWorkItem
    row: KeptRow


def create_instances(
    dialect: Dialect, requests: Sequence[CreateRequest], *, assume_new: bool = False
) -> Program[list[OrchestrationAlreadyExistsError | LeasedCreation | None]]:
    """Create instances in order, in one transaction; a request refused by the reuse rules gets
    its error and changes nothing, one with a lease gets its instance's :class:`LeasedCreation`.

    ``assume_new``: take it that none of the instances exists yet instead of reading their rows
    (:meth:`HubTransaction.assume_absent`); on PostgreSQL, the creation is then one round trip.
    """
    transaction = HubTransaction(dialect)
    instance_ids = [request[0].instance.instance_id for request in requests]
    if assume_new:
        transaction.assume_absent(set(instance_ids))
    else:
        yield from transaction.load(instance_ids)
    outcomes: list[OrchestrationAlreadyExistsError | LeasedCreation | None] = []
    for start, scheduled_start_at, reuse_policy, lease in requests:
        instance_id = start.instance.instance_id
        existing = transaction.state(instance_id)
        if existing is not None:
            status = existing.runtime_status
            if reuse_policy is None or status not in reuse_policy.replaceable_statuses:
                outcomes.append(OrchestrationAlreadyExistsError(instance_id, status))
                continue
        unlocks: list[OutboundMessage] = []
        if existing is not None and not existing.runtime_status.is_terminal:
            # A live execution replaced never runs again to release its entity locks: released here.
            unlocks = yield from _unlocks_of(instance_id, transaction.now)
        transaction.create(start, scheduled_start_at, lease)
        for unlock in unlocks:
            yield from transaction.deliver(unlock, instance_id)
        outcomes.append(None)
    yield from transaction.flush()
    leased = {
        start.instance.instance_id: (index, start, lease)
        for index, (start, _, _, lease) in enumerate(requests)
        if lease is not None and outcomes[index] is None and transaction.holds(start.instance.instance_id, lease)
    }
    if leased:  # the id of each start in its inbox, which is the only message there
        rows = yield Fetch(
            f"SELECT instance_id, id FROM inbox WHERE {dialect.in_list('instance_id')}",
            (dialect.list_param(sorted(leased)),),
            last=True,
        )
        for instance_id, message_id in rows:
            index, start, lease = leased[instance_id]
            row = transaction.kept[instance_id]
            assert row.next_visible_at is not None  # the start's visible-at time
            item = OrchestrationWorkItem(
                instance_id=instance_id,
                lock_token=lease.lock_token,
                locked_until=lease.locked_until,
                state=row.state,
                messages=[InboxMessage(message_id, start, start.instance.execution_id)],
                history_size=0,
            )
            outcomes[index] = LeasedCreation(item, replace(row, inbox={message_id: row.next_visible_at}))
    return outcomes


def send_events(
    dialect: Dialect, requests: Sequence[tuple[str, HistoryEvent, datetime | None]]
) -> Program[list[OrchestrationNotFoundError | None]]:
    """Deliver events (each ``(instance_id, event, visible_at)``) in order, in one transaction;
    an event for an unknown orchestration gets its error and changes nothing."""
    transaction = HubTransaction(dialect)
    yield from transaction.load(instance_id for instance_id, _, _ in requests)
    outcomes: list[OrchestrationNotFoundError | None] = []
    for instance_id, event, visible_at in requests:
        if transaction.state(instance_id) is None and not is_entity_id(instance_id):
            outcomes.append(OrchestrationNotFoundError(instance_id))
            continue
        yield from transaction.deliver(OutboundMessage(instance_id, event, visible_at=visible_at), "")
        outcomes.append(None)
    yield from transaction.flush()
    return outcomes


def get_instances(dialect: Dialect, requests: Sequence[tuple[str, bool]]) -> Program[list[OrchestrationState | None]]:
    """The states of instances (each ``(instance_id, fetch_payloads)``), read in one statement."""
    payloads = any(fetch_payloads for _, fetch_payloads in requests)
    rows = yield Fetch(
        f"SELECT {state_columns(payloads=payloads)} FROM instances WHERE {dialect.in_list('instance_id')}",
        (dialect.list_param(sorted({instance_id for instance_id, _ in requests})),),
    )
    found = {row[0]: row for row in rows}
    states: list[OrchestrationState | None] = []
    for instance_id, fetch_payloads in requests:
        row = found.get(instance_id)
        state = None if row is None else state_from_row(row)  # each caller gets its own object
        if state is not None and not fetch_payloads:
            state.serialized_input = state.serialized_output = state.serialized_custom_status = None
        states.append(state)
    return states


def _unlocks_of(instance_id: str, now: datetime) -> Program[list[OutboundMessage]]:
    """The unlocks of the critical section the instance's execution is in (none if none)."""
    history = yield from get_history(instance_id)
    return unlock_messages(history, instance_id, now)


def get_history(instance_id: str) -> Program[list[HistoryEvent]]:
    rows = yield Fetch("SELECT event FROM history WHERE instance_id = ? ORDER BY sequence", (instance_id,))
    return [decode_event(row[0]) for row in rows]


_LARGEST_PAGE = 2**62
"""A query's page size as the stores bind it: larger ones (``sys.maxsize``, say) all mean every match."""


def query_instances(
    dialect: Dialect, query: OrchestrationQuery, after: tuple[datetime, str] | None, entities: bool
) -> Program[Page[OrchestrationState]]:
    """One page of instances, after the (created_at, instance_id) of a decoded continuation token."""
    conditions = ["is_entity = ?"]
    params: list[Any] = [int(entities)]
    if after is not None:
        created_at, instance_id = after
        conditions.append("(created_at, instance_id) > (?, ?)")  # a row value: one range of the index
        params += [to_micros(created_at), instance_id]
    if query.runtime_status:
        conditions.append(dialect.in_list("status"))
        params.append(dialect.list_param([int(status) for status in query.runtime_status]))
    for column, operator, moment in (
        ("created_at", ">=", query.created_time_from),
        ("created_at", "<=", query.created_time_to),
        ("completed_at", ">=", query.completed_time_from),
        ("completed_at", "<=", query.completed_time_to),
        ("last_updated_at", ">=", query.last_updated_time_from),
        ("last_updated_at", "<=", query.last_updated_time_to),
    ):
        if moment is not None:
            conditions.append(f"{column} {operator} ?")
            params.append(to_micros(moment))
    if query.instance_id_prefix:
        conditions.append("substr(instance_id, 1, ?) = ?")
        params += [len(query.instance_id_prefix), query.instance_id_prefix]
    params.append(min(query.max_instance_count, _LARGEST_PAGE) + 1)  # bound in a 64-bit integer
    rows = yield Fetch(
        f"SELECT {state_columns(payloads=query.fetch_inputs_and_outputs)} FROM instances"
        f" WHERE {' AND '.join(conditions)} ORDER BY created_at, instance_id LIMIT ?",
        params,
    )
    states = [state_from_row(row) for row in rows]
    if len(states) > query.max_instance_count:
        del states[query.max_instance_count :]
        last = states[-1]
        return Page(states, encode_token(last.created_at, last.instance_id))
    return Page(states, None)


def purge_instances(dialect: Dialect, instance_ids: Collection[str]) -> Program[int]:
    rows = yield Fetch(
        f"SELECT instance_id FROM instances WHERE {dialect.in_list('instance_id')} AND {dialect.in_list('status')}"
        f" ORDER BY instance_id{dialect.for_update}",
        (dialect.list_param(sorted(set(instance_ids))), dialect.list_param(_TERMINAL)),
    )
    doomed = dialect.list_param([row[0] for row in rows])
    if rows:
        for table in ("instances", "history", "inbox", "tasks"):
            yield Execute(f"DELETE FROM {table} WHERE {dialect.in_list('instance_id')}", (doomed,))
    return len(rows)


# -- orchestration work items ----------------------------------------------------------------------


def _name_filter(dialect: Dialect, names: Collection[str] | None, params: list[Any]) -> str:
    """The condition of a lock's ``names`` filter (its parameter appended to ``params``)."""
    if names is None:
        return ""
    params.append(dialect.list_param(sorted(names)))
    return f" AND {dialect.in_list('name')}"


_LOCKED_COLUMNS = f"{state_columns(payloads=True)}, lock_token, history_size"


def lease_prefix(lock_token: str) -> str:
    """How the token of each row that a lock under ``lock_token`` leases begins; the row's key follows."""
    return f"{lock_token}:"


def lock_orchestration_work_items(
    dialect: Dialect,
    max_count: int,
    lease: NewLease,
    entities: bool,
    names: Collection[str] | None,
    max_messages: int,
) -> Program[tuple[list[OrchestrationWorkItem], dict[str, str]]]:
    """Lease up to ``max_count`` instances with visible messages until ``lease.locked_until``,
    each under a token of its own: :func:`lease_prefix` and the instance's id (see
    :func:`give_back_instance_leases`). Also, by instance id, why a message of an instance
    could not be read (its work item then has no message)."""
    now = dialect.now()
    until = lease.locked_until
    now_micros = to_micros(now)
    params: list[Any] = [int(entities), now_micros, now_micros]
    name_filter = _name_filter(dialect, names, params)
    params += [max_count, lease_prefix(lease.lock_token), to_micros(until)]
    # Instances with a visible message and no live lease, most overdue first.
    rows = yield Fetch(
        "WITH picked AS MATERIALIZED (SELECT instance_id FROM instances"
        " WHERE is_entity = ? AND next_visible_at <= ? AND (locked_until IS NULL OR locked_until <= ?)"
        f"{name_filter} ORDER BY next_visible_at LIMIT ?{dialect.skip_locked})"
        " UPDATE instances SET lock_token = ? || instance_id, locked_until = ?"
        f" WHERE {dialect.in_select('instance_id', 'SELECT instance_id FROM picked')} RETURNING {_LOCKED_COLUMNS}",
        params,
    )
    if not rows:
        return [], {}
    messages = yield Fetch(
        "SELECT id, instance_id, execution_id, event, visible_at FROM (SELECT id, instance_id, execution_id, event,"
        " visible_at, row_number() OVER (PARTITION BY instance_id ORDER BY id) AS position FROM inbox"
        f" WHERE {dialect.in_list('instance_id')} AND visible_at <= ?) AS visible"
        " WHERE position <= ? ORDER BY instance_id, id",
        (dialect.list_param([row[0] for row in rows]), now_micros, max_messages),
        last=True,
    )
    inboxes: dict[str, list[InboxMessage]] = {row[0]: [] for row in rows}
    unreadable: dict[str, str] = {}
    for message_id, instance_id, execution_id, event, visible_at in messages:
        if instance_id in unreadable:
            continue
        try:
            message = InboxMessage(message_id, decode_event(event), execution_id, from_micros(visible_at))
            inboxes[instance_id].append(message)
        except msgspec.DecodeError as error:  # written by a newer dtfx, say, or by hand
            unreadable[instance_id] = f"message {message_id}: {error}"
            inboxes[instance_id] = []
    items = [
        OrchestrationWorkItem(
            instance_id=row[0],
            lock_token=row[-2],
            locked_until=until,
            state=state_from_row(row),
            messages=inboxes[row[0]],
            history_size=row[-1],
        )
        for row in rows
    ]
    return items, unreadable  # an empty one is released by release_empty_work_items


def release_empty_work_items(items: Sequence[OrchestrationWorkItem]) -> Program[None]:
    """Give back work items locked without a visible message, whose ``next_visible_at`` was
    wrong (it cannot be while every write keeps it right), and put it right."""
    yield ExecuteMany(
        "UPDATE instances SET lock_token = NULL, locked_until = NULL,"
        " next_visible_at = (SELECT min(visible_at) FROM inbox WHERE inbox.instance_id = instances.instance_id)"
        " WHERE instance_id = ? AND lock_token = ?",
        sorted((item.instance_id, item.lock_token) for item in items),  # rows are locked in id order
    )


def complete_orchestration_work_items(
    dialect: Dialect, checkpoints: Sequence[OrchestrationCheckpoint], kept: KeptRow | None = None
) -> Program[tuple[list[CommitResult], dict[str, KeptRow]]]:
    """Commit the checkpoints; return what happened to each, and the rows of the instances
    whose lease was kept. ``kept``: the row of the (only) checkpoint's instance as the commit
    before left it, taken as it is unless it changed since (:meth:`HubTransaction.assume`)."""
    transaction = HubTransaction(dialect)
    if kept is not None:
        yield from transaction.assume(kept)
    yield from transaction.load(
        [checkpoint.instance_id for checkpoint in checkpoints]
        + [message.instance_id for checkpoint in checkpoints for message in checkpoint.messages],
        consumable=[message_id for checkpoint in checkpoints for message_id in checkpoint.consumed],
    )
    committed: list[bool] = []
    for checkpoint in checkpoints:
        committed.append((yield from transaction.commit(checkpoint)))
    yield from transaction.flush()
    results = [
        CommitResult.LOST
        if not done
        else CommitResult.COMMITTED
        if checkpoint.keep_lease_for is None or checkpoint.instance_id in transaction.released
        else CommitResult.LEASE_KEPT
        for done, checkpoint in zip(committed, checkpoints, strict=True)
    ]
    return results, transaction.kept


def abandon_orchestration_work_item(
    dialect: Dialect, item: OrchestrationWorkItem, retry_at: datetime | None
) -> Program[None]:
    yield Execute(
        "UPDATE instances SET lock_token = NULL, locked_until = ? WHERE instance_id = ? AND lock_token = ?",
        (optional_micros(retry_at), item.instance_id, item.lock_token),
    )
    kind = work_kind_of(item.instance_id)
    delayed = [(kind, retry_at)] if retry_at is not None else []
    yield from dialect.notify(Notify(frozenset([kind]), delayed=delayed))


def give_back_instance_leases(dialect: Dialect, prefix: str, entities: bool) -> Program[None]:
    """Give back the leases of instances (or of entities) whose tokens begin with ``prefix``:
    those that a lock took (:func:`lock_orchestration_work_items`) or that the creation of an
    instance leased to this process's worker took, if it committed, when its caller never
    learned whether it had (:meth:`~dtfx.backends.sql.backend.SqlBackend._give_back_once_possible`).
    A leased instance has a message, so only those are looked at (an index holds them)."""
    yield Execute(
        "UPDATE instances SET lock_token = NULL, locked_until = NULL"
        " WHERE is_entity = ? AND next_visible_at IS NOT NULL AND lock_token LIKE ?",
        (int(entities), f"{prefix}%"),
    )
    yield from dialect.notify(Notify(frozenset([WorkKind.ENTITY if entities else WorkKind.ORCHESTRATION])))


def renew_orchestration_lease(
    dialect: Dialect, item: OrchestrationWorkItem, lock_for: timedelta
) -> Program[datetime | None]:
    """The lease's new expiry, or ``None`` if it was lost."""
    sql = "UPDATE instances SET locked_until = ? WHERE instance_id = ? AND lock_token = ? RETURNING instance_id"
    return (yield from _extend_lease(dialect, sql, (item.instance_id, item.lock_token), lock_for))


def _extend_lease(dialect: Dialect, sql: str, lease: tuple[Any, ...], lock_for: timedelta) -> Program[datetime | None]:
    """Run ``sql`` (parameters: the new expiry, then ``lease``; returning a row if the lease is held)."""
    until = dialect.now() + lock_for
    rows = yield Fetch(sql, (to_micros(until), *lease), last=True)
    return until if rows else None


# -- activity work items ------------------------------------------------------------------------------


def lock_activity_work_items(
    dialect: Dialect, max_count: int, lease: NewLease, names: Collection[str] | None
) -> Program[list[ActivityWorkItem]]:
    """Lease up to ``max_count`` visible activity tasks until ``lease.locked_until``, each under
    a token of its own: :func:`lease_prefix` and the task's id (see
    :func:`give_back_task_leases`)."""
    now = dialect.now()
    until = lease.locked_until
    params: list[Any] = [to_micros(now)]
    name_filter = _name_filter(dialect, names, params)
    params += [max_count, lease_prefix(lease.lock_token), to_micros(until)]
    # A leased task's visible_at is its lease's expiry (see the schema).
    rows = yield Fetch(
        f"WITH picked AS MATERIALIZED (SELECT id FROM tasks WHERE visible_at <= ?{name_filter}"
        f" ORDER BY visible_at, id LIMIT ?{dialect.skip_locked})"
        " UPDATE tasks SET lock_token = ? || CAST(id AS TEXT), visible_at = ?, dequeue_count = dequeue_count + 1"
        f" WHERE {dialect.in_select('id', 'SELECT id FROM picked')}"
        " RETURNING id, lock_token, instance_id, execution_id, event, dequeue_count",
        params,
        last=True,
    )
    items = []
    for task_id, lock_token, instance_id, execution_id, event, dequeue_count in sorted(rows):
        scheduled = decode_event(event)
        assert isinstance(scheduled, TaskScheduled)
        task = ActivityTask(instance_id, execution_id, scheduled)
        items.append(ActivityWorkItem(task_id, lock_token, until, task, dequeue_count))
    return items


def complete_activity_work_items(dialect: Dialect, results: Sequence[ActivityResult]) -> Program[list[bool]]:
    transaction = HubTransaction(dialect)
    tokens = sorted({result.work_item.lock_token for result in results})
    rows = yield from transaction.load(
        (result.work_item.task.instance_id for result in results),
        then=Fetch(
            f"SELECT id, lock_token FROM tasks WHERE {dialect.in_list('lock_token')} ORDER BY id{dialect.for_update}",
            (dialect.list_param(tokens),),
        ),
    )
    leased: dict[str, int] = {lock_token: task_id for task_id, lock_token in rows}
    committed: list[bool] = []
    for result in results:
        item = result.work_item
        task_id = leased.pop(item.lock_token, None)
        if task_id is None or (item.id is not None and int(item.id) != task_id):
            committed.append(False)
            continue
        transaction.delete_task(task_id)
        task = item.task
        yield from transaction.deliver(OutboundMessage(task.instance_id, result.event, task.execution_id), "")
        committed.append(True)
    yield from transaction.flush()
    return committed


def abandon_activity_work_item(dialect: Dialect, item: ActivityWorkItem, retry_at: datetime | None) -> Program[None]:
    visible_at = retry_at or dialect.now()
    yield Execute(
        "UPDATE tasks SET lock_token = NULL, visible_at = ? WHERE lock_token = ?",
        (to_micros(visible_at), item.lock_token),
    )
    delayed = [(WorkKind.ACTIVITY, visible_at)] if retry_at is not None else []
    yield from dialect.notify(Notify(frozenset([WorkKind.ACTIVITY]), delayed=delayed))


def give_back_task_leases(dialect: Dialect, prefix: str) -> Program[None]:
    """Give back the leases of activity tasks whose tokens begin with ``prefix``, which a lock
    took (:func:`lock_activity_work_items`), if it committed: its caller never learned whether
    it had. Nobody ran those tasks, so their dequeue count goes back too. A leased task is
    invisible until its lease ends, so only invisible tasks are looked at (an index holds them)."""
    now = to_micros(dialect.now())
    yield Execute(
        "UPDATE tasks SET lock_token = NULL, visible_at = ?, dequeue_count = dequeue_count - 1"
        " WHERE visible_at > ? AND lock_token LIKE ?",
        (now, now, f"{prefix}%"),
    )
    yield from dialect.notify(Notify(frozenset([WorkKind.ACTIVITY])))


def renew_activity_lease(dialect: Dialect, item: ActivityWorkItem, lock_for: timedelta) -> Program[datetime | None]:
    """The lease's new expiry, or ``None`` if it was lost."""
    sql = "UPDATE tasks SET visible_at = ? WHERE lock_token = ? RETURNING id"
    return (yield from _extend_lease(dialect, sql, (item.lock_token,), lock_for))


# -- waiting --------------------------------------------------------------------------------------------


_LEASES_LOOKED_AT = 1000
"""How many instances with visible messages :func:`next_visible_at` looks at for the end of their lease."""


def next_visible_at(dialect: Dialect, kind: WorkKind) -> Program[datetime | None]:
    """When work of ``kind`` that cannot be leased yet can be.

    Both parts are read through an index, never from every instance that waits: the
    earliest message not visible yet (a lease held past it makes the answer early: the
    dispatcher looks, and asks again), and the earliest end of a lease on an instance whose
    messages are visible (the most overdue ones; polling finds the others).
    """
    now = to_micros(dialect.now())
    if kind is WorkKind.ACTIVITY:  # a leased task's visible_at is its lease's expiry (see the schema)
        rows = yield Fetch("SELECT visible_at FROM tasks WHERE visible_at > ? ORDER BY visible_at LIMIT 1", (now,))
        return optional_moment(rows[0][0]) if rows else None
    entities = int(kind is WorkKind.ENTITY)
    rows = yield Fetch(
        "SELECT (SELECT next_visible_at FROM instances WHERE is_entity = ? AND next_visible_at > ?"
        " ORDER BY next_visible_at LIMIT 1),"
        " (SELECT min(locked_until) FROM (SELECT locked_until FROM instances WHERE is_entity = ?"
        " AND next_visible_at <= ? ORDER BY next_visible_at LIMIT ?) AS ready WHERE locked_until > ?)",
        (entities, now, entities, now, _LEASES_LOOKED_AT, now),
    )
    return optional_moment(min((moment for moment in rows[0] if moment is not None), default=None))


def instance_versions(dialect: Dialect, instance_ids: Sequence[str]) -> Program[dict[str, tuple[int, int]]]:
    """The (status, last-updated time) of those instances that exist: what changes when they do."""
    rows = yield Fetch(
        f"SELECT instance_id, status, last_updated_at FROM instances WHERE {dialect.in_list('instance_id')}",
        (dialect.list_param(instance_ids),),
    )
    return {instance_id: (status, updated) for instance_id, status, updated in rows}
