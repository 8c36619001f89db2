"""A worker's intake, offered new instances by clients on the worker's loop and on others."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from dtfx.worker.dispatcher import WorkItemDispatcher
from dtfx.worker.intake import NewInstanceIntake
from tests.backends.test_contract import start_event
from tests.worker.test_dispatcher import Recorder, until

T = TypeVar("T")
LEASE = timedelta(seconds=30)


def _intake(recorder: Recorder, dispatcher: WorkItemDispatcher[Any]) -> NewInstanceIntake:
    return NewInstanceIntake(dispatcher, recorder.process, recorder.release, {"orch"}, LEASE)  # type: ignore[arg-type]


async def _on_another_loop(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` run on an event loop of its own, on a thread of its own, as a sync Client runs it."""
    return await asyncio.to_thread(asyncio.run, call())  # type: ignore[arg-type]


async def test_clients_on_other_loops_take_and_give_back_the_workers_slots() -> None:
    recorder = Recorder(0)
    dispatcher = recorder.dispatcher(max_concurrent=1)
    dispatcher.start()
    intake = _intake(recorder, dispatcher)
    start = start_event("a")
    try:

        async def offer_twice_then_decline() -> list[timedelta | None]:
            offers = [intake.offer(start), intake.offer(start)]
            intake.decline()  # the creation of the first was refused, say
            return offers

        assert await _on_another_loop(offer_twice_then_decline) == [LEASE, None]  # one slot
        await asyncio.sleep(0)  # the slot comes back on the worker's loop
        assert dispatcher.reserved == 0

        async def offer_and_accept() -> bool:
            assert intake.offer(start) == LEASE
            return intake.accept(7)  # type: ignore[arg-type]

        assert await _on_another_loop(offer_and_accept) is True
        for _ in range(100):
            if recorder.processed:
                break
            await asyncio.sleep(0.01)
        assert recorder.processed == [7]  # processed by the worker's dispatcher, in its slot
        assert dispatcher.reserved == 0
        assert intake.offer(start_event("b", name="unknown")) is None  # not an orchestrator of this worker
    finally:
        await dispatcher.stop(1)


async def test_an_intake_whose_loop_has_closed_takes_nothing_and_gives_back_what_it_was_offered() -> None:
    recorder = Recorder(0)
    holder: list[NewInstanceIntake] = []

    async def a_worker_whose_loop_ends() -> None:
        dispatcher = recorder.dispatcher(max_concurrent=2)
        dispatcher.start()
        intake = _intake(recorder, dispatcher)
        assert intake.offer(start_event("a")) == LEASE  # just before its loop ends
        holder.append(intake)

    await _on_another_loop(a_worker_whose_loop_ends)
    [intake] = holder
    assert intake.offer(start_event("b")) is None  # its loop has ended
    assert intake.accept(7) is False  # type: ignore[arg-type]  # the creator gives the lease back
    intake.decline()  # nothing to give the slot back to; no error
    assert recorder.processed == recorder.released == []


async def test_an_instance_offered_before_the_worker_stops_is_released_by_the_stop() -> None:
    recorder = Recorder(0)
    dispatcher = recorder.dispatcher(max_concurrent=1)
    dispatcher.start()
    intake = _intake(recorder, dispatcher)

    async def offer_then_accept_during_the_stop() -> bool:
        assert intake.offer(start_event("a")) == LEASE
        while dispatcher.running:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # the creation's commit
        return intake.accept(7)  # type: ignore[arg-type]

    client = asyncio.create_task(_on_another_loop(offer_then_accept_during_the_stop))
    await until(lambda: dispatcher.reserved == 1)
    await dispatcher.stop(5)
    assert recorder.released == [7] and recorder.processed == []  # its lease given back by the stop
    assert await client is True
    assert intake.offer(start_event("b")) is None  # a stopped worker takes nothing more
