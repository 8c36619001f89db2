"""The generic work-item dispatcher: concurrency, back-off, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest

from dtfx.core.errors import BackendUnavailableError
from dtfx.worker.dispatcher import Backoff, WorkItemDispatcher


class Recorder:
    """Fake work: a queue of items, with a record of what happened to each."""

    def __init__(self, items: int, *, work: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.pending = list(range(items))
        self.processed: list[int] = []
        self.released: list[int] = []
        self.retry_afters: list[timedelta | None] = []
        self.fetch_sizes: list[int] = []
        self.running = 0
        self.peak = 0
        self._work = work
        self.idle = asyncio.Event()
        self.fetch_errors: list[Exception] = []
        """Errors the next fetches raise, in order, before fetches go through again."""

    async def fetch(self, count: int) -> list[int]:
        if self.fetch_errors:
            raise self.fetch_errors.pop(0)
        self.fetch_sizes.append(count)
        batch, self.pending = self.pending[:count], self.pending[count:]
        return batch

    async def process(self, item: int) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self._work is not None:
                await self._work(item)
            else:
                await asyncio.sleep(0.01)
            self.processed.append(item)
        finally:
            self.running -= 1

    async def release(self, item: int, retry_after: timedelta | None = None) -> None:
        self.released.append(item)
        self.retry_afters.append(retry_after)

    async def wait_for_work(self) -> None:
        self.idle.set()
        await asyncio.sleep(0.01)

    def dispatcher(self, **options: object) -> WorkItemDispatcher[int]:
        settings: dict[str, object] = {"max_concurrent": 3, "backoff_initial": 0.01, "backoff_max": 0.05}
        settings.update(options)
        return WorkItemDispatcher(
            "test",
            fetch=self.fetch,
            process=self.process,
            release=self.release,
            wait_for_work=self.wait_for_work,
            describe=str,
            **settings,  # type: ignore[arg-type]
        )


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def test_concurrency_is_bounded_and_fetches_ask_for_free_slots_only() -> None:
    recorder = Recorder(20)
    dispatcher = recorder.dispatcher(max_concurrent=3)
    dispatcher.start()
    await until(lambda: len(recorder.processed) == 20)
    await dispatcher.stop(1)
    assert recorder.peak == 3
    assert max(recorder.fetch_sizes) == 3
    assert sorted(recorder.processed) == list(range(20))
    assert recorder.released == []


async def test_several_fetch_loops_share_the_limit() -> None:
    recorder = Recorder(30)
    dispatcher = recorder.dispatcher(max_concurrent=4, dispatcher_count=3)
    dispatcher.start()
    await until(lambda: len(recorder.processed) == 30)
    await dispatcher.stop(1)
    assert recorder.peak <= 4 + 2  # each loop checks the free slots before it fetches
    assert sorted(recorder.processed) == list(range(30))


async def test_fetch_errors_back_off_and_recover() -> None:
    recorder = Recorder(5)
    recorder.fetch_errors = [ConnectionError("database away")] * 3
    dispatcher = recorder.dispatcher()
    dispatcher.start()
    await until(lambda: len(recorder.processed) == 5)
    await dispatcher.stop(1)
    assert recorder.fetch_errors == []


@pytest.mark.parametrize(
    ("error", "traceback"),
    [(BackendUnavailableError("Cannot connect to PostgreSQL: refused"), False), (ValueError("a bug"), True)],
    ids=["store away", "unexpected"],
)
async def test_a_failed_fetch_logs_the_store_being_away_in_one_line_and_anything_else_with_its_traceback(
    caplog: pytest.LogCaptureFixture, error: Exception, traceback: bool
) -> None:
    recorder = Recorder(1)
    recorder.fetch_errors = [error]
    dispatcher = recorder.dispatcher()
    dispatcher.start()
    await until(lambda: recorder.processed == [0])
    await dispatcher.stop(1)
    [record] = [record for record in caplog.records if "fetching work items failed" in record.getMessage()]
    assert (record.exc_info is not None) is traceback
    assert (str(error) in record.getMessage()) is not traceback  # the traceback says it otherwise


async def test_a_failed_work_item_is_released_and_the_dispatcher_carries_on() -> None:
    async def work(item: int) -> None:
        if item == 2:
            raise RuntimeError("bad item")

    recorder = Recorder(6, work=work)
    dispatcher = recorder.dispatcher()
    dispatcher.start()
    await until(lambda: len(recorder.processed) == 5)
    await dispatcher.stop(1)
    assert recorder.released == [2]
    assert recorder.retry_afters == [timedelta(seconds=0.01)]  # offered again after its back-off
    assert sorted(recorder.processed) == [0, 1, 3, 4, 5]


async def test_a_work_item_that_keeps_failing_backs_off_alone_and_holds_back_no_other() -> None:
    """A poison instance: its back-off grows with its failures; the rest of the work flows."""
    offered_again: list[int] = []

    async def work(item: int) -> None:
        if item == 0:
            raise RuntimeError("poison")

    recorder = Recorder(0, work=work)
    recorder.pending = [0]
    fetch = recorder.fetch
    fresh = iter(range(1, 1000))

    async def fetch_again(count: int) -> list[int]:  # the poison item comes back at once, with new work
        if recorder.released:
            offered_again.append(recorder.released.pop())
            recorder.pending.append(0)
        recorder.pending.append(next(fresh))
        return await fetch(count)

    recorder.fetch = fetch_again  # type: ignore[method-assign]
    dispatcher = recorder.dispatcher(backoff_initial=10.0, backoff_max=40.0)
    dispatcher.start()
    await until(lambda: len(offered_again) >= 3 and len(recorder.processed) >= 20)
    await dispatcher.stop(1)
    assert recorder.retry_afters[:3] == [timedelta(seconds=s) for s in (10, 20, 40)]  # the item's own back-off
    assert 0 not in recorder.processed  # and none of the others waited for it


def _releases_refused(recorder: Recorder, refusals: int, error: Exception) -> list[int]:
    """Make the recorder's first ``refusals`` releases fail with ``error``; the list of attempts."""
    attempts: list[int] = []
    release = recorder.release

    async def refusing_release(item: int, retry_after: timedelta | None = None) -> None:
        attempts.append(item)
        if len(attempts) <= refusals:
            raise error
        await release(item, retry_after)

    recorder.release = refusing_release  # type: ignore[method-assign]
    return attempts


