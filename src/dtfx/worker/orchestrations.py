"""Processing orchestration work items: plan, execute, apply, commit.

:class:`OrchestrationProcessor` is the same for every executor; what runs the
orchestrator code is an :class:`EpisodeRunner`: :class:`LocalRunner` here (Python
generators in this process, kept live in an :class:`~dtfx.worker.cache.InstanceCache`),
or the gRPC sidecar's runner that streams the episode to an SDK worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Protocol

from dtfx._tracing import episode_traced, execution_ended
from dtfx.backends.base import Backend
from dtfx.backends.delivery import checkpointed_state
from dtfx.core.actions import CompleteOrchestration, OrchestratorAction
from dtfx.core.apply import (
    EpisodeKind,
    HistoryNeededError,
    apply_actions,
    merge_checkpoints,
    needs_history,
    plan_episode,
    releases_of_open_sections,
    termination,
    unchanged_checkpoint,
    unstorable_checkpoint,
)
from dtfx.core.errors import NotRegisteredError, UnstorableValueError
from dtfx.core.history import (
    ExecutionStarted,
    FailureDetails,
    HistoryEvent,
    OrchestrationSpan,
    OrchestrationStatus,
    OrchestratorStarted,
    TaskCompleted,
    TaskFailed,
)
from dtfx.core.replay import OrchestrationExecutor
from dtfx.core.serialization import DataConverter
from dtfx.core.versioning import VERSION_MISMATCH, compare_versions
from dtfx.core.workitems import (
    ActivityTask,
    ActivityWorkItem,
    CommitResult,
    OrchestrationCheckpoint,
    OrchestrationWorkItem,
)
from dtfx.worker.cache import CachedExecution, InstanceCache
from dtfx.worker.chains import ChainEnd, RanAhead, Settled, Stepped, Taken, ThreadChain
from dtfx.worker.commit import GroupCommitter
from dtfx.worker.options import VersionFailureStrategy, VersioningOptions, VersionMatchStrategy
from dtfx.worker.recent import remember_latest
from dtfx.worker.registry import Registry

logger = logging.getLogger(__name__)


@dataclass
class EpisodeOutcome:
    """What an executor returned for one episode."""

    actions: list[OrchestratorAction]
    custom_status: str | None
    awaited: int | None = None
    """The action id of the one task the orchestration now waits for, if it waits for
    nothing else (``None``: it waits for more, or the runner cannot tell)."""
    span: OrchestrationSpan | None = None
    """The execution's span, if the worker began or changed it in this episode."""


def ended_unrun(checkpoint: OrchestrationCheckpoint) -> None:
    """Trace the end of an execution that ended in its first episode without running its
    orchestrator (not registered, a version it may not run, terminated before it started)."""
    started = _find_start(checkpoint.new_history)
    if started is not None:
        execution_ended(started, checkpoint)


_REJECTED_REMEMBERED = 10_000
"""Most instances a worker remembers having left to others for their version."""


@dataclass
class Abandon:
    """The executor declines the work item; offer it again after ``retry_after`` (``None``: at once)."""

    retry_after: timedelta | None = None

    def retry_at(self, now: datetime) -> datetime | None:
        """When to offer the work item again, ``now`` being the hub's time."""
        return None if self.retry_after is None else now + self.retry_after


_Following = tuple[OrchestrationCheckpoint, int | None] | Abandon
"""What follows an eager activity: the next episode's checkpoint and what it awaits, or :class:`Abandon`."""


class EpisodeRunner(Protocol):
    """Runs orchestrator code for one episode."""

    def cached_start(self, item: OrchestrationWorkItem) -> ExecutionStarted | None:
        """The instance's ``ExecutionStarted`` if the runner can continue it without its history."""

    async def run(
        self,
        item: OrchestrationWorkItem,
        started: ExecutionStarted,
        past_events: Sequence[HistoryEvent] | None,
        new_events: list[HistoryEvent],
    ) -> EpisodeOutcome | Abandon:
        """Execute the episode; ``past_events`` is ``None`` when :meth:`cached_start` said so."""

    def finished(
        self, item: OrchestrationWorkItem, checkpoint: OrchestrationCheckpoint | None, committed: bool
    ) -> None:
        """The episode is settled: with ``committed``, the orchestration goes on from ``checkpoint``
        (committed, or to be committed as part of a later checkpoint: if that one is lost,
        ``finished`` is called again without ``committed``); otherwise (or when ``checkpoint``
        is ``None``: nothing was run or committed) whatever ran is forgotten."""


