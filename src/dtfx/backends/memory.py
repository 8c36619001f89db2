"""The in-memory backend: the whole storage contract in a few dicts.

For tests (yours and ours) and for trying things out; nothing survives the process.
Share one ``MemoryBackend`` object between a worker and a client to use it.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from dtfx.backends.base import Backend, NewLease, WorkKind
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
from dtfx.backends.paging import decode_token, encode_token
from dtfx.core.apply import unlock_messages
from dtfx.core.errors import OrchestrationAlreadyExistsError, OrchestrationNotFoundError
from dtfx.core.history import ExecutionStarted, HistoryEvent, OrchestrationStatus
from dtfx.core.instance_ids import is_entity_id
from dtfx.core.state import OrchestrationIdReusePolicy, OrchestrationQuery, OrchestrationState, Page
from dtfx.core.tokens import new_token
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


@dataclass
class _Message:
    id: int
    event: HistoryEvent
    execution_id: str | None
    visible_at: datetime


@dataclass
class _Instance:
    state: OrchestrationState
    history: list[HistoryEvent] = field(default_factory=list)
    history_size: int = 0
    """What work items carry as their history's size (see ``OrchestrationCheckpoint.history_size_after``)."""
    inbox: list[_Message] = field(default_factory=list)
    lock_token: str | None = None
    locked_until: datetime | None = None


@dataclass
class _Task:
    id: int
    task: ActivityTask
    visible_at: datetime
    lock_token: str | None = None
    locked_until: datetime | None = None
    dequeue_count: int = 0


