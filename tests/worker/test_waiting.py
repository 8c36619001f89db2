"""How an idle dispatcher waits for work (``WorkWaiter``)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

import pytest

import dtfx
from dtfx.backends.base import WorkKind, utc_now
from dtfx.backends.signals import Waiter
from dtfx.worker.waiting import WorkWaiter
from tests.backends.test_contract import LEASE, start_event


class EarlyTimers(Waiter):
    """A waiter whose timeouts end a millisecond early, as an event loop's timer may (uvloop
    counts whole milliseconds); records every timeout it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float] = []

    async def wait(self, timeout: float | None) -> bool:
        assert timeout is not None
        self.timeouts.append(timeout)
        return await super().wait(max(0.0, timeout - 0.001))


async def _work_due_in(milliseconds: int) -> tuple[dtfx.MemoryBackend, EarlyTimers, WorkWaiter]:
    """A backend with an orchestration's work retried in ``milliseconds``, and a waiter for it."""
    backend = dtfx.MemoryBackend()
    await backend.create_instance(start_event("retried"))
    [item] = await backend.lock_orchestration_work_items(1, LEASE)
    await backend.abandon_orchestration_work_item(item, retry_at=utc_now() + timedelta(milliseconds=milliseconds))
    waiter = EarlyTimers()
    return backend, waiter, WorkWaiter(backend, WorkKind.ORCHESTRATION, waiter)


async def test_work_due_later_is_found_when_due_even_if_the_timer_fires_early() -> None:
    backend, waiter, wait_for_work = await _work_due_in(50)
    while True:  # a dispatcher's fetch loop
        wait_for_work.prepare()
        if await backend.lock_orchestration_work_items(1, LEASE):
            break
        time.sleep(0.002)  # the fetch's own time: the due moment passes meanwhile
        await wait_for_work()
        # Had a wait ended before the work was visible, and the moment passed during the
        # fetch, the next wait would be the backend's whole poll interval (5 s here).
        assert max(waiter.timeouts) < backend.poll_interval


async def test_work_that_falls_due_while_the_dispatcher_looks_for_work_is_looked_for_again_at_once() -> None:
    backend, _, wait_for_work = await _work_due_in(30)
    wait_for_work.prepare()
    assert await backend.lock_orchestration_work_items(1, LEASE) == []  # looked before it was due
    time.sleep(0.05)  # and it falls due before the dispatcher waits
    started = time.monotonic()
    await wait_for_work()
    assert time.monotonic() - started < 1  # not the backend's poll interval (5 s)
    wait_for_work.prepare()
    assert await backend.lock_orchestration_work_items(1, LEASE)


@pytest.mark.parametrize("known_here", [True, False])
async def test_work_that_falls_due_while_the_store_is_asked_is_looked_for_again_at_once(
    monkeypatch: pytest.MonkeyPatch, known_here: bool
) -> None:
    """Work this process delayed (``known_here``), or only the store knows of: either way the
    moment passes during the store's answer, and waiting for it would wait a poll interval."""
    backend, _, wait_for_work = await _work_due_in(30)
    if not known_here:
        backend._delayed[WorkKind.ORCHESTRATION].clear()  # as if another process had delayed it
    next_visible_at = backend.next_visible_at

    async def slow_answer(kind: WorkKind) -> datetime | None:
        answer = await next_visible_at(kind)
        await asyncio.sleep(0.06)  # a round trip to a busy server
        return answer

    monkeypatch.setattr(backend, "next_visible_at", slow_answer)
    wait_for_work.prepare()
    assert await backend.lock_orchestration_work_items(1, LEASE) == []  # looked before it was due
    started = time.monotonic()
    await wait_for_work()
    assert time.monotonic() - started < 1  # not the backend's poll interval (5 s)
    wait_for_work.prepare()
    assert await backend.lock_orchestration_work_items(1, LEASE)