class EagerLane(Protocol):
    """Runs in this process the one activity an orchestration waits for (see :mod:`dtfx.worker.eager`)."""

    window: float
    """How long, in seconds, an orchestration's lease waits for its eager activity."""

    @property
    def thread_pool(self) -> Executor | None:
        """Where sync activities run."""

    def eager_task(self, checkpoint: OrchestrationCheckpoint, awaited: int | None) -> ActivityTask | None:
        """The checkpoint's task that :meth:`claim` would take."""

    def claim(
        self, checkpoint: OrchestrationCheckpoint, awaited: int | None, *, replacing: ActivityWorkItem | None = None
    ) -> ActivityWorkItem | None:
        """Take the checkpoint's activity for this process if it is the one task ``awaited``
        (its task is then queued leased, and the orchestration keeps its lease), in a free
        slot or in that of the claim it is ``replacing``, whose activity has run."""

    def alone(self) -> bool:
        """Whether one claim's activity is all the activity work of this process."""

    def now(self) -> datetime:
        """The store's time, to tell whether a kept lease has run out."""

    def runs_here(self, name: str) -> bool:
        """Whether :meth:`run_here` can run the activity ``name``."""

    def run_here(self, item: ActivityWorkItem, loop: asyncio.AbstractEventLoop) -> TaskCompleted | TaskFailed:
        """Run the claim's activity on the calling thread, a worker thread (``loop``: the worker's)."""

    async def run(self, item: ActivityWorkItem) -> TaskCompleted | TaskFailed | None:
        """Run the claimed activity; its result if it finishes within the window, else ``None``
        (it goes on running: :meth:`hand_over` or :meth:`drop` it)."""

    def finish(self, item: ActivityWorkItem) -> None:
        """The claim's activity has run (not through :meth:`run`): give its slot back."""

    def track(self, item: ActivityWorkItem, running: Awaitable[TaskCompleted | TaskFailed]) -> None:
        """The claim's activity runs as ``running``, not through :meth:`run` (for :meth:`hand_over`)."""

    def hand_over(self, item: ActivityWorkItem) -> None:
        """The claimed activity's task is committed: let it run (or go on running) as ordinary
        work, its result going through the orchestration's inbox."""

    def drop(self, item: ActivityWorkItem) -> None:
        """The claim's checkpoint was not committed: stop the activity if it runs, forget the claim."""

    async def deliver(self, item: ActivityWorkItem, result: TaskCompleted | TaskFailed) -> None:
        """Deliver a result through the orchestration's inbox."""


