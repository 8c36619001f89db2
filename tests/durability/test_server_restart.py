"""Workers and clients ride out a restart of the PostgreSQL server itself: a crash (the server
killed and recovered from its log) or a clean shutdown, on a server of the test's own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

import dtfx
from dtfx.backends.postgres import PostgresBackend
from dtfx.core.history import ExecutionCompleted
from tests.durability.counting import ACTIVITIES, HOUR_LEASES, OUTPUTS, counting_app, start_work
from tests.durability.worker_process import app
from tests.private_postgres import PrivateServer, private_server

Status = dtfx.OrchestrationStatus


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateServer]:
    with private_server() as server:
        yield server


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_work_goes_on_through_a_restart_of_the_server(
    server: PrivateServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The leases last an hour: only the worker giving back what it held when the server went
    # (the results of the activities it ran committed again) carries the orchestrations on
    # within the test. A client's calls made meanwhile wait for the server (their
    # pool_timeout is 15 s), and so does a wait for an orchestration's end begun before.
    url = server.url(f"restart_{mode}")
    counting, runs = counting_app()

    caplog.set_level(logging.WARNING)
    async with (
        dtfx.AsyncClient(url) as client,
        dtfx.Worker(url, app=counting, options=HOUR_LEASES),
    ):
        started = await start_work(client)
        await asyncio.sleep(0.3)
        running = await client.query_orchestrations(dtfx.OrchestrationQuery(runtime_status=[Status.RUNNING]))
        waiting = asyncio.create_task(client.wait_for_orchestration_completion(started[0], timeout=60))
        await asyncio.to_thread(server.stop, mode)
        late = asyncio.create_task(client.schedule_new_orchestration("chain", input=5))
        await asyncio.sleep(0.5)
        assert not late.done()  # it waits for the server
        await asyncio.to_thread(server.start)
        instance_ids = [*started, await late]
        states = [await client.wait_for_orchestration_completion(i, timeout=60) for i in instance_ids]
        histories = [await client.get_orchestration_history(i) for i in instance_ids]
        waited = await waiting

    assert running.items  # the server went while orchestrations were running
    assert waited is not None and waited.get_output() == 600
    assert [state.get_output() if state else None for state in states] == [*OUTPUTS, 5]
    for state, history in zip(states, histories, strict=True):
        assert state is not None and state.runtime_status == Status.COMPLETED
        assert sum(isinstance(event, ExecutionCompleted) for event in history) == 1
    assert len(runs) == ACTIVITIES + 5  # every activity ran
    noticed = [record for record in caplog.records if record.name.startswith("dtfx")]
    assert noticed  # the connection that listens for notifications, at least, was lost
    assert not [record.getMessage() for record in noticed if record.exc_info], "a restart is no bug"


async def test_a_worker_hears_of_new_work_as_soon_as_the_server_answers_again(
    server: PrivateServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that lost its notification connection opens it again after a back-off; here
    # that back-off, and the polling that would otherwise find the work, take half a minute
    # or more. The worker's own transactions going through again (its fetches, which wait
    # for the server) have it listen again at once, so the work a client starts in another
    # backend object once the server is back runs without waiting for either.
    monkeypatch.setattr(PostgresBackend, "listener_retry_first", 30.0)
    monkeypatch.setattr(PostgresBackend, "listener_retry_max", 60.0)
    monkeypatch.setattr(PostgresBackend, "poll_interval", 60.0)
    url = server.url("nudged")
    job = {"steps": 2}
    async with dtfx.AsyncClient(url) as client, dtfx.Worker(url, app=app):
        before = await client.schedule_new_orchestration("sequence", input=job)
        assert await client.wait_for_orchestration_completion(before, timeout=10)
        await asyncio.to_thread(server.stop, "fast")
        await asyncio.sleep(1.0)  # the worker's listener has failed to connect again, and waits
        await asyncio.to_thread(server.start)
        await asyncio.sleep(5.0)  # the worker's fetches, which waited for the server, have found nothing
        after = await client.schedule_new_orchestration("sequence", input=job)
        state = await client.wait_for_orchestration_completion(after, timeout=20)

    assert state is not None and state.get_output() == [0, 10]
