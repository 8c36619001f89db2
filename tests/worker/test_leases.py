"""Keeping a work item's lease while it runs (``keep_lease``)."""

from __future__ import annotations

from datetime import timedelta

from dtfx.core.errors import BackendUnavailableError
from dtfx.worker.leases import keep_lease
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