class OrchestrationProcessor:
    """Takes an orchestration work item from lock to commit.

    With an :class:`EagerLane`, an episode after which the orchestration waits for just
    one activity that this worker runs keeps its lease: the activity runs here at once and
    the next episode follows here too, so a step of a sequence costs one transaction. The
    lease is given up as soon as other messages wait for the instance or the activity
    outlasts the lane's window, and whatever goes wrong falls back on the queues. Where the
    backend commits on any thread and the runner is local, a chain of sync activities goes
    on on the activity's thread (:mod:`dtfx.worker.chains`).
    """

    def __init__(
        self,
        backend: Backend,
        runner: EpisodeRunner,
        committer: GroupCommitter[OrchestrationCheckpoint, CommitResult],
        eager: EagerLane | None = None,
    ) -> None:
        self._backend = backend
        self._runner = runner
        self._committer = committer
        self.eager = eager
        self._chain_runner = runner if isinstance(runner, LocalRunner) and backend.blocking_commits else None
        """The runner of the episodes of chains on activity threads (``None``: no such chains)."""
        self._in_doubt: dict[str, _InDoubt] = {}
        """By instance, the eager step whose commit failed with its outcome unknown (the store
        became unreachable, say), for the work item's release to settle (:meth:`release`)."""

    async def process(self, item: OrchestrationWorkItem) -> None:
        """Run one episode of the work item's instance and commit it."""
        now = self._backend.now()
        cached = self._runner.cached_start(item)
        history: list[HistoryEvent] | None = None
        if cached is None or needs_history(item):
            history = await self._backend.get_history(item.instance_id) if item.history_size else []
        plan = plan_episode(item, history, now)
        if plan.kind is EpisodeKind.DEFER:
            self._runner.finished(item, None, False)
            await self._backend.abandon_orchestration_work_item(item, retry_at=plan.defer_until)
            return
        if plan.kind is EpisodeKind.CHECKPOINT:
            assert plan.checkpoint is not None
            self._runner.finished(item, None, False)
            if await self._commit(item, plan.checkpoint) is not CommitResult.LOST:
                ended_unrun(plan.checkpoint)
            return

        started = cached or _find_start([*(history or []), *plan.new_events])
        if started is None:
            logger.error("Instance %s has events but no ExecutionStarted; discarding them", item.instance_id)
            await self._commit(item, unchanged_checkpoint(item, plan.consumed, now))
            return
        outcome = await self._runner.run(item, started, history if cached is None else None, plan.new_events)
        if isinstance(outcome, Abandon):
            self._runner.finished(item, None, False)
            await self._backend.abandon_orchestration_work_item(item, retry_at=outcome.retry_at(self._backend.now()))
            return
        applying = partial(
            apply_actions,
            item,
            started,
            plan.new_events,
            outcome.actions,
            outcome.custom_status,
            plan.consumed,
            self._backend.now(),  # the actions' events date from when they came back (an SDK's: a round trip later)
            span=outcome.span,
        )
        try:
            checkpoint = applying(history=history)
        except HistoryNeededError:  # an episode it fails instead, inside a critical section, maybe: rare
            checkpoint = applying(history=await self._backend.get_history(item.instance_id))
        if self.eager is None:
            committed = await self._commit(item, checkpoint)
            self._runner.finished(item, checkpoint, committed is not CommitResult.LOST)
            return
        await self._commit_episodes(self.eager, item, started, checkpoint, outcome.awaited)

    def _lease_ran_out(self, item: OrchestrationWorkItem) -> bool:
        """Whether ``item``'s lease has run out by the store's clock."""
        return item.locked_until <= self._backend.now()

    async def _commit_episodes(
        self,
        lane: EagerLane,
        item: OrchestrationWorkItem,
        started: ExecutionStarted,
        checkpoint: OrchestrationCheckpoint,
        awaited: int | None,
    ) -> None:
        """Commit ``checkpoint``, then go on with eager episodes while the lease is kept.

        The first episode's new events all came from the store (nothing uncommitted feeds
        it), so its eager activity runs ahead: before the first commit, which then also
        holds its result and the episode that follows. Later activities run after the
        commit that schedules them.
        """
        # An eager activity runs ahead only while the lease holds by the clock for its window and the
        # commit after it (twice the window, at most two thirds of a fresh lease): a process stopped
        # (SIGSTOP, a paused VM) near or past its end would find that another worker has run the
        # episode, and the activity; the queues run it once.
        left = item.locked_until - self._backend.now()
        eager = lane.claim(checkpoint, awaited) if left.total_seconds() >= 2 * lane.window else None
        ran: TaskCompleted | TaskFailed | None = None  # the eager activity's result, if it ran ahead
        following: _Following | None = None
        if eager is not None:
            ahead = await self._run_ahead(lane, item, started, checkpoint, eager)
            if not isinstance(ahead, tuple):  # a chain on the activity thread went on from here
                if ahead is not None:
                    await self._go_on(lane, started, ahead.item, ahead.eager, ahead.ran, ahead.following)
                return
            ran, following = ahead
            if ran is None:  # it outlasted the window: it goes on as ordinary work
                checkpoint.keep_lease_for = None
            elif isinstance(following, tuple):
                merged = merge_checkpoints(checkpoint, following[0], eager.lock_token)
                if merged is not None:
                    checkpoint, awaited = merged, following[1]
                    eager, ran, following = lane.claim(checkpoint, awaited), None, None
        kept = await self._commit_keeping(lane, item, checkpoint, eager, ran, None)
        if kept is None:
            return
        assert eager is not None
        item = kept
        if ran is None:
            step = await self._step(lane, item, started, eager)
            if step is None:
                return
            item, eager, ran, following = step
        await self._go_on(lane, started, item, eager, ran, following)

    async def _go_on(
        self,
        lane: EagerLane,
        started: ExecutionStarted,
        item: OrchestrationWorkItem,
        eager: ActivityWorkItem,
        ran: TaskCompleted | TaskFailed,
        following: _Following | None,
    ) -> None:
        """The eager chain after ``item``'s kept lease, from the claim ``eager`` whose activity
        ran (``ran``), and the episode that its result started (``following``)."""
        while True:
            if not isinstance(following, tuple):
                self._runner.finished(item, None, False)
                await lane.deliver(eager, ran)
                retry_at = following.retry_at(self._backend.now()) if following is not None else None
                await self._backend.abandon_orchestration_work_item(item, retry_at=retry_at)
                return
            checkpoint, awaited = following
            checkpoint.finished_tasks.append(eager.lock_token)
            recorded = (eager, ran)
            claimed = lane.claim(checkpoint, awaited)
            kept = await self._commit_keeping(lane, item, checkpoint, claimed, None, recorded)
            if kept is None:
                return
            assert claimed is not None
            step = await self._step(lane, kept, started, claimed)
            if step is None:
                return
            item, eager, ran, following = step

    async def _commit_keeping(
        self,
        lane: EagerLane,
        item: OrchestrationWorkItem,
        checkpoint: OrchestrationCheckpoint,
        eager: ActivityWorkItem | None,
        ran: TaskCompleted | TaskFailed | None,
        recorded: tuple[ActivityWorkItem, TaskCompleted | TaskFailed] | None,
    ) -> OrchestrationWorkItem | None:
        """Commit ``checkpoint``, which queued the claim ``eager`` (whose result is ``ran`` if
        it ran ahead) and holds the eager result ``recorded``: the work item after it if the
        chain goes on (the lease was kept: ``eager``'s activity is to run next), else ``None``."""
        committing_at = self._backend.now()  # the kept lease runs from the commit's start, or later
        try:
            result = await self._commit(item, checkpoint)
        except BaseException:
            if eager is not None:
                lane.drop(eager)
            if eager is not None and ran is not None:  # its activity ran ahead of this commit, which queues it
                self._doubt(item, (eager, ran), None)
            else:
                self._doubt(item, recorded, eager)
            raise
        if ran is None or result is CommitResult.LOST:
            self._runner.finished(item, checkpoint, result is not CommitResult.LOST)
        # Else its activity ran ahead, and the episode that follows: the runner went on from
        # this checkpoint then (_going_on), and the commit of that episode settles the rest.
        if not await self._lease_kept(lane, item, result, eager, ran, recorded):
            return None
        return _continued(item, checkpoint, committing_at)

    async def _lease_kept(
        self,
        lane: EagerLane,
        item: OrchestrationWorkItem,
        result: CommitResult,
        eager: ActivityWorkItem | None,
        ran: TaskCompleted | TaskFailed | None,
        recorded: tuple[ActivityWorkItem, TaskCompleted | TaskFailed] | None,
    ) -> bool:
        """After a commit (``result``) that queued the claim ``eager`` and held the eager result
        ``recorded``: whether the chain goes on (the lease was kept); if not, the queues take
        over what is left."""
        if result is CommitResult.LOST:
            if recorded is not None:
                await lane.deliver(*recorded)
            if eager is not None:
                lane.drop(eager)
            return False
        if eager is None:
            return False
        if result is CommitResult.COMMITTED:  # messages wait, or the activity is slow: the queues take over
            if ran is None:
                lane.hand_over(eager)
                return False
            self._runner.finished(item, None, False)  # it ran ahead of what is committed: replay
            await lane.deliver(eager, ran)
            return False
        return True

    async def _run_ahead(
        self,
        lane: EagerLane,
        item: OrchestrationWorkItem,
        started: ExecutionStarted,
        checkpoint: OrchestrationCheckpoint,
        eager: ActivityWorkItem,
    ) -> tuple[TaskCompleted | TaskFailed | None, _Following | None] | Stepped | None:
        """Run the claimed activity ahead of ``checkpoint``'s commit, and the episode its result
        starts: its result (``None``: it outlasted the window) and that episode. Or, run on the
        activity's thread, the chain went on from there: where it stopped (``None``: the queues
        took over)."""
        chain = self._thread_chain(lane, item, eager, checkpoint)
        if chain is None:
            ran = await lane.run(eager)
            return ran, None if ran is None else await self._follow(item, checkpoint, started, ran)
        end = await self._run_chain(chain, started)
        if isinstance(end, Taken):  # it outlasted the window ahead of the commit: it goes on as ordinary work
            return None, None
        if isinstance(end, RanAhead):
            return end.ran, end.following
        return end

    async def _step(
        self, lane: EagerLane, item: OrchestrationWorkItem, started: ExecutionStarted, eager: ActivityWorkItem
    ) -> tuple[OrchestrationWorkItem, ActivityWorkItem, TaskCompleted | TaskFailed, _Following] | None:
        """Run the claimed activity and the episode its result starts, after ``item``'s kept
        lease: the work item as it then stands, the claim that ran, its result and the episode.
        ``None`` when the queues took over meanwhile (the activity outlasted the window)."""
        if self._lease_ran_out(item):  # another worker may have run it by now: the queues have it
            lane.drop(eager)
            return None
        chain = self._thread_chain(lane, item, eager, None)
        if chain is None:
            ran = await lane.run(eager)
            if ran is None:  # it outlasted the window: the lease goes back, the activity goes on
                lane.hand_over(eager)
                await self._backend.abandon_orchestration_work_item(item)
                return None
            return item, eager, ran, await self._follow(item, None, started, ran)
        end = await self._run_chain(chain, started)
        assert not isinstance(end, RanAhead | Taken)
        return None if end is None else (end.item, end.eager, end.ran, end.following)

    def _thread_chain(
        self,
        lane: EagerLane,
        item: OrchestrationWorkItem,
        eager: ActivityWorkItem,
        pending: OrchestrationCheckpoint | None,
    ) -> ThreadChain | None:
        """A chain on the activity thread from the claim ``eager`` on, if it can run there."""
        if self._chain_runner is None or not lane.runs_here(eager.task.event.name) or not lane.alone():
            return None
        return ThreadChain(lane, item, eager, pending)

    async def _run_chain(self, chain: ThreadChain, started: ExecutionStarted) -> Stepped | RanAhead | Taken | None:
        """Run ``chain`` until it stops: where the processor goes on from (its claim's slot given
        back), or ``None`` if the chain has settled the work item (or the queues took over).
        :class:`Taken` only while the chain runs ahead of its first commit."""
        assert self._chain_runner is not None
        lane = chain.lane
        end = await chain.run(partial(self._steps_here, self._chain_runner, started))
        if chain.ran_out:  # what ran since the last commit (an episode run ahead of it) is forgotten
            self._runner.finished(chain.item, None, False)
            return None
        if isinstance(end, Settled):
            if end.claimed is None:
                lane.finish(chain.eager)
            await self._lease_kept(lane, chain.item, end.result, end.claimed, None, end.recorded)
            return None
        if isinstance(end, Taken) and chain.pending is None:  # the lease goes back, the activity goes on
            lane.hand_over(chain.eager)
            await self._backend.abandon_orchestration_work_item(chain.item)
            return None
        if isinstance(end, Stepped | RanAhead):
            lane.finish(chain.eager)
        return end

    def _steps_here(
        self, runner: LocalRunner, started: ExecutionStarted, chain: ThreadChain, loop: asyncio.AbstractEventLoop
    ) -> ChainEnd:
        """The steps of a chain on its activity's thread, for as long as each is the plain case:
        a sync activity, its episode, and a commit that keeps the lease for the next one."""
        lane = chain.lane
        while True:
            pending = chain.pending
            item, eager = chain.item, chain.eager
            ran = chain.run_activity(loop)
            if ran is None:
                return None  # taken over by the loop, or stopped
            following = self._follow_here(runner, item, pending, started, ran)
            stop = RanAhead(ran, following) if pending is not None else Stepped(item, eager, ran, following)
            if not isinstance(following, tuple) or not lane.alone() or not self._backend.can_commit_blocking():
                return stop
            checkpoint, awaited = following
            recorded: tuple[ActivityWorkItem, TaskCompleted | TaskFailed] | None = (eager, ran)
            if pending is not None:
                merged = merge_checkpoints(pending, checkpoint, eager.lock_token)
                if merged is None:
                    return stop
                checkpoint, recorded = merged, None
            task = lane.eager_task(checkpoint, awaited)
            if task is not None and not lane.runs_here(task.event.name):
                return stop
            claimed = chain.claim(checkpoint, awaited) if task is not None else None
            if task is not None and claimed is None:  # the chain was stopped meanwhile
                return None
            if recorded is not None:
                checkpoint.finished_tasks.append(eager.lock_token)
            committing_at = self._backend.now()  # the kept lease runs from the commit's start, or later
            try:
                result = self._commit_here(item, checkpoint, loop)
            except BaseException:
                self._doubt(item, recorded, claimed)
                raise
            _log_lost(item, result)
            runner.finished(item, checkpoint, result is not CommitResult.LOST)
            if result is not CommitResult.LEASE_KEPT:
                return Settled(result, recorded, claimed)
            chain.stepped(_continued(item, checkpoint, committing_at))

    def _commit_here(
        self, item: OrchestrationWorkItem, checkpoint: OrchestrationCheckpoint, loop: asyncio.AbstractEventLoop
    ) -> CommitResult:
        """Commit ``checkpoint`` on this thread, a chain's; one the store refuses fails the
        instance instead, as :meth:`_commit` does (on ``loop``)."""
        try:
            return self._backend.complete_orchestration_work_items_blocking([checkpoint])[0]
        except UnstorableValueError:
            return asyncio.run_coroutine_threadsafe(self._commit(item, checkpoint), loop).result()

    def _follow_here(
        self,
        runner: LocalRunner,
        item: OrchestrationWorkItem,
        uncommitted: OrchestrationCheckpoint | None,
        started: ExecutionStarted,
        result: TaskCompleted | TaskFailed,
    ) -> _Following:
        """:meth:`_follow`, on the calling thread."""
        item = self._going_on(item, uncommitted)
        if runner.cached_start(item) is None:
            return Abandon()
        now, new_events = self._episode_of(result)
        return _followed(item, started, new_events, runner.run_here(item, started, None, new_events), now)

    async def _follow(
        self,
        item: OrchestrationWorkItem,
        uncommitted: OrchestrationCheckpoint | None,
        started: ExecutionStarted,
        result: TaskCompleted | TaskFailed,
    ) -> _Following:
        """The episode an eager activity's result starts, after ``item``'s checkpoint
        (``uncommitted``, when it has not been committed yet), with what it then awaits."""
        item = self._going_on(item, uncommitted)
        if self._runner.cached_start(item) is None:  # no live orchestration to go on with (evicted, no cache)
            return Abandon()
        now, new_events = self._episode_of(result)
        outcome = await self._runner.run(item, started, None, new_events)
        return _followed(item, started, new_events, outcome, now)

    def _episode_of(self, result: TaskCompleted | TaskFailed) -> tuple[datetime, list[HistoryEvent]]:
        """When the episode that an eager activity's ``result`` starts begins (the hub's time), and its new events."""
        now = self._backend.now()
        return now, [OrchestratorStarted(timestamp=now), result]

    def _going_on(
        self, item: OrchestrationWorkItem, uncommitted: OrchestrationCheckpoint | None
    ) -> OrchestrationWorkItem:
        """The work item to run the next episode on: after ``uncommitted``, if given (it will be
        committed with that episode)."""
        if uncommitted is None:
            return item
        self._runner.finished(item, uncommitted, True)  # the live orchestration goes on from there
        return _continued(item, uncommitted, self._backend.now())

    async def release(self, item: OrchestrationWorkItem, retry_after: timedelta | None = None) -> None:
        """Give the work item back after a failure or at shutdown (to be offered again after
        ``retry_after``; ``None``: at once).

        After an eager step whose commit may or may not have gone through, the step's eager
        tasks would otherwise wait for their leases to expire: the result it recorded is
        delivered (if the step was not committed, its activity's task is still leased to
        this worker and the result goes to the inbox; if it was, that lease is gone and the
        delivery changes nothing), and the task it queued is given back (which changes
        nothing unless the step was committed). All of it is safe to try again.
        """
        self._runner.finished(item, None, False)
        in_doubt = self._in_doubt.get(item.instance_id)
        if in_doubt is not None:
            recorded, queued = in_doubt
            if recorded is not None and self.eager is not None:
                await self.eager.deliver(*recorded)
            if queued is not None:
                await self._backend.abandon_activity_work_item(queued)
            del self._in_doubt[item.instance_id]
        retry_at = Abandon(retry_after).retry_at(self._backend.now())
        await self._backend.abandon_orchestration_work_item(item, retry_at=retry_at)

    def _doubt(
        self,
        item: OrchestrationWorkItem,
        recorded: tuple[ActivityWorkItem, TaskCompleted | TaskFailed] | None,
        queued: ActivityWorkItem | None,
    ) -> None:
        """An eager step's commit failed: note what :meth:`release` is to settle."""
        if recorded is not None or queued is not None:
            self._in_doubt[item.instance_id] = (recorded, queued)

    async def _commit(self, item: OrchestrationWorkItem, checkpoint: OrchestrationCheckpoint) -> CommitResult:
        try:
            result = await self._committer.commit(checkpoint)
        except UnstorableValueError as error:  # it would be refused every time the episode ran
            logger.warning("Instance %s: the store refused its episode (%s); failing it", item.instance_id, error)
            history = await self._backend.get_history(item.instance_id)
            started = self._runner.cached_start(item) or _find_start(
                # The execution's own start: one that continues it as new comes after it.
                [*history, *(message.event for message in item.messages), *checkpoint.new_history]
            )
            if started is None:
                raise
            failed = unstorable_checkpoint(item, checkpoint, started, error, self._backend.now(), history)
            result = await self._committer.commit(failed)
        _log_lost(item, result)
        return result