class MemoryBackend(Backend):
    """Keeps a task hub in this process's memory."""

    poll_interval = 5.0  # every change goes through this object, so waiters are woken anyway

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._instances: dict[str, _Instance] = {}
        self._tasks: dict[int, _Task] = {}
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        """``memory://``."""
        return "memory://"

    # -- instances ------------------------------------------------------------------------

    async def _create_instance(
        self,
        start: ExecutionStarted,
        scheduled_start_at: datetime | None,
        reuse_policy: OrchestrationIdReusePolicy | None,
        lease: NewLease | None,
    ) -> OrchestrationWorkItem | None:
        instance_id = start.instance.instance_id
        now = self.now()
        item = None
        with self._lock:
            existing = self._instances.get(instance_id)
            unlocks = []
            woken: set[WorkKind] = set() if lease is not None else {WorkKind.ORCHESTRATION}
            if existing is not None:
                status = existing.state.runtime_status
                if reuse_policy is None or status not in reuse_policy.replaceable_statuses:
                    raise OrchestrationAlreadyExistsError(instance_id, status)
                if not status.is_terminal:  # it never runs again to release its entity locks: released here
                    unlocks = unlock_messages(existing.history, instance_id, now)
            instance = self._create(start, now, scheduled_start_at)
            for unlock in unlocks:
                self._deliver(unlock, instance_id, now, woken)
            if lease is not None:
                instance.lock_token, instance.locked_until = lease.lock_token, lease.locked_until
                item = _work_item(instance, instance.inbox)
        self._notify_work(*woken)
        self._notify_instance(instance_id, OrchestrationStatus.PENDING)
        return item

    def _create(
        self,
        start: ExecutionStarted,
        now: datetime,
        scheduled_start_at: datetime | None = None,
        woken: set[WorkKind] | None = None,
    ) -> _Instance:
        instance_id = start.instance.instance_id
        self._drop_tasks_of(instance_id)
        instance = _Instance(new_instance_state(start, now, scheduled_start_at))
        self._instances[instance_id] = instance
        self._enqueue(instance, start, start.instance.execution_id, scheduled_start_at or now, now, woken)
        return instance

    def _drop_tasks_of(self, instance_id: str) -> None:
        for task_id in [key for key, task in self._tasks.items() if task.task.instance_id == instance_id]:
            del self._tasks[task_id]

    def _enqueue(
        self,
        instance: _Instance,
        event: HistoryEvent,
        execution_id: str | None,
        visible_at: datetime,
        now: datetime,
        woken: set[WorkKind] | None = None,
    ) -> None:
        instance.inbox.append(_Message(next(self._ids), event, execution_id, visible_at))
        kind = work_kind_of(instance.state.instance_id)
        if visible_at > now:
            self._note_delayed(kind, visible_at)
        elif woken is not None:
            woken.add(kind)

    async def send_event(self, instance_id: str, event: HistoryEvent, *, visible_at: datetime | None = None) -> None:
        now = self.now()
        with self._lock:
            instance = self._instances.get(instance_id)
            if instance is None and not is_entity_id(instance_id):
                raise OrchestrationNotFoundError(instance_id)
            self._deliver(OutboundMessage(instance_id, event, visible_at=visible_at), "", now)
            left = self._left_of(instance_id)
        self._notify_work(work_kind_of(instance_id))
        self._notify_instance(instance_id, left)  # its status may have changed (a rewind)

    async def get_instance(self, instance_id: str, *, fetch_payloads: bool = True) -> OrchestrationState | None:
        with self._lock:
            instance = self._instances.get(instance_id)
            return None if instance is None else _snapshot(instance.state, fetch_payloads)

    async def get_history(self, instance_id: str) -> list[HistoryEvent]:
        with self._lock:
            instance = self._instances.get(instance_id)
            return [] if instance is None else list(instance.history)

    async def query_instances(
        self, query: OrchestrationQuery, continuation_token: str | None = None, *, entities: bool = False
    ) -> Page[OrchestrationState]:
        after = decode_token(continuation_token) if continuation_token else None
        with self._lock:
            matches = sorted(
                (i.state for i in self._instances.values() if is_entity_id(i.state.instance_id) == entities),
                key=lambda state: (state.created_at, state.instance_id),
            )
            selected: list[OrchestrationState] = []
            for state in matches:
                if after is not None and (state.created_at, state.instance_id) <= after:
                    continue
                if _matches(state, query):
                    selected.append(_snapshot(state, query.fetch_inputs_and_outputs))
                    if len(selected) > query.max_instance_count:
                        break
        if len(selected) > query.max_instance_count:
            del selected[query.max_instance_count :]
            last = selected[-1]
            return Page(selected, encode_token(last.created_at, last.instance_id))
        return Page(selected, None)

    async def purge_instances(self, instance_ids: Collection[str]) -> int:
        deleted = 0
        with self._lock:
            for instance_id in instance_ids:
                instance = self._instances.get(instance_id)
                if instance is not None and instance.state.runtime_status.is_terminal:
                    del self._instances[instance_id]
                    self._drop_tasks_of(instance_id)
                    deleted += 1
        return deleted

    # -- orchestration work items -------------------------------------------------------------

    async def lock_orchestration_work_items(
        self,
        max_count: int,
        lock_for: timedelta,
        *,
        entities: bool = False,
        names: Collection[str] | None = None,
    ) -> list[OrchestrationWorkItem]:
        now = self.now()
        items: list[OrchestrationWorkItem] = []
        with self._lock:
            for instance_id, instance in self._instances.items():
                if len(items) >= max_count:
                    break
                if is_entity_id(instance_id) != entities or not instance.inbox:
                    continue
                if names is not None and instance.state.name not in names:
                    continue
                if instance.locked_until is not None and instance.locked_until > now:
                    continue
                visible = [m for m in instance.inbox if m.visible_at <= now][: self.max_messages_per_work_item]
                if not visible:
                    continue
                instance.lock_token = new_token()
                instance.locked_until = now + lock_for
                items.append(_work_item(instance, visible))
        return items

    blocking_commits = True

    async def complete_orchestration_work_items(
        self, checkpoints: Sequence[OrchestrationCheckpoint]
    ) -> list[CommitResult]:
        return self._complete_orchestration_work_items(checkpoints)

    def complete_orchestration_work_items_blocking(
        self, checkpoints: Sequence[OrchestrationCheckpoint]
    ) -> list[CommitResult]:
        return self._complete_orchestration_work_items(checkpoints)

    def _complete_orchestration_work_items(self, checkpoints: Sequence[OrchestrationCheckpoint]) -> list[CommitResult]:
        now = self.now()
        results: list[CommitResult] = []
        changed: list[str] = []
        woken: set[WorkKind] = set()
        with self._lock:
            for checkpoint in checkpoints:
                instance = self._instances.get(checkpoint.instance_id)
                if instance is None or instance.lock_token != checkpoint.lock_token:
                    results.append(CommitResult.LOST)
                    continue
                status = instance.state.runtime_status
                results.append(self._commit(instance, checkpoint, now, woken))
                if instance.state.runtime_status != status:  # waiters wait for statuses
                    changed.append(checkpoint.instance_id)
                changed.extend(message.instance_id for message in checkpoint.messages)
            left = {instance_id: self._left_of(instance_id) for instance_id in changed}
        self._notify_work(*woken)
        for instance_id, hint in left.items():
            self._notify_instance(instance_id, hint)
        return results

    def _left_of(self, instance_id: str) -> OrchestrationStatus | OrchestrationState | None:
        """What a commit left of an instance, for its waiters: its status, or its state once ended."""
        instance = self._instances.get(instance_id)
        if instance is None:
            return None
        state = instance.state
        return _snapshot(state, fetch_payloads=True) if state.runtime_status.is_terminal else state.runtime_status

    def _commit(
        self, instance: _Instance, checkpoint: OrchestrationCheckpoint, now: datetime, woken: set[WorkKind]
    ) -> CommitResult:
        if checkpoint.replace_history:
            instance.history = list(checkpoint.new_history)
        else:
            instance.history.extend(checkpoint.new_history)
        instance.history_size = checkpoint.history_size_after(instance.history_size)
        instance.state = checkpointed_state(instance.state, checkpoint)
        consumed = set(checkpoint.consumed)
        instance.inbox = [m for m in instance.inbox if m.id not in consumed]
        if instance.inbox:
            instance.state = with_pending_requests(instance.state)
        finished = set(checkpoint.finished_tasks)
        if finished:
            for task_id in [key for key, task in self._tasks.items() if task.lock_token in finished]:
                del self._tasks[task_id]
        if checkpoint.status is OrchestrationStatus.TERMINATED:  # its activities not yet begun never will
            for task_id, queued in list(self._tasks.items()):
                held = queued.lock_token is not None and queued.locked_until is not None and queued.locked_until > now
                if queued.task.instance_id == checkpoint.instance_id and not held:
                    del self._tasks[task_id]
        for task in checkpoint.activity_tasks:
            task_id = next(self._ids)
            if task.lock_token is None:
                self._tasks[task_id] = _Task(task_id, task, now)
                woken.add(WorkKind.ACTIVITY)
            else:
                self._tasks[task_id] = _Task(task_id, task, now, task.lock_token, task.locked_until, dequeue_count=1)
        for message in checkpoint.messages:
            self._deliver(message, checkpoint.instance_id, now, woken)
        ready = any(message.visible_at <= now for message in instance.inbox)
        if checkpoint.keep_lease_for is not None and not ready:
            instance.locked_until = now + checkpoint.keep_lease_for
            return CommitResult.LEASE_KEPT
        instance.lock_token = instance.locked_until = None
        if ready:
            woken.add(work_kind_of(checkpoint.instance_id))
        return CommitResult.COMMITTED

    def _deliver(
        self, message: OutboundMessage, sender_id: str, now: datetime, woken: set[WorkKind] | None = None
    ) -> None:
        target = self._instances.get(message.instance_id)
        decision = route(message, sender_id, target.state if target else None)
        if decision is Route.DROP:
            return
        if decision is Route.REFUSE:
            refused = refusal(message, None if target is None else target.state, now)
            if refused is not None:
                self._deliver(refused, message.instance_id, now, woken)
            return
        if decision is Route.CREATE:
            assert isinstance(message.event, ExecutionStarted)
            self._create(message.event, now, message.visible_at, woken)
            return
        if decision is Route.CREATE_ENTITY:
            target = _Instance(new_entity_state(message.instance_id, now))
            self._instances[message.instance_id] = target
        assert target is not None
        status = status_on_delivery(target.state, message.event)
        if status != target.state.runtime_status:
            target.state = dataclasses.replace(target.state, runtime_status=status, last_updated_at=now)
        if target.lock_token is None and ends_wait(message.event):
            target.locked_until = None
        if brings_the_start_forward(target.state, len(target.history), message.event):
            for waiting in target.inbox:
                waiting.visible_at = min(waiting.visible_at, now)
        self._enqueue(target, message.event, message.execution_id, message.visible_at or now, now, woken)

    async def abandon_orchestration_work_item(
        self, item: OrchestrationWorkItem, *, retry_at: datetime | None = None
    ) -> None:
        with self._lock:
            instance = self._instances.get(item.instance_id)
            if instance is not None and instance.lock_token == item.lock_token:
                instance.lock_token = None
                instance.locked_until = retry_at
        if retry_at is not None:
            self._note_delayed(work_kind_of(item.instance_id), retry_at)
        self._notify_work(work_kind_of(item.instance_id))

    async def renew_orchestration_lease(self, item: OrchestrationWorkItem, lock_for: timedelta) -> bool:
        with self._lock:
            instance = self._instances.get(item.instance_id)
            if instance is None or instance.lock_token != item.lock_token:
                return False
            instance.locked_until = item.locked_until = self.now() + lock_for
            return True

    # -- activity work items -------------------------------------------------------------------

    async def lock_activity_work_items(
        self, max_count: int, lock_for: timedelta, *, names: Collection[str] | None = None
    ) -> list[ActivityWorkItem]:
        now = self.now()
        items: list[ActivityWorkItem] = []
        with self._lock:
            for task in self._tasks.values():
                if len(items) >= max_count:
                    break
                if task.visible_at > now or (task.locked_until is not None and task.locked_until > now):
                    continue
                if names is not None and task.task.event.name not in names:
                    continue
                task.lock_token = new_token()
                task.locked_until = now + lock_for
                task.dequeue_count += 1
                items.append(
                    ActivityWorkItem(task.id, task.lock_token, task.locked_until, task.task, task.dequeue_count)
                )
        return items

    async def complete_activity_work_items(self, results: Sequence[ActivityResult]) -> list[bool]:
        now = self.now()
        committed: list[bool] = []
        woken: set[WorkKind] = set()
        with self._lock:
            for result in results:
                task = self._leased_task(result.work_item)
                if task is None:
                    committed.append(False)
                    continue
                del self._tasks[task.id]
                message = OutboundMessage(task.task.instance_id, result.event, task.task.execution_id)
                self._deliver(message, "", now, woken)
                committed.append(True)
        self._notify_work(*woken)
        return committed

    async def abandon_activity_work_item(self, item: ActivityWorkItem, *, retry_at: datetime | None = None) -> None:
        with self._lock:
            task = self._leased_task(item)
            if task is not None:
                task.lock_token = task.locked_until = None
                task.visible_at = retry_at or self.now()
        if retry_at is not None:
            self._note_delayed(WorkKind.ACTIVITY, retry_at)
        self._notify_work(WorkKind.ACTIVITY)

    async def renew_activity_lease(self, item: ActivityWorkItem, lock_for: timedelta) -> bool:
        with self._lock:
            task = self._leased_task(item)
            if task is None:
                return False
            task.locked_until = item.locked_until = self.now() + lock_for
            return True

    def _leased_task(self, item: ActivityWorkItem) -> _Task | None:
        """The task if it is still leased with the item's token."""
        if item.id is None:
            return next((task for task in self._tasks.values() if task.lock_token == item.lock_token), None)
        task = self._tasks.get(int(item.id))
        return task if task is not None and task.lock_token == item.lock_token else None

    # -- waiting ------------------------------------------------------------------------------

    async def next_visible_at(self, kind: WorkKind) -> datetime | None:
        now = self.now()
        with self._lock:
            if kind is WorkKind.ACTIVITY:
                moments: Iterator[datetime] = (t.visible_at for t in self._tasks.values() if t.visible_at > now)
            else:
                entities = kind is WorkKind.ENTITY
                moments = itertools.chain.from_iterable(
                    (
                        [m.visible_at for m in i.inbox if m.visible_at > now]
                        + ([i.locked_until] if i.locked_until and i.locked_until > now and i.inbox else [])
                    )
                    for instance_id, i in self._instances.items()
                    if is_entity_id(instance_id) == entities
                )
            return min(moments, default=None)


