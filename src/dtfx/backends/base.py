"""The storage contract every backend implements.

A backend stores, per task hub:

* **instances**: one row per orchestration (or entity) instance, with its status,
  payloads, timestamps and a *lease* (lock token + expiry);
* **history**: the events of each instance's current execution, in order;
* an **inbox** per instance: events waiting to be processed, each with a
  visible-at time (timers and scheduled starts are inbox messages that become
  visible later);
* an **activity queue**: scheduled activities, each with its own lease.

Work is handed out as leased work items. Completing a work item is one transaction
that checks the lease first, so a worker that lost its lease (it stalled, its
lease expired, another worker took the instance) changes nothing: there is no
split brain. Several work items can be locked in one call and completed in one
transaction (group commit).

Delivery rules shared by every backend live in :mod:`dtfx.backends.delivery`;
the contract suite in ``tests/backends`` checks every rule on every backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import heapq
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import ClassVar, Protocol

from dtfx.backends.clock import utc_now
from dtfx.backends.signals import KeyedSignal, Signal, Waiter
from dtfx.core.history import ExecutionStarted, HistoryEvent, OrchestrationStatus
from dtfx.core.instance_ids import is_entity_id
from dtfx.core.state import OrchestrationIdReusePolicy, OrchestrationQuery, OrchestrationState, Page
from dtfx.core.tokens import new_token
from dtfx.core.workitems import (
    ActivityResult,
    ActivityWorkItem,
    CommitResult,
    OrchestrationCheckpoint,
    OrchestrationWorkItem,
)


class WorkKind(enum.Enum):
    """The queues a dispatcher can wait on."""

    ORCHESTRATION = "orchestration"
    ACTIVITY = "activity"
    ENTITY = "entity"


@dataclass(frozen=True, slots=True)
class NewLease:
    """The lease a new instance is created with, for a worker of this process to run it at once."""

    lock_token: str
    locked_until: datetime


class Intake(Protocol):
    """A worker of this process that takes the instances this backend object creates, as they
    are created (:meth:`Backend.attach_intake`): it saves a lease transaction and a wake-up.
    Its methods are called on the creating client's event loop, which may run on another
    thread than the worker's."""

    def offer(self, start: ExecutionStarted) -> timedelta | None:
        """Whether to take the instance ``start`` creates, which is due now: if so (a slot is
        taken for it), how long to lease it for."""

    def accept(self, item: OrchestrationWorkItem) -> bool:
        """Process the work item of the instance offered, created leased to it; False if it
        no longer can (its worker has gone), and the creator gives the lease back."""

    def decline(self) -> None:
        """Give back the slot of an offered instance that was not created leased to it."""


_MAX_NOTED_DELAYS = 1000
"""How many moments of delayed work a backend object remembers per work kind (see ``_note_delayed``)."""