_InDoubt = tuple[tuple[ActivityWorkItem, TaskCompleted | TaskFailed] | None, ActivityWorkItem | None]
"""An eager step whose commit's outcome is unknown: the eager result it recorded, the eager task it queued."""


def _followed(
    item: OrchestrationWorkItem,
    started: ExecutionStarted,
    new_events: list[HistoryEvent],
    outcome: EpisodeOutcome | Abandon,
    now: datetime,
) -> _Following:
    """The checkpoint of an episode that follows an eager activity, with what it then awaits."""
    if isinstance(outcome, Abandon):
        return outcome
    try:
        checkpoint = apply_actions(item, started, new_events, outcome.actions, outcome.custom_status, [], now)
    except HistoryNeededError:  # the episode is run again from the history, as ordinary work
        return Abandon()
    return checkpoint, outcome.awaited


def _log_lost(item: OrchestrationWorkItem, result: CommitResult) -> None:
    if result is CommitResult.LOST:
        logger.warning("Instance %s: the lease was lost before the episode could be committed", item.instance_id)


def _continued(
    item: OrchestrationWorkItem, checkpoint: OrchestrationCheckpoint, now: datetime
) -> OrchestrationWorkItem:
    """The work item as it stands once ``checkpoint`` is committed with the lease kept, ``now``."""
    assert checkpoint.keep_lease_for is not None
    return OrchestrationWorkItem(
        instance_id=item.instance_id,
        lock_token=item.lock_token,
        locked_until=now + checkpoint.keep_lease_for,
        state=checkpointed_state(item.state, checkpoint),
        messages=[],
        history_size=checkpoint.history_size_after(item.history_size),
    )


