"""The storage contract over :mod:`~dtfx.backends.sql.operations`, for any SQL driver."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from abc import abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from dtfx.backends.base import Backend, NewLease, WorkKind
from dtfx.backends.paging import decode_token
from dtfx.backends.sql import operations
from dtfx.backends.sql.program import AssumptionFailed, Dialect, Notify, Program
from dtfx.backends.sql.transaction import KeptRow
from dtfx.core.errors import BackendError, BackendUnavailableError, CommitInDoubtError, OrchestrationAlreadyExistsError
from dtfx.core.history import ExecutionStarted, HistoryEvent
from dtfx.core.state import OrchestrationIdReusePolicy, OrchestrationQuery, OrchestrationState, Page
from dtfx.core.tokens import new_token
from dtfx.core.workitems import (
    ActivityResult,
    ActivityWorkItem,
    CommitResult,
    OrchestrationCheckpoint,
    OrchestrationWorkItem,
)

T = TypeVar("T")

logger = logging.getLogger(__name__)

UNREADABLE_RETRY = timedelta(minutes=1)
"""How long an instance with an inbox message that cannot be read waits before it is looked at again."""

_GIVE_BACK_FIRST_DELAY = 0.1
_GIVE_BACK_MAX_DELAY = 2.0


@dataclass(frozen=True)
class Coalesced:
    """A kind of call whose concurrent requests run together as one program."""

    program: Callable[[Dialect, list[Any]], Program[list[Any]]]
    """Runs a list of requests; returns one result per request."""
    write: bool
    hopeful: Callable[[Dialect, list[Any]], Program[list[Any]]] | None = None
    """A cheaper :attr:`program` that assumes what is usual (that new instances are new),
    tried first; where its assumption fails (:class:`AssumptionFailed`), :attr:`program` runs."""


CREATE_INSTANCES = Coalesced(
    operations.create_instances, write=True, hopeful=partial(operations.create_instances, assume_new=True)
)
SEND_EVENTS = Coalesced(operations.send_events, write=True)
GET_INSTANCES = Coalesced(operations.get_instances, write=False)


class CoalescedRun:
    """The requests taken from one kind's queue, and the transactions that run them.

    They run together as one program. If that fails other than by the store being
    unavailable (a value of one request that the store cannot hold, say), each runs on
    its own, so that only the request at fault gets the error. A driver runs each
    :meth:`next_program` as one transaction and reports its outcome to :meth:`ran`, then
    hands :attr:`futures` their :attr:`outcomes` (:meth:`SqlBackend._settle`).
    """

    def __init__(
        self, kind: Coalesced, dialect: Dialect, requests: list[Any], futures: list[asyncio.Future[Any]]
    ) -> None:
        self.kind = kind
        self.futures = futures
        self.outcomes: list[Any] = []
        """One per request run so far, in order: its result, or the exception its caller gets."""
        self._dialect = dialect
        self._groups = [requests]  # those still to run, each as one program
        self._program = kind.hopeful or kind.program

    def next_program(self) -> Callable[[], Program[list[Any]]] | None:
        """The program to run next as one transaction (``None``: every request has run)."""
        return partial(self._program, self._dialect, self._groups[0]) if self._groups else None

    def ran(self, outcome: list[Any] | Exception) -> None:
        """Record what the program from :meth:`next_program` gave: its results, or its error."""
        if isinstance(outcome, AssumptionFailed) and self._program is not self.kind.program:
            self._program = self.kind.program  # nothing was written: the same requests, reading
            return
        group = self._groups.pop(0)
        if not isinstance(outcome, Exception):
            self.outcomes.extend(outcome)
        elif len(group) > 1 and not isinstance(outcome, BackendUnavailableError):
            self._groups[:0] = [[request] for request in group]
        else:
            self.outcomes.extend([outcome] * len(group))


def _resolve(settled: list[tuple[asyncio.Future[Any], Any]], unclaimed: Callable[[Any], None]) -> None:
    """Give each future its outcome (a result, or an exception to raise), unless its caller gave
    up (cancelled): then a result goes to ``unclaimed``."""
    for future, outcome in settled:
        if future.done():
            if not isinstance(outcome, BaseException):
                unclaimed(outcome)
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class SqlBackend(Backend):
    """A backend whose every method is a program of :mod:`~dtfx.backends.sql.operations`.

    A subclass supplies the dialect and :meth:`_run`, which runs a program as one
    transaction on its driver and calls :meth:`_after_commit` with the program's
    :class:`~dtfx.backends.sql.program.Notify` steps once it has committed, and it runs
    the coalesced calls' queues (:meth:`_start_draining`).

    Taking and renewing leases commits without waiting for the disk (``durable=False``:
    SQLite's ``synchronous=NORMAL`` for that transaction, PostgreSQL's
    ``synchronous_commit=off``). A lease lost in a power failure is no loss: the work item
    is offered again, as when a lease expires, and whatever ran under the lease commits its
    outcome in a durable transaction, which takes the earlier ones to the disk with it (one
    log, flushed in order). Everything else, every step of an orchestration first, is
    durable when its commit returns. A lease is taken once per work item, so this saves a
    disk flush on the way of every message; on a chain of eager steps, it saves nothing.
    """

    instance_poll_interval = 5.0  # waiters are woken by commits and by the watch rounds

    def __init__(self, dialect: Dialect) -> None:
        super().__init__()
        self._dialect = dialect
        self._queue_lock = threading.Lock()
        self._queues: dict[Coalesced, list[tuple[Any, asyncio.Future[Any]]]] = {}
        self._observed: dict[str, tuple[int, int] | None] = {}
        self._kept_rows: dict[str, KeptRow] = {}
        """The rows of the instances whose lease the last commit of this object kept, as written."""
        self._giving_back: set[asyncio.Task[None]] = set()
        self._closed = False
        self._opened_in: int | None = None
        """The process that opened its connections and threads (``None``: none yet)."""

    def opened_in_another_process(self) -> bool:
        return self._opened_in is not None and self._opened_in != os.getpid()

    def _opening(self) -> None:
        """Note that this process opens the backend's connections and threads, unless another
        did: then raise :class:`~dtfx.BackendError` (see :meth:`opened_in_another_process`)."""
        if self.opened_in_another_process():
            raise BackendError(
                f"This backend was opened by process {self._opened_in}, from which this one forked: its"
                " connections and threads are no use here. Open clients and workers in the process that uses"
                " them (after the fork: with gunicorn, without --preload or in a post_fork hook); a dtfx.Client"
                " or AsyncClient that opened its backend from a URL opens it again by itself."
            )
        self._opened_in = os.getpid()

    def now(self) -> datetime:
        return self._dialect.now()

    @abstractmethod
    async def _run(
        self, program: Callable[[], Program[T]], *, write: bool, durable: bool = True, brief: bool = True
    ) -> T:
        """Run ``program()`` as one transaction (``write``: one that writes) and return its result.

        ``durable=False`` (leases only, see the class docstring) lets the commit return
        before it has reached the disk. ``brief=False`` says that the program's work has no
        bound (a query, a history, a purge): a driver that may run brief ones on the
        caller's thread runs it on its own.
        """

    # Calls that many clients make at once (a thousand creations, a thousand waits) are
    # coalesced: each kind has a queue; the driver runs everything queued as one program
    # (a CoalescedRun), and what arrives meanwhile goes in the next one.

    @abstractmethod
    def _start_draining(self, kind: Coalesced) -> None:
        """Make the driver take ``kind``'s queue (:meth:`_drain`) and run it soon (from any thread)."""

    @abstractmethod
    async def _ensure_started(self) -> None:
        """Start the backend if it has not started yet."""

    async def _run_coalesced(self, kind: Coalesced, request: Any) -> Any:
        """Queue ``request``; return its result once a program of ``kind`` has run it (or raise
        the exception its program gave as its result)."""
        self._opening()
        await self._ensure_started()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        with self._queue_lock:
            queue = self._queues.setdefault(kind, [])
            queue.append((request, future))
            first = len(queue) == 1
        if first:
            self._start_draining(kind)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:  # cancelled once it had it
                self._unclaimed(future.result())
            raise

    def _drain(self, kind: Coalesced) -> CoalescedRun | None:
        """Take ``kind``'s queue (``None``: it is empty)."""
        with self._queue_lock:
            queued = self._queues.pop(kind, [])
        if not queued:
            return None
        return CoalescedRun(kind, self._dialect, [request for request, _ in queued], [future for _, future in queued])

    def _refuse_queued(self, kind: Coalesced, error: Exception) -> None:
        """Fail whatever waits in ``kind``'s queue with ``error`` (the driver has gone)."""
        run = self._drain(kind)
        if run is not None:
            self._settle(run.futures, [error] * len(run.futures))

    def _settle(self, futures: list[asyncio.Future[Any]], outcomes: list[Any]) -> None:
        """Hand each caller its outcome (a result, or an exception to raise) on the caller's own event loop.

        Callers on the running loop get theirs at once; each other loop is woken once for
        all of its callers (a thread-safe wake-up costs a system call).
        """
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        elsewhere: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for future, outcome in zip(futures, outcomes, strict=True):
            loop = future.get_loop()
            if loop is running:
                _resolve([(future, outcome)], self._unclaimed)
            else:
                elsewhere.setdefault(loop, []).append((future, outcome))
        for loop, settled in elsewhere.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there any more
                loop.call_soon_threadsafe(_resolve, settled, self._unclaimed)

    def _unclaimed(self, outcome: Any) -> None:
        """A coalesced call's result that its caller, cancelled as it waited, never got: an
        instance created leased to this process's worker, which never hears of it, is given
        back for any worker to take (else it would wait for its lease to end)."""
        if isinstance(outcome, operations.LeasedCreation):
            item = outcome.item
            give_back = partial(operations.give_back_instance_leases, self._dialect, item.lock_token, False)
            self._give_back_once_possible(give_back, item.locked_until)

    def _after_commit(self, notifications: Sequence[Notify]) -> None:
        """Wake this process's waiters for what a committed transaction changed."""
        for notify in notifications:
            for kind, visible_at in notify.delayed:
                self._note_delayed(kind, visible_at)
            self._notify_work(*notify.kinds)
            for instance_id, status in notify.instances.items():
                self._notify_instance(instance_id, notify.ended.get(instance_id, status))

    # Other processes' commits reach this process's waiters through watch rounds: every
    # poll interval, the driver reads the versions of all the instances someone waits
    # for in one query (:meth:`_watch_round`) and wakes the waiters of those that changed
    # (:meth:`_observe`), instead of every waiter polling on its own.

    def _watch_round(self) -> tuple[list[str], Callable[[], Program[dict[str, tuple[int, int]]]]] | None:
        """The instances waited for and the program reading their versions (``None``: nobody waits)."""
        instance_ids = [key for key in self._instance_signals.subscribed_keys() if isinstance(key, str)]
        if not instance_ids:
            self._observed.clear()
            return None
        return instance_ids, partial(operations.instance_versions, self._dialect, instance_ids)

    def _observe(self, instance_ids: list[str], versions: dict[str, tuple[int, int]]) -> None:
        """Wake the waiters of the instances whose version differs from the previous round's.

        An instance seen for the first time counts as changed: its waiters may have read
        it before a change that this round is the first to see.
        """
        previous, self._observed = self._observed, {}
        for instance_id in instance_ids:
            version = self._observed[instance_id] = versions.get(instance_id)
            if instance_id not in previous or previous[instance_id] != version:
                self._notify_instance(instance_id)

    # -- instances ------------------------------------------------------------------------

    async def _create_instance(
        self,
        start: ExecutionStarted,
        scheduled_start_at: datetime | None,
        reuse_policy: OrchestrationIdReusePolicy | None,
        lease: NewLease | None,
    ) -> OrchestrationWorkItem | None:
        try:
            outcome = await self._run_coalesced(CREATE_INSTANCES, (start, scheduled_start_at, reuse_policy, lease))
        except CommitInDoubtError as doubt:
            if lease is not None:
                give_back = partial(operations.give_back_instance_leases, self._dialect, lease.lock_token, False)
                self._give_back_once_possible(give_back, lease.locked_until)
            await self._settle_creation_in_doubt(start, scheduled_start_at, reuse_policy, doubt)
            return None  # created without a lease this process's worker holds: for any worker
        if outcome is None:
            return None
        assert isinstance(outcome, operations.LeasedCreation)
        self._kept_rows[outcome.item.instance_id] = outcome.row  # its first commit assumes it
        return outcome.item

    async def _settle_creation_in_doubt(
        self,
        start: ExecutionStarted,
        scheduled_start_at: datetime | None,
        reuse_policy: OrchestrationIdReusePolicy | None,
        doubt: CommitInDoubtError,
    ) -> None:
        """After a creation whose commit is in doubt: return if it committed (the instance was
        created at ``start``'s timestamp), else create the instance again (without a lease);
        raise ``doubt`` if the store cannot tell yet."""
        try:
            if await self._holds(start):
                return
            try:
                await self._run_coalesced(CREATE_INSTANCES, (start, scheduled_start_at, reuse_policy, None))
            except OrchestrationAlreadyExistsError:  # the commit in doubt had not ended when the instance was read
                if not await self._holds(start):
                    raise
        except BackendUnavailableError:
            raise doubt from None

    async def _holds(self, start: ExecutionStarted) -> bool:
        """Whether the instance stored under ``start``'s id is the one ``start`` created, even
        if it has continued as new since (and so has another execution id)."""
        state = await self.get_instance(start.instance.instance_id, fetch_payloads=False)
        return state is not None and state.created_at == start.timestamp

    async def send_event(self, instance_id: str, event: HistoryEvent, *, visible_at: datetime | None = None) -> None:
        await self._run_coalesced(SEND_EVENTS, (instance_id, event, visible_at))  # raises the request's error

    async def get_instance(self, instance_id: str, *, fetch_payloads: bool = True) -> OrchestrationState | None:
        state: OrchestrationState | None = await self._run_coalesced(GET_INSTANCES, (instance_id, fetch_payloads))
        return state

    async def get_history(self, instance_id: str) -> list[HistoryEvent]:
        return await self._run(partial(operations.get_history, instance_id), write=False, brief=False)

    async def query_instances(
        self, query: OrchestrationQuery, continuation_token: str | None = None, *, entities: bool = False
    ) -> Page[OrchestrationState]:
        after = decode_token(continuation_token) if continuation_token else None  # before a connection is taken
        program = partial(operations.query_instances, self._dialect, query, after, entities)
        return await self._run(program, write=False, brief=False)

    async def purge_instances(self, instance_ids: Collection[str]) -> int:
        if not instance_ids:
            return 0
        program = partial(operations.purge_instances, self._dialect, instance_ids)
        return await self._run(program, write=True, brief=False)

    # -- orchestration work items -------------------------------------------------------------

    async def lock_orchestration_work_items(
        self,
        max_count: int,
        lock_for: timedelta,
        *,
        entities: bool = False,
        names: Collection[str] | None = None,
    ) -> list[OrchestrationWorkItem]:
        if max_count < 1 or (names is not None and not names):
            return []
        lease = NewLease(new_token(), self.now() + lock_for)
        program = partial(
            operations.lock_orchestration_work_items,
            self._dialect,
            max_count,
            lease,
            entities,
            names,
            self.max_messages_per_work_item,
        )
        prefix = operations.lease_prefix(lease.lock_token)
        give_back = partial(operations.give_back_instance_leases, self._dialect, prefix, entities)
        items, unreadable = await self._lease(program, give_back, lease)
        for item in items:
            if item.instance_id in unreadable:
                await self._put_off_unreadable(item, unreadable[item.instance_id])
        empty = [item for item in items if not item.messages and item.instance_id not in unreadable]
        if empty:  # never hand out an empty work item
            try:
                await self._run(partial(operations.release_empty_work_items, empty), write=True, durable=False)
            except Exception:  # the others are leased all the same: they go out; the empty ones' leases end
                logger.warning("Releasing %d work item(s) with nothing to do failed", len(empty), exc_info=True)
        return [item for item in items if item.messages]

    async def complete_orchestration_work_items(
        self, checkpoints: Sequence[OrchestrationCheckpoint]
    ) -> list[CommitResult]:
        if not checkpoints:
            return []
        kept = self._kept_row(checkpoints)
        if kept is not None:
            try:
                return self._remember(checkpoints, await self._run(self._commit_program(checkpoints, kept), write=True))
            except AssumptionFailed:  # someone else wrote the row: read it
                pass
        return self._remember(checkpoints, await self._run(self._commit_program(checkpoints, None), write=True))

    def complete_orchestration_work_items_blocking(
        self, checkpoints: Sequence[OrchestrationCheckpoint]
    ) -> list[CommitResult]:
        if not checkpoints:
            return []
        kept = self._kept_row(checkpoints)
        if kept is not None:
            try:
                return self._remember(checkpoints, self._run_blocking(self._commit_program(checkpoints, kept)))
            except AssumptionFailed:  # someone else wrote the row: read it
                pass
        return self._remember(checkpoints, self._run_blocking(self._commit_program(checkpoints, None)))

    def _run_blocking(self, program: Callable[[], Program[T]]) -> T:
        """Run ``program()`` as one durable write transaction on the calling thread, which it
        blocks until the commit is done (and calls :meth:`_after_commit`); a driver that can
        (:attr:`blocking_commits`) overrides this."""
        raise NotImplementedError(f"{type(self).__name__} commits only through its event loop")

    # A chain of eager steps commits one checkpoint after another under one lease. Each commit
    # leaves the instance's row as the next one would read it, so the next one assumes it
    # (guarded: HubTransaction.assume) instead of reading it and its inbox: on PostgreSQL, a
    # round trip less. So does the first commit of an instance created leased (by a worker's
    # intake), whose inbox the creation knows: only the start.

    def _kept_row(self, checkpoints: Sequence[OrchestrationCheckpoint]) -> KeptRow | None:
        """The row a commit of ``checkpoints`` may assume: the only checkpoint's instance's, as
        the commit before (or the creation) left it, when the checkpoint reads nothing else of
        the store (it sends no message and consumes no inbox message the row does not know)."""
        if len(checkpoints) != 1 or checkpoints[0].messages:
            return None
        checkpoint = checkpoints[0]
        row = self._kept_rows.get(checkpoint.instance_id)
        if row is None or row.lock_token != checkpoint.lock_token:
            return None
        return row if all(message_id in row.inbox for message_id in checkpoint.consumed) else None

    def _commit_program(
        self, checkpoints: Sequence[OrchestrationCheckpoint], kept: KeptRow | None
    ) -> Callable[[], Program[tuple[list[CommitResult], dict[str, KeptRow]]]]:
        return partial(operations.complete_orchestration_work_items, self._dialect, checkpoints, kept)

    def _remember(
        self,
        checkpoints: Sequence[OrchestrationCheckpoint],
        outcome: tuple[list[CommitResult], dict[str, KeptRow]],
    ) -> list[CommitResult]:
        """Keep the rows of the instances whose lease a commit kept; forget the others'."""
        results, rows = outcome
        for checkpoint in checkpoints:
            row = rows.get(checkpoint.instance_id)
            if row is None:
                self._kept_rows.pop(checkpoint.instance_id, None)
            else:
                self._kept_rows[checkpoint.instance_id] = row
        return results

    async def abandon_orchestration_work_item(
        self, item: OrchestrationWorkItem, *, retry_at: datetime | None = None
    ) -> None:
        self._kept_rows.pop(item.instance_id, None)
        program = partial(operations.abandon_orchestration_work_item, self._dialect, item, retry_at)
        await self._run(program, write=True)

    async def renew_orchestration_lease(self, item: OrchestrationWorkItem, lock_for: timedelta) -> bool:
        return await self._renew(item, partial(operations.renew_orchestration_lease, self._dialect, item, lock_for))

    # -- activity work items -------------------------------------------------------------------

    async def lock_activity_work_items(
        self, max_count: int, lock_for: timedelta, *, names: Collection[str] | None = None
    ) -> list[ActivityWorkItem]:
        if max_count < 1 or (names is not None and not names):
            return []
        lease = NewLease(new_token(), self.now() + lock_for)
        program = partial(operations.lock_activity_work_items, self._dialect, max_count, lease, names)
        give_back = partial(operations.give_back_task_leases, self._dialect, operations.lease_prefix(lease.lock_token))
        return await self._lease(program, give_back, lease)

    async def complete_activity_work_items(self, results: Sequence[ActivityResult]) -> list[bool]:
        if not results:
            return []
        return await self._run(partial(operations.complete_activity_work_items, self._dialect, results), write=True)

    async def abandon_activity_work_item(self, item: ActivityWorkItem, *, retry_at: datetime | None = None) -> None:
        await self._run(partial(operations.abandon_activity_work_item, self._dialect, item, retry_at), write=True)

    async def _put_off_unreadable(self, item: OrchestrationWorkItem, why: str) -> None:
        """Leave an instance with a message no worker of this version can read for a while: it
        blocks no other, and a worker that can read it (a newer one, in a rolling deploy) may."""
        logger.error(
            "Instance %s: an inbox message cannot be read (%s); looking again in %s",
            item.instance_id,
            why,
            UNREADABLE_RETRY,
        )
        try:
            await self.abandon_orchestration_work_item(item, retry_at=self.now() + UNREADABLE_RETRY)
        except Exception:  # its lease ends, and it is looked at again then
            logger.warning("Putting off instance %s failed", item.instance_id, exc_info=True)

    async def renew_activity_lease(self, item: ActivityWorkItem, lock_for: timedelta) -> bool:
        return await self._renew(item, partial(operations.renew_activity_lease, self._dialect, item, lock_for))

    # A transaction that takes leases (a lock of work items, a creation leased to this process's
    # worker) may fail with its commit in doubt. Had it committed, its leases would hold their
    # work back until they expire (a minute by default), since nobody got the work items: their
    # tokens are made here, so the leases are given back by token once the store answers.

    async def _lease(
        self, program: Callable[[], Program[T]], give_back: Callable[[], Program[None]], lease: NewLease
    ) -> T:
        """Run ``program``, which takes leases (``lease``'s) and commits without waiting for the
        disk; if its outcome is lost, run ``give_back`` once possible."""
        try:
            return await self._run(program, write=True, durable=False)
        except CommitInDoubtError:
            self._give_back_once_possible(give_back, lease.locked_until)
            raise

    def _give_back_once_possible(self, give_back: Callable[[], Program[None]], until: datetime) -> None:
        """Run ``give_back`` in the background: tried again while the store is unavailable, until
        the leases it gives back would have ended anyway (``until``) or this object closes."""
        task = asyncio.get_running_loop().create_task(self._give_back(give_back, until))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def _give_back(self, give_back: Callable[[], Program[None]], until: datetime) -> None:
        delay = _GIVE_BACK_FIRST_DELAY  # the server may still be finishing the commit in doubt
        while True:
            await asyncio.sleep(delay)
            try:
                await self._run(give_back, write=True)
                return
            except BackendUnavailableError as error:
                if self._closed or self.now() + timedelta(seconds=delay) >= until:
                    logger.warning("Leases taken in a transaction whose commit is in doubt stay (%s)", error)
                    return
                delay = min(2 * delay, _GIVE_BACK_MAX_DELAY)
                logger.warning("Giving back leases taken in a transaction whose commit is in doubt failed (%s)", error)
            except Exception:
                logger.exception("Giving back leases taken in a transaction whose commit is in doubt failed")
                return

    async def _renew(
        self, item: OrchestrationWorkItem | ActivityWorkItem, program: Callable[[], Program[datetime | None]]
    ) -> bool:
        """Run a lease renewal; on success, ``item`` holds the lease's new end."""
        until = await self._run(program, write=True, durable=False)
        if until is not None:
            item.locked_until = until
        return until is not None

    # -- waiting ------------------------------------------------------------------------------

    async def next_visible_at(self, kind: WorkKind) -> datetime | None:
        return await self._run(partial(operations.next_visible_at, self._dialect, kind), write=False)
