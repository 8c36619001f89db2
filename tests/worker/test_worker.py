"""The worker as a whole: limits, thread pool, failing backends, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from typing import Any

import pytest

import dtfx
from dtfx.backends.base import Backend
from dtfx.backends.memory import MemoryBackend
from dtfx.core.errors import BackendUnavailableError
from dtfx.core.workitems import ActivityWorkItem, OrchestrationWorkItem
from tests.worker.test_dispatcher import until


async def test_activity_concurrency_limit_is_respected() -> None:
    app = dtfx.App()
    running = {"now": 0, "peak": 0}

    @app.activity
    async def slow(ctx: dtfx.ActivityContext, _: Any) -> None:
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        await asyncio.sleep(0.05)
        running["now"] -= 1

    @app.orchestrator
    def fan(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield dtfx.when_all([ctx.call_activity(slow) for _ in range(8)])
        return "done"

    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    concurrency = dtfx.ConcurrencyOptions(maximum_concurrent_activity_work_items=2)
    async with dtfx.Worker(backend, app=app, concurrency=concurrency):
        instance_id = await client.schedule_new_orchestration(fan)
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "done"
    assert running["peak"] == 2


async def test_sync_activities_run_in_the_worker_thread_pool() -> None:
    app = dtfx.App()

    @app.activity
    def where(ctx: dtfx.ActivityContext, _: Any) -> str:
        return threading.current_thread().name

    @app.orchestrator
    def ask(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(where))

    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    async with dtfx.Worker(backend, app=app):
        instance_id = await client.schedule_new_orchestration(ask)
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output().startswith("dtfx-activity")


class FlakyBackend(MemoryBackend):
    """Fails the first few orchestration fetches, as a database that is briefly away would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def lock_orchestration_work_items(self, *args: Any, **kwargs: Any) -> list[OrchestrationWorkItem]:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database unavailable")
        return await super().lock_orchestration_work_items(*args, **kwargs)