class Backend(ABC):
    """The storage contract (see the module docstring).

    Every method is a coroutine and may be called from any thread and any event
    loop: a sync :class:`~dtfx.Client` runs its own loop next to a worker's.
    """

    poll_interval: ClassVar[float] = 1.0
    """Longest idle wait of a dispatcher before it looks for work again. Changes made
    in this process wake dispatchers at once; this bounds the delay for changes made
    by other processes that the backend does not hear of (PostgreSQL's notifications and
    SQLite's watch tell it of most), and for expired leases."""

    instance_poll_interval: ClassVar[float | None] = None
    """Longest wait of :meth:`wait_for_instance` between two reads of the instance (``None``:
    :attr:`poll_interval`). A backend that watches waited-for instances itself, and wakes
    their waiters when they change, sets it longer."""

    max_messages_per_work_item: ClassVar[int] = 10_000
    """An orchestration work item carries at most this many inbox messages."""

    blocking_commits: ClassVar[bool] = False
    """Whether :meth:`complete_orchestration_work_items_blocking` is available."""

    def __init__(self) -> None:
        self._work_signals = {kind: Signal() for kind in WorkKind}
        self._instance_signals = KeyedSignal()
        self._delayed_lock = threading.Lock()
        self._delayed: dict[WorkKind, list[datetime]] = {kind: [] for kind in WorkKind}
        self._latest_passed: dict[WorkKind, datetime] = {kind: datetime.min.replace(tzinfo=UTC) for kind in WorkKind}
        """The latest of the moments that have been dropped from ``_delayed`` as passed."""
        self._intake: Intake | None = None
        self.outside_changes = 0
        """How many times this object has seen other processes change the store (a backend
        that watches for them: :meth:`_changed_outside`). A dispatcher asks the store
        again when its delayed work is due after each (:meth:`next_visible_at`)."""

    def now(self) -> datetime:
        """The task hub's clock, off which every time the hub stores or compares is read (see
        :mod:`dtfx.backends.clock`): this machine's, unless the store is shared by machines."""
        return utc_now()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:  # noqa: B027 - an optional hook
        """Prepare the store (create or migrate the schema). Idempotent."""

    async def close(self) -> None:  # noqa: B027 - an optional hook
        """Release connections and threads. The backend is not used afterwards."""

    def opened_in_another_process(self) -> bool:
        """Whether the connections and threads this object holds were opened by another process
        (this one forked from it): they are no use here, and using them would harm that process."""
        return False

    # -- instances ------------------------------------------------------------------------

    async def create_instance(
        self,
        start: ExecutionStarted,
        *,
        scheduled_start_at: datetime | None = None,
        reuse_policy: OrchestrationIdReusePolicy | None = None,
    ) -> None:
        """Create the instance ``start.instance.instance_id`` in one transaction.

        If an instance with that id exists and its status is not in
        ``reuse_policy.replaceable_statuses`` (any existing instance, without a
        policy), raise :class:`~dtfx.OrchestrationAlreadyExistsError` and change
        nothing. Otherwise replace it: a PENDING row built by
        :func:`~dtfx.backends.delivery.new_instance_state`, its history, inbox and
        activity tasks deleted, and ``start`` in its inbox, visible at
        ``scheduled_start_at`` (or now). The row has no lease, unless the attached
        :class:`Intake` takes the instance: then it is leased to the intake, which gets
        its work item once the transaction has committed.
        """
        intake = self._intake
        lock_for = None
        if intake is not None and scheduled_start_at is None and not is_entity_id(start.instance.instance_id):
            lock_for = intake.offer(start)
        if intake is None or lock_for is None:
            await self._create_instance(start, scheduled_start_at, reuse_policy, None)
            return
        lease = NewLease(new_token(), self.now() + lock_for)
        try:
            item = await self._create_instance(start, None, reuse_policy, lease)
        except BaseException:
            intake.decline()
            raise
        if item is None:  # created, then replaced by a creation coalesced with it
            intake.decline()
        elif not intake.accept(item):
            await self.abandon_orchestration_work_item(item)

    @abstractmethod
    async def _create_instance(
        self,
        start: ExecutionStarted,
        scheduled_start_at: datetime | None,
        reuse_policy: OrchestrationIdReusePolicy | None,
        lease: NewLease | None,
    ) -> OrchestrationWorkItem | None:
        """:meth:`create_instance`, with the row leased by ``lease`` if given: then return the
        instance's work item (its start as the one message, no history), unless the instance
        was replaced again in the same transaction (``None``). An instance created leased
        wakes no dispatcher."""

    def attach_intake(self, intake: Intake) -> bool:
        """Let ``intake`` take the instances this object creates; False if another one does."""
        if self._intake is not None:
            return False
        self._intake = intake
        return True

    def detach_intake(self, intake: Intake) -> None:
        """Stop handing new instances to ``intake`` (if it is attached)."""
        if self._intake is intake:
            self._intake = None

    @abstractmethod
    async def send_event(self, instance_id: str, event: HistoryEvent, *, visible_at: datetime | None = None) -> None:
        """Put ``event`` in the instance's inbox (one insert), following the delivery rules.

        Raise :class:`~dtfx.OrchestrationNotFoundError` if the instance does not
        exist (an entity id creates its entity instead). An instance that has ended
        only accepts what :func:`~dtfx.backends.delivery.accepts` allows; anything
        else is dropped silently.
        """

    @abstractmethod
    async def get_instance(self, instance_id: str, *, fetch_payloads: bool = True) -> OrchestrationState | None:
        """The instance's state, or ``None``. Without ``fetch_payloads`` the input,
        output and custom status are left out."""

    @abstractmethod
    async def get_history(self, instance_id: str) -> list[HistoryEvent]:
        """The current execution's history in order (empty for an unknown instance)."""

    @abstractmethod
    async def query_instances(
        self, query: OrchestrationQuery, continuation_token: str | None = None, *, entities: bool = False
    ) -> Page[OrchestrationState]:
        """One page of instances matching ``query``, ordered by creation time then id.

        ``continuation_token`` is the token of the previous page; the page's token is
        ``None`` when no instance is left. ``entities`` selects entity instances
        instead of orchestrations.
        """

    @abstractmethod
    async def purge_instances(self, instance_ids: Collection[str]) -> int:
        """Delete those of the instances that have ended, with their history, inbox and
        activity tasks, in one transaction. Return how many were deleted."""

    # -- orchestration work items -------------------------------------------------------------

    @abstractmethod
    async def lock_orchestration_work_items(
        self,
        max_count: int,
        lock_for: timedelta,
        *,
        entities: bool = False,
        names: Collection[str] | None = None,
    ) -> list[OrchestrationWorkItem]:
        """Lease up to ``max_count`` instances that have visible inbox messages and no
        live lease, in one transaction, and return them with those messages (oldest
        first, at most :attr:`max_messages_per_work_item`) but without their history.

        ``entities`` selects entity instances instead of orchestrations. ``names``, if
        given, restricts the lease to instances with one of those (orchestration or
        entity) names. Each lease gets a new lock token and lasts ``lock_for``.
        """

    @abstractmethod
    async def complete_orchestration_work_items(
        self, checkpoints: Sequence[OrchestrationCheckpoint]
    ) -> list[CommitResult]:
        """Commit the checkpoints in one transaction; return, per checkpoint, what happened.

        For each checkpoint whose lease is still held (same lock token): append its
        history (or replace it), update the instance row, delete the consumed inbox
        messages, delete the ``finished_tasks`` still leased with those tokens, queue its
        activity tasks (already leased when they carry a lock token), deliver its
        messages following :mod:`~dtfx.backends.delivery`, and release the lease, or,
        with ``keep_lease_for`` and no visible inbox message left, extend it
        (``LEASE_KEPT``). A checkpoint whose lease was lost changes nothing and reports
        ``LOST``; the others still commit.
        """

    def complete_orchestration_work_items_blocking(
        self, checkpoints: Sequence[OrchestrationCheckpoint]
    ) -> list[CommitResult]:
        """:meth:`complete_orchestration_work_items` on the calling thread, which it blocks
        until the commit is done: for a worker's own threads, never an event loop's.

        Only where :attr:`blocking_commits` is true (a store whose driver can block a thread);
        a worker uses it to go on with a chain of eager steps on its activity thread.
        """
        raise NotImplementedError(f"{type(self).__name__} commits only through its event loop")

    def can_commit_blocking(self) -> bool:
        """Whether :meth:`complete_orchestration_work_items_blocking` would start at once,
        without waiting for a connection; if not, the worker commits through its event loop.
        Called on a worker's threads, before each blocking commit."""
        return self.blocking_commits

    @abstractmethod
    async def abandon_orchestration_work_item(
        self, item: OrchestrationWorkItem, *, retry_at: datetime | None = None
    ) -> None:
        """Release the lease without consuming anything (if it is still held). With
        ``retry_at``, the instance is not leased again before then."""

    @abstractmethod
    async def renew_orchestration_lease(self, item: OrchestrationWorkItem, lock_for: timedelta) -> bool:
        """Extend the lease to now + ``lock_for``; False if it was lost."""

    # -- activity work items -------------------------------------------------------------------

    @abstractmethod
    async def lock_activity_work_items(
        self, max_count: int, lock_for: timedelta, *, names: Collection[str] | None = None
    ) -> list[ActivityWorkItem]:
        """Lease up to ``max_count`` visible activity tasks (oldest first) in one transaction;
        ``names``, if given, restricts the lease to activities with one of those names."""

    @abstractmethod
    async def complete_activity_work_items(self, results: Sequence[ActivityResult]) -> list[bool]:
        """In one transaction, for each result whose lease is still held: delete the task
        and put the result event in its instance's inbox (addressed to the task's
        execution). Return, per result, whether it was committed.

        Here and in the other activity methods, a work item whose ``id`` is ``None`` (an
        eager task) is identified by its lock token alone."""

    @abstractmethod
    async def abandon_activity_work_item(self, item: ActivityWorkItem, *, retry_at: datetime | None = None) -> None:
        """Release the lease (if still held); with ``retry_at``, not leased again before then."""

    @abstractmethod
    async def renew_activity_lease(self, item: ActivityWorkItem, lock_for: timedelta) -> bool:
        """Extend the lease to now + ``lock_for``; False if it was lost."""

    # -- waiting ------------------------------------------------------------------------------

    @abstractmethod
    async def next_visible_at(self, kind: WorkKind) -> datetime | None:
        """When the earliest inbox message (or activity task) that is not visible yet
        becomes visible, or ``None``."""

    def subscribe(self, kind: WorkKind) -> Waiter:
        """A waiter that is woken when work of ``kind`` may have arrived.

        The base class wakes it for changes made through this object; a backend
        shared by several processes also wakes it for theirs (PostgreSQL
        LISTEN/NOTIFY) or relies on :attr:`poll_interval`.
        """
        return self._work_signals[kind].subscribe()

    def _note_delayed(self, kind: WorkKind, visible_at: datetime) -> None:
        """Remember that work of ``kind`` written by this process (or by another that announced
        it) becomes visible at ``visible_at``; dispatchers are woken if it is due before
        anything they knew of.

        Moments past are dropped, and only the earliest are kept (up to twice
        :data:`_MAX_NOTED_DELAYS`), each once: a process that writes delayed work but runs
        no dispatcher (a client) never takes them out with :meth:`local_due`. Work at a
        moment dropped is found as other processes' is (:meth:`next_visible_at`, polling).
        """
        with self._delayed_lock:
            pending = self._delayed[kind]
            self._drop_passed(kind)
            earliest = not pending or visible_at < pending[0]
            heapq.heappush(pending, visible_at)
            if len(pending) > 2 * _MAX_NOTED_DELAYS:
                pending[:] = heapq.nsmallest(_MAX_NOTED_DELAYS, set(pending))  # sorted: still a heap
        if earliest:
            self._notify_work(kind)

    def local_due(self, kind: WorkKind) -> datetime | None:
        """When the next work of ``kind`` that this process wrote for later (or heard of:
        :meth:`_note_delayed`) becomes visible.

        Lets an idle dispatcher wake for its own timers without asking the store; other
        work delayed by other processes is found by polling (:attr:`poll_interval`) and by
        :meth:`next_visible_at`.
        """
        with self._delayed_lock:
            pending = self._delayed[kind]
            self._drop_passed(kind)
            return pending[0] if pending else None

    def due_since(self, kind: WorkKind, moment: datetime) -> bool:
        """Whether work of ``kind`` that :meth:`local_due` knew of became visible after
        ``moment`` and before now: a dispatcher that looked for work at ``moment`` may have
        looked too early for it, and should look again rather than wait."""
        with self._delayed_lock:
            self._drop_passed(kind)
            return self._latest_passed[kind] > moment

    def _drop_passed(self, kind: WorkKind) -> None:
        """Take the moments of ``kind`` now passed out of ``_delayed``, noting the latest (under the lock)."""
        now = self.now()
        pending = self._delayed[kind]
        while pending and pending[0] <= now:
            self._latest_passed[kind] = max(self._latest_passed[kind], heapq.heappop(pending))

    def _changed_outside(self) -> None:
        """Other processes have changed the store, in ways unknown: every dispatcher looks
        for work, and asks the store again when delayed work is due."""
        self.outside_changes += 1
        self._notify_work(*WorkKind)

    def _notify_work(self, *kinds: WorkKind) -> None:
        for kind in kinds:
            self._work_signals[kind].notify()

    def _notify_instance(self, instance_id: str, left: OrchestrationStatus | OrchestrationState | None = None) -> None:
        """Wake the instance's waiters; ``left``: what a commit of this object left of it, its
        status, or its whole state once it has ended (``None``: unknown)."""
        self._instance_signals.notify(instance_id, left)

    async def wait_for_instance(
        self,
        instance_id: str,
        predicate: Callable[[OrchestrationState], bool],
        timeout: float | None,
        *,
        fetch_payloads: bool = True,
        may_satisfy: Callable[[OrchestrationStatus], bool] | None = None,
    ) -> OrchestrationState | None:
        """Wait until the instance's state satisfies ``predicate`` and return it.

        ``predicate`` should depend on the status only: waiters are woken when an
        instance's status changes. ``may_satisfy`` tells whether a state of a given status
        can satisfy ``predicate``: the commits of this object that leave the instance with
        one that cannot (RUNNING, to a wait for the end) then do not wake the waiter at all,
        and one that ends it hands the waiter the state it wrote. A wait that starts
        just after a commit of this object left a status that cannot satisfy it skips its
        first read too (``KeyedSignal.recent``): a change made since by another process is
        seen as the changes made after a wait began are (polling, or the backend's watch).
        Returns ``None`` at once for an unknown instance; raises ``TimeoutError`` when
        ``timeout`` seconds pass first. Built from :meth:`get_instance`, woken by this
        object's own commits and polling otherwise; backends may do better.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        began = self.now()
        with self._instance_signals.subscribe(instance_id, _ignored_by(may_satisfy)) as waiter:
            known = self._instance_signals.recent(instance_id)  # a commit here has just left it so
            read = _worth_reading(None if known is None else [known], may_satisfy)
            while True:
                if read:
                    state = await self.get_instance(instance_id, fetch_payloads=fetch_payloads)
                    if state is None or predicate(state):
                        return state
                interval = self.instance_poll_interval or self.poll_interval
                remaining = interval if deadline is None else min(interval, deadline - loop.time())
                if remaining <= 0:
                    raise TimeoutError(instance_id)
                notified = await waiter.wait(remaining)
                hints = waiter.take_hints()
                last = hints[-1] if hints else None
                # A commit here ended it; unless it did so before the wait began: a commit's
                # waiters are woken after the commit, and a rewind may have come in between.
                if isinstance(last, OrchestrationState) and predicate(last) and last.last_updated_at >= began:
                    return _as_read(last, fetch_payloads)
                read = not notified or _worth_reading(hints, may_satisfy)


def _cannot_end(hint: object, may_satisfy: Callable[[OrchestrationStatus], bool]) -> bool:
    """Whether a change hinted so cannot end a wait: it left a status that cannot satisfy it."""
    return isinstance(hint, OrchestrationStatus) and not may_satisfy(hint)


def _ignored_by(may_satisfy: Callable[[OrchestrationStatus], bool] | None) -> Callable[[object], bool] | None:
    """The hints a wait ignores, those that cannot end it (``None``: it ignores none)."""
    return None if may_satisfy is None else partial(_cannot_end, may_satisfy=may_satisfy)


def _worth_reading(hints: list[object] | None, may_satisfy: Callable[[OrchestrationStatus], bool] | None) -> bool:
    """Whether changes hinted so (``None``: unknown) may have made the instance satisfy a wait."""
    if hints is None or may_satisfy is None:
        return True
    return not all(_cannot_end(hint, may_satisfy) for hint in hints)


def _as_read(state: OrchestrationState, fetch_payloads: bool) -> OrchestrationState:
    """A copy of a state a commit wrote, as :meth:`Backend.get_instance` would read it."""
    if fetch_payloads:
        return dataclasses.replace(state)
    return dataclasses.replace(state, serialized_input=None, serialized_output=None, serialized_custom_status=None)