def _find_start(events: Sequence[HistoryEvent]) -> ExecutionStarted | None:
    return next((event for event in events if isinstance(event, ExecutionStarted)), None)


def version_failure(versioning: VersioningOptions | None, version: str | None) -> FailureDetails | None:
    """Why ``versioning`` refuses an orchestration of ``version``, or ``None``."""
    if versioning is None or versioning.match_strategy is VersionMatchStrategy.NONE:
        return None
    comparison = compare_versions(version, versioning.version)
    orchestration = (
        "The orchestration, which has no version," if version is None else f"The orchestration version '{version}'"
    )
    if versioning.match_strategy is VersionMatchStrategy.STRICT and comparison != 0:
        message = f"{orchestration} does not match the worker version '{versioning.version}'."
    elif versioning.match_strategy is VersionMatchStrategy.CURRENT_OR_OLDER and comparison > 0:
        message = f"{orchestration} is greater than the worker version '{versioning.version}'."
    else:
        return None
    return FailureDetails(error_type=VERSION_MISMATCH, message=message, is_non_retriable=True)


def _log_failure(item: OrchestrationWorkItem, checkpoint: OrchestrationCheckpoint, *, ran: bool) -> None:
    """Log an execution that ``checkpoint`` (committed) failed: at INFO when its code failed it,
    as the SDK's worker does, and as a WARNING when none of its code could run (an orchestrator
    this worker does not have, a version it may not run), which a deploy should mend."""
    details = checkpoint.failure_details
    if checkpoint.status is OrchestrationStatus.FAILED and details is not None:
        level = logging.INFO if ran else logging.WARNING
        logger.log(level, "Instance %s (%s) failed: %s", item.instance_id, item.state.name, details)