async def _store_lost_during_commit(item: int) -> None:
    raise BackendUnavailableError("PostgreSQL connection failed: server closed the connection unexpectedly")


async def test_a_failed_work_item_is_released_once_the_store_can_be_reached_again() -> None:
    # A database restart fails the work item's commit and its release alike: the release is
    # tried again, so that the item need not wait for its lease to expire.
    recorder = Recorder(1, work=_store_lost_during_commit)
    attempts = _releases_refused(recorder, 3, BackendUnavailableError("the database system is starting up"))
    dispatcher = recorder.dispatcher()
    dispatcher.start()
    await until(lambda: recorder.released == [0])
    await dispatcher.stop(1)
    assert attempts == [0, 0, 0, 0]


async def test_work_items_failed_by_the_store_being_away_do_not_hold_back_the_next_fetch() -> None:
    # Failures of the store, which its fetches and releases wait out, are not the items':
    # a restart that fails many items at once does not add up to a long back-off.
    failed: set[int] = set()

    async def work(item: int) -> None:
        if item not in failed:
            failed.add(item)
            await _store_lost_during_commit(item)

    recorder = Recorder(6, work=work)
    fetch = recorder.fetch

    async def fetch_again(count: int) -> list[int]:  # a released item is queued again
        recorder.pending.extend(item for item in recorder.released if item not in recorder.pending)
        recorder.released.clear()
        return await fetch(count)

    recorder.fetch = fetch_again  # type: ignore[method-assign]
    dispatcher = recorder.dispatcher(backoff_initial=30.0, backoff_max=30.0)
    dispatcher.start()
    await until(lambda: len(recorder.processed) == 6)
    await dispatcher.stop(1)
    assert sorted(recorder.processed) == list(range(6))