async def test_worker_backs_off_after_fetch_errors_and_carries_on() -> None:
    app = dtfx.App()

    @app.orchestrator
    def simple(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return "ok"

    backend = FlakyBackend(failures=3)
    client = dtfx.AsyncClient(backend)
    options = dtfx.WorkerOptions(backoff_initial=timedelta(milliseconds=10))
    instance_id = await client.schedule_new_orchestration(simple)  # before the worker: it must fetch it
    async with dtfx.Worker(backend, app=app, options=options):
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "ok"
    assert backend.failures == 0


@pytest.mark.parametrize("committed", [False, True], ids=["not committed", "committed"])
async def test_an_activity_result_whose_commit_is_in_doubt_is_committed_again_and_the_activity_not_run_again(
    committed: bool,
) -> None:
    class InDoubt(MemoryBackend):
        """The first activity completion fails as if the connection dropped around its commit."""

        failed = False

        async def complete_activity_work_items(self, results: Any) -> list[bool]:
            if self.failed:
                return await super().complete_activity_work_items(results)
            self.failed = True
            if committed:
                await super().complete_activity_work_items(results)
            raise BackendUnavailableError("the connection dropped during the commit")

    app = dtfx.App()
    runs: list[int] = []

    @app.activity
    def square(ctx: dtfx.ActivityContext, n: int) -> int:
        runs.append(n)
        return n * n

    @app.orchestrator
    def squares(ctx: dtfx.OrchestrationContext, count: int) -> Any:  # in parallel: no eager activities
        return (yield dtfx.when_all([ctx.call_activity(square, input=n) for n in range(count)]))

    backend = InDoubt()
    client = dtfx.AsyncClient(backend)
    options = dtfx.WorkerOptions(lease_duration=timedelta(hours=1))  # no lease expires here
    async with dtfx.Worker(backend, app=app, options=options):
        instance_id = await client.schedule_new_orchestration(squares, input=3)
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == [0, 1, 4]
    assert sorted(runs) == [0, 1, 2]


async def test_worker_locks_no_more_than_its_fetch_batch_size_at_once(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """There is room for hundreds of episodes, yet each lock asks for 2 at most."""
    app = dtfx.App()

    @app.orchestrator
    def quick(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return "ok"

    asked: list[int] = []
    lock = backend.lock_orchestration_work_items

    async def counting_lock(count: int, *args: Any, **kwargs: Any) -> list[OrchestrationWorkItem]:
        asked.append(count)
        return await lock(count, *args, **kwargs)

    monkeypatch.setattr(backend, "lock_orchestration_work_items", counting_lock)
    client = dtfx.AsyncClient(backend)
    instance_ids = [await client.schedule_new_orchestration(quick) for _ in range(5)]
    async with dtfx.Worker(backend, app=app, options=dtfx.WorkerOptions(fetch_batch_size=2)):
        for instance_id in instance_ids:
            state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
            assert state is not None and state.get_output() == "ok"
    assert max(asked) == 2


async def test_stop_lets_a_running_activity_finish_and_commit() -> None:
    app = dtfx.App()
    started = asyncio.Event()

    @app.activity
    async def slow(ctx: dtfx.ActivityContext, _: Any) -> str:
        started.set()
        await asyncio.sleep(0.2)
        return "finished"

    @app.orchestrator
    def one(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(slow))

    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    worker = dtfx.Worker(backend, app=app)
    await worker.start_async()
    instance_id = await client.schedule_new_orchestration(one)
    await started.wait()
    await worker.stop_async(grace_period=5)
    tasks = await backend.lock_activity_work_items(10, timedelta(seconds=1))
    assert tasks == []  # the activity's result was committed, not released
    async with dtfx.Worker(backend, app=app):
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "finished"


def _blocking_fan_out(activities: int) -> tuple[dtfx.App, threading.Event, list[int]]:
    """An app whose orchestrator ``fan`` runs so many activities at once, each of which records
    its input and then blocks until the event returned is set."""
    app = dtfx.App()
    go_on = threading.Event()
    ran: list[int] = []

    @app.activity
    def blocking(ctx: dtfx.ActivityContext, n: int) -> int:
        ran.append(n)
        go_on.wait(10)
        return n

    @app.orchestrator
    def fan(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield dtfx.when_all([ctx.call_activity(blocking, input=n) for n in range(activities)]))

    return app, go_on, ran


async def test_stop_sends_back_the_activities_still_waiting_for_a_thread() -> None:
    app, go_on, ran = _blocking_fan_out(4)
    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    worker = dtfx.Worker(backend, app=app, concurrency=dtfx.ConcurrencyOptions(maximum_thread_pool_workers=1))
    await worker.start_async()
    instance_id = await client.schedule_new_orchestration("fan")
    while not ran:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the other three are leased, waiting for the one thread
    stopping = asyncio.create_task(worker.stop_async(grace_period=10))
    await asyncio.sleep(0.2)
    go_on.set()
    await stopping
    assert len(ran) == 1  # the running one finished; none started once the stop began
    async with dtfx.Worker(backend, app=app):
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == [0, 1, 2, 3]
    assert sorted(ran) == [0, 1, 2, 3]


async def test_an_activity_whose_lease_is_lost_while_it_waits_for_a_thread_does_not_start() -> None:
    app, go_on, ran = _blocking_fan_out(2)
    backend = MemoryBackend()
    renew = backend.renew_activity_lease
    stolen: list[ActivityWorkItem] = []

    async def renew_or_lose(item: ActivityWorkItem, lock_for: timedelta) -> bool:
        if item.task.event.input == "1" and not stolen:  # the one waiting: another worker takes it, say
            stolen.append(item)
            await backend.abandon_activity_work_item(item)
            return False
        return await renew(item, lock_for)

    backend.renew_activity_lease = renew_or_lose  # type: ignore[method-assign]
    options = dtfx.WorkerOptions(lease_duration=timedelta(seconds=0.6))  # renewed every 0.2 s
    threads = dtfx.ConcurrencyOptions(maximum_thread_pool_workers=1)
    async with dtfx.Worker(backend, app=app, concurrency=threads, options=options):
        instance_id = await dtfx.AsyncClient(backend).schedule_new_orchestration("fan")
        while not stolen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the lost one is leased again, and waits for the thread again
        go_on.set()
        state = await dtfx.AsyncClient(backend).wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == [0, 1]
    assert sorted(ran) == [0, 1]  # the one whose lease was lost ran once: under its new lease


class FetchRecordingBackend(MemoryBackend):
    """Records which instances the dispatchers fetch, and which the worker takes as they are created."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: list[str] = []
        self.taken: list[str] = []

    async def lock_orchestration_work_items(self, *args: Any, **kwargs: Any) -> list[OrchestrationWorkItem]:
        items = await super().lock_orchestration_work_items(*args, **kwargs)
        self.fetched += [item.instance_id for item in items]
        return items

    async def _create_instance(self, *args: Any) -> OrchestrationWorkItem | None:
        item = await super()._create_instance(*args)
        if item is not None:
            self.taken.append(item.instance_id)
        return item


async def test_instances_created_on_the_workers_loop_are_taken_while_a_slot_is_free() -> None:
    app = dtfx.App()

    @app.orchestrator
    def waits(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("go"))

    backend = FetchRecordingBackend()
    client = dtfx.AsyncClient(backend)
    concurrency = dtfx.ConcurrencyOptions(maximum_concurrent_orchestration_work_items=1)
    async with dtfx.Worker(backend, app=app, concurrency=concurrency):
        first = await client.schedule_new_orchestration(waits, instance_id="first")
        second = await client.schedule_new_orchestration(waits, instance_id="second")  # the one slot is taken
        await client.wait_for_orchestration_start(second, timeout=10)
        for instance_id in (first, second):
            await client.raise_orchestration_event(instance_id, "go", data=instance_id)
            state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
            assert state is not None and state.get_output() == instance_id
        unknown = await client.schedule_new_orchestration("nobody", instance_id="unknown")  # not for this worker
    assert backend.taken == ["first"]
    assert backend.fetched.count("second") == 2 and backend.fetched.count("first") == 1  # started, then the event
    assert backend._intake is None  # a stopped worker takes nothing
    state = await client.get_orchestration_state(unknown)
    assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.PENDING


async def test_instances_created_on_another_loop_are_taken_as_well() -> None:
    app = dtfx.App()

    @app.orchestrator
    def waits(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("go"))

    backend = FetchRecordingBackend()
    async with dtfx.Worker(backend, app=app):
        with dtfx.Client(backend) as client:  # its own loop, on its own thread
            ids = [await asyncio.to_thread(client.schedule_new_orchestration, waits) for _ in range(3)]
            for instance_id in ids:
                await asyncio.to_thread(client.wait_for_orchestration_start, instance_id, timeout=10)
                await asyncio.to_thread(client.raise_orchestration_event, instance_id, "go", data=instance_id)
                state = await asyncio.to_thread(client.wait_for_orchestration_completion, instance_id, timeout=10)
                assert state is not None and state.get_output() == instance_id
    assert backend.taken == ids
    assert sorted(backend.fetched) == sorted(ids)  # each for its event only


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (lambda: dtfx.WorkerOptions(lease_duration=timedelta(0)), "lease_duration must be longer than zero"),
        (lambda: dtfx.WorkerOptions(backoff_initial=timedelta(seconds=-1)), "backoff_initial must be longer"),
        (lambda: dtfx.WorkerOptions(eager_activity_window=timedelta(seconds=-1)), "eager_activity_window must not"),
        (lambda: dtfx.WorkerOptions(shutdown_grace_period=timedelta(seconds=-1)), "shutdown_grace_period must not"),
        (lambda: dtfx.WorkerOptions(reject_retry_delay=timedelta(seconds=-1)), "reject_retry_delay must not"),
        (lambda: dtfx.WorkerOptions(backoff_max=timedelta(milliseconds=10)), "backoff_max .* must not be shorter"),
        (lambda: dtfx.WorkerOptions(fetch_batch_size=0), "fetch_batch_size must be at least 1"),
        (lambda: dtfx.WorkerOptions(cached_instances=-1), "cached_instances must not be negative"),
        (lambda: dtfx.ConcurrencyOptions(maximum_concurrent_activity_work_items=0), "must be at least 1"),
    ],
)
def test_options_that_cannot_work_are_refused_with_the_option_named(options: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options()


def test_options_at_their_limits_are_accepted() -> None:
    zero = timedelta(0)
    options = dtfx.WorkerOptions(cached_instances=0, eager_activity_window=zero, shutdown_grace_period=zero)
    assert (options.cached_instances, options.eager_activity_window, options.shutdown_grace_period) == (0, zero, zero)
    second = timedelta(seconds=1)
    assert dtfx.WorkerOptions(backoff_initial=second, backoff_max=second).backoff_max == second


def test_a_worker_that_opened_its_backend_from_a_url_starts_again_after_a_stop(tmp_path: Any) -> None:
    app = dtfx.App()

    @app.orchestrator
    def hello(ctx: dtfx.OrchestrationContext, name: str) -> str:
        return f"Hello, {name}!"

    url = f"sqlite:///{tmp_path}/hub.db"
    worker = dtfx.Worker(url, app=app)
    for name in ("first", "second"):
        worker.start()
        try:
            with dtfx.Client(url) as client:
                instance_id = client.schedule_new_orchestration(hello, input=name)
                state = client.wait_for_orchestration_completion(instance_id, timeout=10)
        finally:
            worker.stop()
        assert state is not None and state.get_output() == f"Hello, {name}!"


def test_the_official_sdks_pattern_of_with_then_register_then_start_runs(tmp_path: Any) -> None:
    """``with`` starts a dtfx worker; the SDK's examples then register and call ``start()``."""

    def hello(ctx: dtfx.OrchestrationContext, name: str) -> str:
        return f"Hello, {name}!"

    url = f"sqlite:///{tmp_path}/hub.db"
    with dtfx.Worker(url) as worker:
        worker.add_orchestrator(hello)
        worker.start()
        with dtfx.Client(url) as client:
            instance_id = client.schedule_new_orchestration(hello, input="SDK")
            state = client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "Hello, SDK!"


@pytest.mark.parametrize("started", ["start_async", "start"])
@pytest.mark.parametrize("kind", ["async", "sync", "async calling stop()", "sync running stop_async()"])
async def test_an_activity_that_waits_for_the_stop_of_its_own_worker_is_told_it_cannot(kind: str, started: str) -> None:
    """The stop would wait for the activity, which waits for the stop (a sync one's: the grace
    period, then the activity cancelled, to run again)."""
    app = dtfx.App()
    workers: list[dtfx.Worker] = []

    async def awaits_the_stop(ctx: dtfx.ActivityContext, _: Any) -> str:
        try:
            await workers[0].stop_async(grace_period=30)
        except RuntimeError as error:
            return str(error)
        return "stopped"

    def waits_for_the_stop(ctx: dtfx.ActivityContext, _: Any) -> str:
        try:
            workers[0].stop(grace_period=30)
        except RuntimeError as error:
            return str(error)
        return "stopped"

    async def blocks_its_loop_on_the_stop(ctx: dtfx.ActivityContext, _: Any) -> str:
        return waits_for_the_stop(ctx, _)

    def runs_the_stop(ctx: dtfx.ActivityContext, _: Any) -> str:
        try:
            asyncio.run(workers[0].stop_async(grace_period=30))
        except RuntimeError as error:
            return str(error)
        return "stopped"

    activities = {
        "async": awaits_the_stop,
        "sync": waits_for_the_stop,
        "async calling stop()": blocks_its_loop_on_the_stop,
        "sync running stop_async()": runs_the_stop,
    }
    app.add_activity(activities[kind], "stopper")

    @app.orchestrator
    def stop_me(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity("stopper"))

    backend = MemoryBackend()
    worker = dtfx.Worker(backend, app=app, options=dtfx.WorkerOptions(eager_activities=False))
    workers.append(worker)
    if started == "start":
        await asyncio.to_thread(worker.start)
    else:
        await worker.start_async()
    client = dtfx.AsyncClient(backend)
    instance_id = await client.schedule_new_orchestration(stop_me)
    state = await asyncio.wait_for(client.wait_for_orchestration_completion(instance_id, timeout=10), 20)
    assert worker.is_running
    await asyncio.to_thread(worker.stop)
    assert state is not None
    assert (
        "the stop of the worker that runs it" in state.get_output() or "await worker.stop_async()" in state.get_output()
    )


def test_stopping_a_worker_whose_loop_no_longer_runs_says_so() -> None:
    """It waited for good: nothing runs on that loop to stop it."""
    loop = asyncio.new_event_loop()
    worker = dtfx.Worker(MemoryBackend(), app=dtfx.App())
    loop.run_until_complete(worker.start_async())
    try:
        with pytest.raises(RuntimeError, match="is not running"):
            worker.stop()
    finally:
        loop.run_until_complete(worker.stop_async())
        loop.close()


async def test_an_activity_may_start_the_stop_of_its_own_worker_as_a_task_of_its_own() -> None:
    app = dtfx.App()
    workers: list[dtfx.Worker] = []
    stopping: list[asyncio.Task[None]] = []

    @app.activity
    async def stopper(ctx: dtfx.ActivityContext, _: Any) -> str:
        stopping.append(asyncio.create_task(workers[0].stop_async(grace_period=5)))
        return "asked"

    @app.orchestrator
    def stop_me(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(stopper))

    backend = MemoryBackend()
    worker = dtfx.Worker(backend, app=app)
    workers.append(worker)
    await worker.start_async()
    await dtfx.AsyncClient(backend).schedule_new_orchestration(stop_me)
    await until(lambda: bool(stopping))
    await asyncio.wait_for(stopping[0], 10)  # it stopped: no RuntimeError, no wait on itself
    assert not worker.is_running


async def test_an_activity_that_cancels_its_own_task_is_offered_again_after_a_back_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not at once, tens of thousands of times a second: no stop cancelled it."""
    app = dtfx.App()
    runs: list[int] = []

    @app.activity
    async def self_cancelling(ctx: dtfx.ActivityContext, _: Any) -> None:
        runs.append(ctx.attempt)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)

    @app.orchestrator
    def calls_it(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(self_cancelling))

    backend = MemoryBackend()
    options = dtfx.WorkerOptions(eager_activities=False, backoff_initial=timedelta(milliseconds=20))
    async with dtfx.Worker(backend, app=app, options=options) as worker:
        await dtfx.AsyncClient(backend).schedule_new_orchestration(calls_it)
        await until(lambda: len(runs) >= 3)
        assert worker.is_running
    offered = [r.getMessage() for r in caplog.records if "offering it again in" in r.getMessage()]
    assert [message.rsplit(" ", 1)[-1] for message in offered[:3]] == ["0.0s", "0.0s", "0.1s"]  # 20, 40, 80 ms


async def test_a_stop_is_no_failure_of_the_activity_it_cancels_whatever_the_activity_makes_of_it() -> None:
    app = dtfx.App()
    started = asyncio.Event()
    runs: list[int] = []

    @app.activity
    async def aborts_on_cancel(ctx: dtfx.ActivityContext, _: Any) -> str:
        runs.append(ctx.attempt)
        if len(runs) > 1:
            return "done"
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RuntimeError("request aborted") from None  # as an HTTP client's wrapper may
        return "slept"

    @app.orchestrator
    def calls_it(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(aborts_on_cancel))

    backend = MemoryBackend()
    options = dtfx.WorkerOptions(eager_activities=False, lease_duration=timedelta(seconds=3))
    client = dtfx.AsyncClient(backend)
    worker = dtfx.Worker(backend, app=app, options=options)
    await worker.start_async()
    instance_id = await client.schedule_new_orchestration(calls_it)
    await asyncio.wait_for(started.wait(), 10)
    await worker.stop_async(grace_period=0.1)  # cancels it
    async with dtfx.Worker(backend, app=app, options=options):
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "done"  # run again, not failed


async def test_a_sync_wait_on_the_loop_a_worker_runs_on_is_refused_with_what_to_do_instead() -> None:
    # It would block the worker, which could then not run what the call waits for.
    backend = dtfx.MemoryBackend()
    app = dtfx.App()

    @app.orchestrator
    def quick(ctx: dtfx.OrchestrationContext, _: Any) -> str:
        return "done"

    with dtfx.Client(backend) as client:
        async with dtfx.Worker(backend, app=app):
            instance_id = client.schedule_new_orchestration(quick)  # blocks the loop only while it is stored
            for wait in (client.wait_for_orchestration_start, client.wait_for_orchestration_completion):
                with pytest.raises(RuntimeError, match=r"use dtfx\.AsyncClient there"):
                    wait(instance_id, timeout=10)
            state = await asyncio.to_thread(client.wait_for_orchestration_completion, instance_id, timeout=10)
            assert state is not None and state.get_output() == "done"  # as it says
        assert client.wait_for_orchestration_completion(instance_id, timeout=1) is not None  # no worker now


def _sequence_app(gate: threading.Event) -> dtfx.App:
    app = dtfx.App()

    @app.activity
    def step(ctx: dtfx.ActivityContext, n: int) -> int:
        gate.wait(10)
        return n

    @app.orchestrator
    def sequence(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        for n in range(3):
            yield ctx.call_activity(step, input=n)

    return app


async def test_a_stop_sends_back_the_eager_activities_still_waiting_for_a_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sequences run their activities eagerly: one waiting for a thread held its claim's slot
    after the stop had dropped it, and the stop waited the whole grace period for it."""
    gate = threading.Event()
    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    worker = dtfx.Worker(
        backend, app=_sequence_app(gate), concurrency=dtfx.ConcurrencyOptions(maximum_thread_pool_workers=1)
    )
    await worker.start_async()
    for _ in range(4):
        await client.schedule_new_orchestration("sequence")
    await until(lambda: worker.threads_busy == 4)  # one runs, three wait for the thread
    stopping = asyncio.create_task(worker.stop_async(grace_period=30))
    await asyncio.sleep(0.1)
    gate.set()
    await asyncio.wait_for(stopping, 10)  # else it waits out the 30 s
    assert "reserved slot(s) still unused at shutdown" not in caplog.text
    async with dtfx.Worker(backend, app=_sequence_app(gate)):
        for state in await client.get_all_orchestration_states():
            ended = await client.wait_for_orchestration_completion(state.instance_id, timeout=10)
            assert ended is not None and ended.runtime_status == dtfx.OrchestrationStatus.COMPLETED


async def test_a_stop_cancels_an_async_entity_operation_that_outlasts_the_grace_period() -> None:
    """As it does an async activity's code: else it ran on, on the application's loop, after
    the stop, and the next worker ran it again."""
    app = dtfx.App()
    began, cancelled = asyncio.Event(), asyncio.Event()

    @app.entity
    async def slow(ctx: dtfx.EntityContext, _: Any) -> None:
        began.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    worker = dtfx.Worker(backend, app=app)
    await worker.start_async()
    await client.signal_entity(dtfx.EntityInstanceId("slow", "k"), "run")
    await began.wait()
    await worker.stop_async(grace_period=0.05)
    await asyncio.wait_for(cancelled.wait(), 5)


def _ends_its_threads(before: set[threading.Thread]) -> bool:
    """Whether the threads started since ``before`` end (but asyncio's, which runs this one)."""
    for _ in range(500):
        if not {thread for thread in threading.enumerate() if not thread.name.startswith("asyncio_")} - before:
            return True
        time.sleep(0.01)
    return False


def test_a_worker_started_on_its_own_thread_is_stopped_by_stop_async_on_another_loop(tmp_path: Any) -> None:
    before = set(threading.enumerate())
    worker = dtfx.Worker(f"sqlite:///{tmp_path}/hub.db", app=dtfx.App())
    worker.start()
    asyncio.run(worker.stop_async())
    assert not worker.is_running
    assert _ends_its_threads(before)  # its loop's thread and its backend's


async def test_a_worker_started_on_a_loop_is_stopped_by_stop_from_another_thread_but_not_from_its_own() -> None:
    worker = dtfx.Worker(MemoryBackend(), app=dtfx.App())
    await worker.start_async()
    with pytest.raises(RuntimeError, match=r"await worker\.stop_async"):
        worker.stop()
    assert worker.is_running
    await asyncio.to_thread(worker.stop)
    assert not worker.is_running


class _Held:
    """An app whose orchestrator ``one`` calls one async activity, which sets ``started`` as it
    begins, then waits for ``finish`` and returns "finished"; ``ran`` counts its ends."""

    def __init__(self) -> None:
        self.started, self.finish = asyncio.Event(), asyncio.Event()
        self.ran: list[str] = []
        self.app = dtfx.App()

        @self.app.activity
        async def slow(ctx: dtfx.ActivityContext, _: Any) -> str:
            self.started.set()
            await self.finish.wait()
            self.ran.append("slow")
            return "finished"

        @self.app.orchestrator
        def one(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
            return (yield ctx.call_activity(slow))


async def test_a_stop_whose_caller_is_cancelled_runs_on_and_a_second_stop_waits_for_it(tmp_path: Any) -> None:
    held = _Held()
    url = f"sqlite:///{tmp_path}/hub.db"
    async with dtfx.AsyncClient(url) as client:
        instance_id = await client.schedule_new_orchestration("one")
        before = set(threading.enumerate())
        worker = dtfx.Worker(url, app=held.app)
        await worker.start_async()
        await held.started.wait()
        with pytest.raises(TimeoutError):  # a timeout around the stop, shorter than the activity
            await asyncio.wait_for(worker.stop_async(grace_period=10), 0.1)
        assert not worker.is_running
        held.finish.set()
        await asyncio.wait_for(worker.stop_async(), 10)  # waits for the stop under way
        assert await asyncio.to_thread(_ends_its_threads, before)  # its backend was closed
        async with dtfx.Worker(url, app=held.app):
            state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.get_output() == "finished"
    assert held.ran == ["slow"]  # its result was committed by the stop, not run again


async def test_a_start_after_a_stop_whose_caller_was_cancelled_waits_for_that_stop() -> None:
    # The stop, still under way, would close what the new start opened (its threads, its waiters).
    held = _Held()
    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    worker = dtfx.Worker(backend, app=held.app)
    await worker.start_async()
    first = await client.schedule_new_orchestration("one")
    await held.started.wait()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(worker.stop_async(grace_period=10), 0.1)
    restarting = asyncio.create_task(worker.start_async())
    await asyncio.sleep(0.2)
    assert not restarting.done()
    held.finish.set()
    await asyncio.wait_for(restarting, 10)
    try:
        second = await client.schedule_new_orchestration("one")
        for instance_id in (first, second):
            state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
            assert state is not None and state.get_output() == "finished"
    finally:
        await worker.stop_async()


def test_a_second_stop_from_another_thread_returns_once_the_first_has_stopped_the_worker(tmp_path: Any) -> None:
    app = dtfx.App()
    started, finish = threading.Event(), threading.Event()
    finished: list[str] = []

    @app.activity
    def slow(ctx: dtfx.ActivityContext, _: Any) -> str:
        started.set()
        finish.wait(10)
        finished.append("slow")
        return "finished"

    @app.orchestrator
    def one(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(slow))

    before = set(threading.enumerate())
    worker = dtfx.Worker(f"sqlite:///{tmp_path}/hub.db", app=app)
    worker.start()
    with dtfx.Client(f"sqlite:///{tmp_path}/hub.db") as client:
        client.schedule_new_orchestration(one)
        assert started.wait(10)
        first = threading.Thread(target=worker.stop, kwargs={"grace_period": 10})
        first.start()
        while worker.is_running:
            time.sleep(0.01)
        threading.Timer(0.3, finish.set).start()
        worker.stop()
        assert finished == ["slow"]  # the first stop's grace period was waited for
        first.join(10)
    assert _ends_its_threads(before)


_STOP_IN_A_SIGNAL_HANDLER = """
import signal, threading, dtfx

app = dtfx.App()
began, finish = threading.Event(), threading.Event()

@app.activity
def slow(ctx, _):
    began.set()
    finish.wait(10)
    return "finished"

@app.orchestrator
def one(ctx, _):
    return (yield ctx.call_activity(slow))

worker = dtfx.Worker(dtfx.MemoryBackend(), app=app)
worker.start()
dtfx.Client(worker.backend).schedule_new_orchestration(one)
began.wait(10)
handled = []
signal.signal(signal.SIGUSR1, lambda *_: (worker.stop(), handled.append(True)))
threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1)).start()
threading.Timer(0.6, finish.set).start()
worker.stop(grace_period=10)  # the handler's stop comes while this one waits for the activity
print("stopped", handled)
"""


def test_a_stop_in_a_signal_handler_on_the_thread_that_is_stopping_returns_at_once() -> None:
    # It would wait for the stop it interrupted, which cannot go on until it returns.
    ran = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_STOP_IN_A_SIGNAL_HANDLER)], capture_output=True, text=True, timeout=60
    )
    assert ran.stdout.strip() == "stopped [True]", ran.stderr


async def test_an_activity_cannot_await_a_stop_under_way_either() -> None:
    app = dtfx.App()
    stops: list[asyncio.Task[None]] = []

    @app.activity
    async def stops_its_worker(ctx: dtfx.ActivityContext, _: Any) -> str:
        stops.append(asyncio.create_task(worker.stop_async(grace_period=10)))
        await asyncio.sleep(0.05)  # the stop is under way, and waits for this activity
        try:
            await worker.stop_async()
        except RuntimeError as error:
            return str(error)
        return "waited"

    @app.orchestrator
    def one(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(stops_its_worker))

    backend = MemoryBackend()
    client = dtfx.AsyncClient(backend)
    worker = dtfx.Worker(backend, app=app)
    await worker.start_async()
    instance_id = await client.schedule_new_orchestration(one)
    await until(lambda: bool(stops))
    await asyncio.wait_for(stops[0], 5)  # a stop that waited for the activity would take 10 s
    async with dtfx.Worker(backend, app=app):
        state = await client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and "cannot await the stop" in state.get_output()


def _runs_endlessly() -> dtfx.Worker:
    """A worker whose orchestration ``one`` calls an activity that never ends."""
    app = dtfx.App()

    @app.activity
    async def endless(ctx: dtfx.ActivityContext, _: Any) -> None:
        await asyncio.Event().wait()

    @app.orchestrator
    def one(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(endless))

    return dtfx.Worker(MemoryBackend(), app=app)


async def _leave_its_stop_running(worker: dtfx.Worker) -> None:
    """Start ``worker`` on the running loop with its endless activity under way, then stop it
    from a caller that a timeout cancels: the stop goes on, waiting for the activity."""
    await worker.start_async()
    await dtfx.AsyncClient(worker.backend).schedule_new_orchestration("one")
    await asyncio.sleep(0.2)  # the activity runs
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(worker.stop_async(grace_period=10), 0.1)


def test_a_worker_whose_stop_its_loop_cut_short_stops_quietly_afterwards() -> None:
    worker = _runs_endlessly()
    asyncio.run(_leave_its_stop_running(worker))  # its end cancels the stop
    worker.stop()  # nothing left to stop: no "event loop is not running"
    assert not worker.is_running


def test_a_worker_whose_stop_was_left_on_a_closed_loop_starts_again() -> None:
    # The stop will never end: a start that waited for it could never start.
    worker = _runs_endlessly()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(_leave_its_stop_running(worker))
    loop.close()  # not asyncio.run: its tasks, the stop's too, are left as they were
    try:
        worker.start()
        try:
            assert worker.is_running
        finally:
            worker.stop(grace_period=0.1)
    finally:
        _close_the_tasks_left_on(loop)


def _close_the_tasks_left_on(loop: asyncio.AbstractEventLoop) -> None:
    """Close the coroutines of the tasks a closed ``loop`` left pending, here, rather than when
    the collector finds them, in whatever test runs then (their ``finally`` blocks, which need
    a running loop, raise as they close)."""
    for task in asyncio.all_tasks(loop):
        with contextlib.suppress(BaseException):
            task.get_coro().close()