def _work_item(instance: _Instance, messages: Sequence[_Message]) -> OrchestrationWorkItem:
    """The work item of a leased instance, with ``messages`` from its inbox."""
    assert instance.lock_token is not None and instance.locked_until is not None
    return OrchestrationWorkItem(
        instance_id=instance.state.instance_id,
        lock_token=instance.lock_token,
        locked_until=instance.locked_until,
        state=_snapshot(instance.state, True),
        messages=[InboxMessage(m.id, m.event, m.execution_id, m.visible_at) for m in messages],
        history_size=instance.history_size,
    )


def _snapshot(state: OrchestrationState, fetch_payloads: bool) -> OrchestrationState:
    """A copy of a stored state for a caller, who may change it (its tags too)."""
    tags = dict(state.tags) if state.tags is not None else None
    if fetch_payloads:
        return dataclasses.replace(state, tags=tags)
    return dataclasses.replace(
        state, tags=tags, serialized_input=None, serialized_output=None, serialized_custom_status=None
    )


def _matches(state: OrchestrationState, query: OrchestrationQuery) -> bool:
    ranges = (
        (state.created_at, query.created_time_from, query.created_time_to),
        (state.completed_at, query.completed_time_from, query.completed_time_to),
        (state.last_updated_at, query.last_updated_time_from, query.last_updated_time_to),
    )
    for moment, start, end in ranges:
        if (start or end) and moment is None:
            return False
        if (start and moment < start) or (end and moment > end):  # type: ignore[operator]
            return False
    if query.runtime_status and state.runtime_status not in query.runtime_status:
        return False
    return not (query.instance_id_prefix and not state.instance_id.startswith(query.instance_id_prefix))