async def test_a_failure_shared_by_the_items_of_one_commit_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    # A group commit that fails hands its one error to each of its items.
    one_commit = BackendUnavailableError("PostgreSQL connection failed: server closed the connection unexpectedly")
    errors = {0: one_commit, 1: one_commit, 2: one_commit, 3: BackendUnavailableError("the next commit failed")}
    gate = asyncio.Event()

    async def work(item: int) -> None:
        await gate.wait()
        raise errors[item]

    recorder = Recorder(4, work=work)
    dispatcher = recorder.dispatcher(max_concurrent=3)
    caplog.set_level("WARNING", logger="dtfx.worker.dispatcher")
    dispatcher.start()
    await until(lambda: recorder.running == 3)
    gate.set()
    await until(lambda: sorted(recorder.released) == [0, 1, 2, 3])
    await dispatcher.stop(1)
    failures = [record.getMessage() for record in caplog.records if "failed (" in record.getMessage()]
    assert len(failures) == 2
    assert "server closed the connection" in failures[0]
    assert "the next commit failed" in failures[1]


@pytest.mark.parametrize("error", [BackendUnavailableError("away"), RuntimeError("a bug")], ids=["patience", "bug"])
async def test_a_release_is_tried_again_no_longer_than_its_patience_and_only_while_the_store_is_away(
    error: Exception,
) -> None:
    recorder = Recorder(2, work=_store_lost_during_commit)
    attempts = _releases_refused(recorder, 1000, error)
    dispatcher = recorder.dispatcher(max_concurrent=1, release_patience=0.1)
    dispatcher.start()
    await until(lambda: len(set(attempts)) == 2)  # the dispatcher went on to the next item
    await dispatcher.stop(1)
    if isinstance(error, BackendUnavailableError):
        assert 2 < attempts.count(0) < 20
    else:
        assert attempts == [0, 1]
    assert recorder.released == []


async def test_items_fetched_during_shutdown_are_released() -> None:
    recorder = Recorder(3)
    fetching = asyncio.Event()
    stopping = asyncio.Event()
    fetch = recorder.fetch

    async def slow_fetch(count: int) -> list[int]:
        fetching.set()
        await stopping.wait()
        return await fetch(count)

    recorder.fetch = slow_fetch  # type: ignore[method-assign]
    dispatcher = recorder.dispatcher()
    dispatcher.start()
    await fetching.wait()
    stopper = asyncio.create_task(dispatcher.stop(1))
    await asyncio.sleep(0)
    stopping.set()
    await stopper
    assert recorder.processed == []
    assert recorder.released == [0, 1, 2]


async def test_graceful_stop_lets_in_flight_work_finish() -> None:
    started = asyncio.Event()

    async def work(item: int) -> None:
        started.set()
        await asyncio.sleep(0.2)

    recorder = Recorder(1, work=work)
    dispatcher = recorder.dispatcher()
    dispatcher.start()
    await started.wait()
    await dispatcher.stop(5)
    assert recorder.processed == [0] and recorder.released == []


async def test_work_still_running_after_the_grace_period_is_cancelled_and_released() -> None:
    started = asyncio.Event()

    async def work(item: int) -> None:
        started.set()
        await asyncio.sleep(60)

    recorder = Recorder(1, work=work)
    dispatcher = recorder.dispatcher()
    dispatcher.start()
    await started.wait()
    await dispatcher.stop(0.05)
    assert recorder.processed == [] and recorder.released == [0]


async def test_stop_waits_for_work_adopted_into_reserved_slots_and_reserves_no_more() -> None:
    recorder = Recorder(0)
    dispatcher = recorder.dispatcher()
    dispatcher.start()
    assert dispatcher.reserve_slot()  # by a client about to hand over a new instance, say
    stopper = asyncio.create_task(dispatcher.stop(5))
    await asyncio.sleep(0.05)
    assert not stopper.done()
    assert not dispatcher.reserve_slot()

    async def slow_release() -> None:
        await asyncio.sleep(0.05)
        recorder.released.append(7)

    dispatcher.adopt(7, slow_release())
    await stopper
    assert recorder.released == [7] and dispatcher.reserved == 0