def _ending_without_the_code(
    item: OrchestrationWorkItem,
    ending: EpisodeOutcome,
    past_events: Sequence[HistoryEvent] | None,
    new_events: Sequence[HistoryEvent],
) -> EpisodeOutcome:
    """``ending``, which ends the execution without its code, and the unlocks of the critical
    section it was in, which its code would have sent as it ended."""
    history = [*(past_events or ()), *new_events]
    releases = releases_of_open_sections(history, item.instance_id, new_events[0].timestamp)
    return EpisodeOutcome([*releases, *ending.actions], ending.custom_status)


def failed_episode(details: FailureDetails) -> EpisodeOutcome:
    """An episode that fails the orchestration with ``details``."""
    return EpisodeOutcome(
        [CompleteOrchestration(id=-1, status=OrchestrationStatus.FAILED, failure_details=details)], None
    )


class LocalRunner:
    """Runs registered Python orchestrators, keeping them live between episodes.

    Thread-safe: an eager chain runs episodes on an activity thread (:mod:`dtfx.worker.chains`)
    while the event loop runs others.
    """

    def __init__(
        self,
        registry: Registry,
        converter: DataConverter,
        *,
        cache_capacity: int,
        versioning: VersioningOptions | None = None,
        reject_retry_delay: timedelta = timedelta(seconds=1),
    ) -> None:
        self._registry = registry
        self._converter = converter
        self._cache = InstanceCache[CachedExecution](cache_capacity)
        self._versioning = versioning
        self._reject_retry_delay = reject_retry_delay
        self._running: dict[str, CachedExecution] = {}
        self._rejected: dict[str, None] = {}
        """The instances left to other workers for their version, the latest last: each is said
        once as a warning (it is offered again every ``reject_retry_delay``)."""
        self._lock = threading.Lock()
        """Guards the cache, ``_running`` and ``_rejected`` (never held while orchestrator code runs)."""

    @property
    def cache(self) -> InstanceCache[CachedExecution]:
        """The live orchestrations."""
        return self._cache

    def _newly_rejected(self, instance_id: str) -> bool:
        """Note that the instance is left to other workers; whether it was not already (of the
        last :data:`_REJECTED_REMEMBERED`)."""
        with self._lock:
            if instance_id in self._rejected:
                return False
            remember_latest(self._rejected, instance_id, None, _REJECTED_REMEMBERED)
            return True

    def cached_start(self, item: OrchestrationWorkItem) -> ExecutionStarted | None:
        with self._lock:
            entry = self._cache.lookup(item)
        return entry.started if entry is not None else None

    async def run(
        self,
        item: OrchestrationWorkItem,
        started: ExecutionStarted,
        past_events: Sequence[HistoryEvent] | None,
        new_events: list[HistoryEvent],
    ) -> EpisodeOutcome | Abandon:
        return self.run_here(item, started, past_events, new_events)

    def run_here(
        self,
        item: OrchestrationWorkItem,
        started: ExecutionStarted,
        past_events: Sequence[HistoryEvent] | None,
        new_events: list[HistoryEvent],
    ) -> EpisodeOutcome | Abandon:
        """:meth:`run`, on the calling thread (orchestrator code never waits for anything)."""
        failure = version_failure(self._versioning, started.version)
        if failure is not None:
            assert self._versioning is not None
            terminate = termination(new_events)
            if terminate is not None:  # needs none of the orchestrator's code, which this worker may not run
                end = CompleteOrchestration(id=-1, status=OrchestrationStatus.TERMINATED, result=terminate.input)
                return _ending_without_the_code(item, EpisodeOutcome([end], None), past_events, new_events)
            if self._versioning.failure_strategy is VersionFailureStrategy.REJECT:
                level = logging.WARNING if self._newly_rejected(item.instance_id) else logging.DEBUG
                logger.log(level, "Instance %s: %s Leaving it to another worker.", item.instance_id, failure.message)
                return Abandon(self._reject_retry_delay)
            return _ending_without_the_code(item, failed_episode(failure), past_events, new_events)

        with self._lock:
            entry = self._cache.take(item) if past_events is None else None
        if entry is None:
            if past_events is None:  # gone since cached_start said otherwise (evicted, or run meanwhile): replay
                return Abandon()
            orchestrator = self._registry.orchestrators.get(started.name)
            if orchestrator is None:
                missing = FailureDetails.from_exception(NotRegisteredError("orchestrator", started.name))
                return _ending_without_the_code(item, failed_episode(missing), past_events, new_events)
            default_version = self._versioning.default_version if self._versioning else None
            executor = OrchestrationExecutor(
                orchestrator, item.instance_id, converter=self._converter, default_version=default_version
            )
            executor.replay(past_events or [])
            entry = CachedExecution(executor, started, item.state.execution_id, item.history_size)
        with self._lock:
            self._running[item.instance_id] = entry
        actions = entry.executor.execute(new_events)
        return EpisodeOutcome(actions, entry.executor.context.custom_status, entry.executor.only_awaited_task)

    def finished(
        self, item: OrchestrationWorkItem, checkpoint: OrchestrationCheckpoint | None, committed: bool
    ) -> None:
        with self._lock:
            entry = self._running.pop(item.instance_id, None)
            if entry is not None and checkpoint is not None and committed:
                self._cache.keep(item, entry, checkpoint, ended=entry.executor.is_complete)
            else:
                self._cache.evict(item.instance_id)
        if checkpoint is None or not committed:
            return
        _log_failure(item, checkpoint, ran=entry is not None)
        if entry is None:  # no orchestrator code ran
            ended_unrun(checkpoint)
            return
        execution_ended(entry.started, checkpoint)
        episode_traced(entry.started, item.instance_id, entry.executor.take_traced())
