"""Keeping a work item's lease while it runs (``keep_lease``), and running nothing once it is gone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

import dtfx
from dtfx.core.errors import BackendUnavailableError
from dtfx.core.history import TaskScheduled
from dtfx.core.serialization import JsonDataConverter
from dtfx.core.workitems import ActivityTask, ActivityWorkItem
from dtfx.worker.activities import LocalActivityRunner
from dtfx.worker.leases import keep_lease
from dtfx.worker.orchestrations import Abandon
from dtfx.worker.registry import Registry
from tests.worker.test_dispatcher import until

LEASE = timedelta(milliseconds=300)  # renewed every 100 ms


async def test_a_renewal_that_fails_is_tried_again_and_the_lease_held_meanwhile() -> None:
    answers: list[bool | Exception] = [BackendUnavailableError("the store is away for a moment"), True, True]
    calls = 0

    async def renew() -> bool:
        nonlocal calls
        calls += 1
        answer = answers[min(calls, len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async with keep_lease(renew, LEASE, "Activity a") as lease:
        await until(lambda: calls >= 3)  # one failed, two went through
    assert not lease.lost


async def test_a_lease_that_could_not_be_renewed_for_a_whole_lease_is_lost() -> None:
    async def renew() -> bool:
        raise BackendUnavailableError("the store is away")

    async with keep_lease(renew, LEASE, "Activity a") as lease:
        await until(lambda: lease.lost)


async def test_a_lease_another_worker_took_is_lost_at_once() -> None:
    async def renew() -> bool:
        return False

    async with keep_lease(renew, LEASE, "Activity a") as lease:
        await until(lambda: lease.lost)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_activity_whose_lease_ran_out_by_the_clock_before_it_began_does_not_run(kind: str) -> None:
    """A process stopped past the lease (SIGSTOP, a paused VM) resumes with work whose lease no
    renewal has yet found lost: another worker may have run it and committed its result."""
    ran: list[str] = []

    def sync_activity(ctx: dtfx.ActivityContext, value: str) -> str:
        ran.append(value)
        return value

    async def async_activity(ctx: dtfx.ActivityContext, value: str) -> str:
        ran.append(value)
        return value

    registry = Registry()
    registry.add_activity(sync_activity if kind == "sync" else async_activity, name="act")
    now = datetime(2026, 12, 7, tzinfo=UTC)
    runner = LocalActivityRunner(registry, JsonDataConverter(), thread_pool=None, clock=lambda: now)
    scheduled = TaskScheduled(event_id=1, timestamp=now, name="act", input='"x"')
    for locked_until, value in ((now, "ran out"), (now + timedelta(seconds=1), "holds")):
        task = ActivityTask("i", "e", msgspec.structs.replace(scheduled, input=f'"{value}"'))
        outcome = await runner.run(ActivityWorkItem(None, "token", locked_until, task))
        assert isinstance(outcome, Abandon) == (value == "ran out")
    assert ran == ["holds"]