async def test_stop_waits_for_reserved_slots_no_longer_than_the_grace_period(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(0)
    dispatcher = recorder.dispatcher()
    dispatcher.start()
    assert dispatcher.reserve_slot()
    await asyncio.wait_for(dispatcher.stop(0.05), 2)
    assert dispatcher.reserved == 1
    assert "1 reserved slot(s) still unused at shutdown" in caplog.text


async def test_a_fetch_under_way_at_the_stop_is_waited_for_and_its_items_released() -> None:
    """Cancelled, it could still commit the leases it takes (SQLite's transaction runs on in its
    thread): its items would then wait for their leases to run out."""
    fetching = asyncio.Event()

    async def slow_fetch(count: int) -> list[int]:
        fetching.set()
        await asyncio.sleep(0.2)  # waiting for a lock that another process holds, say
        return [7]

    recorder = Recorder(0)
    dispatcher = recorder.dispatcher()
    dispatcher._fetch = slow_fetch
    dispatcher.start()
    await fetching.wait()
    await dispatcher.stop(0.01)
    assert recorder.released == [7] and recorder.processed == []


async def test_a_fetch_that_the_store_leaves_unanswered_is_given_up_by_the_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that has stopped answering: the stop would wait for it for good."""
    monkeypatch.setattr("dtfx.worker.dispatcher._FETCH_AT_STOP_PATIENCE", 0.05)
    fetching = asyncio.Event()

    async def unanswered(count: int) -> list[int]:
        fetching.set()
        await asyncio.sleep(3600)
        return []

    recorder = Recorder(0)
    dispatcher = recorder.dispatcher()
    dispatcher._fetch = unanswered
    dispatcher.start()
    await fetching.wait()
    await asyncio.wait_for(dispatcher.stop(0.01), 5)


async def test_a_release_at_shutdown_that_the_store_does_not_answer_is_given_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It would wait for a connection as long as the pool's timeout, work item by work item."""
    monkeypatch.setattr("dtfx.worker.dispatcher._RELEASE_AT_STOP_PATIENCE", 0.05)
    started = asyncio.Event()

    async def work(item: int) -> None:
        started.set()
        await asyncio.sleep(3600)

    async def unanswered(item: int, retry_after: timedelta | None = None) -> None:
        await asyncio.sleep(3600)

    recorder = Recorder(2, work=work)
    dispatcher = recorder.dispatcher()
    dispatcher._release = unanswered
    dispatcher.start()
    await started.wait()
    await asyncio.wait_for(dispatcher.stop(0.05), 5)
    assert caplog.text.count("its lease will run out instead") == 2


async def test_dispatchers_stopped_together_share_one_grace_period() -> None:
    """Each has stopped fetching before any of them waits for its work (one after another, each
    would have had a period of its own)."""
    started = [asyncio.Event(), asyncio.Event()]
    stopped_fetching: list[bool] = []
    dispatchers: list[WorkItemDispatcher[int]] = []

    def work_of(index: int) -> Callable[[int], Awaitable[None]]:
        async def work(item: int) -> None:
            started[index].set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                stopped_fetching.append(not any(dispatcher.running for dispatcher in dispatchers))
                raise

        return work

    recorders = [Recorder(1, work=work_of(index)) for index in range(2)]
    dispatchers.extend(recorder.dispatcher() for recorder in recorders)
    for dispatcher in dispatchers:
        dispatcher.start()
    await asyncio.gather(*(event.wait() for event in started))
    await asyncio.wait_for(WorkItemDispatcher.stop_together(dispatchers, 0.05), 5)
    assert stopped_fetching == [True, True]
    assert [recorder.released for recorder in recorders] == [[0], [0]]


async def test_a_cancellation_that_no_stop_made_fails_the_work_item_with_a_back_off() -> None:
    """What a work item's own code cancelled, not the worker: taken up again at once, it would
    fail again at once, for ever."""
    calls = 0

    async def cancelled_by_itself(item: int) -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError  # as a future cancelled on a thread turns up on the loop

    recorder = Recorder(1, work=cancelled_by_itself)
    dispatcher = recorder.dispatcher(backoff_initial=0.5, backoff_max=1)
    dispatcher.start()
    await until(lambda: recorder.released == [0])
    await dispatcher.stop(1)
    assert calls == 1 and recorder.retry_afters == [timedelta(seconds=0.5)]


def test_backoff_doubles_up_to_the_maximum_and_resets_after_successes() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.failed() for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    for _ in range(4):
        backoff.succeeded()
    assert backoff.failed() == pytest.approx(0.5)  # four successes are not enough
    for _ in range(5):
        backoff.succeeded()
    assert backoff.failed() == pytest.approx(0.1)
