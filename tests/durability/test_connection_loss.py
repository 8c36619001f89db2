"""Workers ride out lost PostgreSQL connections (what a database restart does to them), and the
server going away for a while."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import pytest

import dtfx
from dtfx.backends.postgres import parse_postgres_url
from dtfx.core.errors import BackendUnavailableError
from dtfx.core.history import ExecutionCompleted
from tests.durability.counting import ACTIVITIES, HOUR_LEASES, OUTPUTS, counting_app, start_work
from tests.durability.worker_process import LEASE, app
from tests.postgres import postgres_url, terminate_connections
from tests.proxy import TcpProxy

Status = dtfx.OrchestrationStatus


async def test_workers_retry_and_carry_on_when_connections_are_killed(caplog: pytest.LogCaptureFixture) -> None:
    url = postgres_url()
    _, schema, _ = parse_postgres_url(url)
    caplog.set_level(logging.WARNING)
    job = {"steps": 8, "sleep": 0.1}
    async with (
        dtfx.AsyncClient(url) as client,
        dtfx.Worker(url, app=app, options=dtfx.WorkerOptions(lease_duration=LEASE)),
    ):
        instance_ids = [
            await client.schedule_new_orchestration("sequence", input=job, instance_id=f"job-{index}")
            for index in range(12)
        ]
        terminated = 0
        for _ in range(4):
            await asyncio.sleep(0.2)
            terminated += await asyncio.to_thread(terminate_connections, schema)
        running = await client.query_orchestrations(dtfx.OrchestrationQuery(runtime_status=[Status.RUNNING]))
        states = [await client.wait_for_orchestration_completion(i, timeout=60) for i in instance_ids]
        histories = [await client.get_orchestration_history(i) for i in instance_ids]

    assert terminated >= 4  # the worker's and the client's connections, each time
    assert running.items  # the connections were killed while orchestrations were running
    for state, history in zip(states, histories, strict=True):
        assert state is not None and state.runtime_status == Status.COMPLETED
        assert state.get_output() == [10 * step for step in range(8)]
        assert sum(isinstance(event, ExecutionCompleted) for event in history) == 1
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any("PostgreSQL" in message for message in warnings), warnings


async def test_work_in_flight_when_connections_are_killed_goes_on_without_waiting_for_its_leases() -> None:
    # The leases last an hour: only the worker giving its work back (with the results of
    # the activities it ran, committed again) carries the orchestrations on within the test.
    # That no activity runs twice for it is checked where the faults can be placed exactly
    # (tests/worker): here a kill may also fail a commit that an activity ran ahead of, and
    # that activity runs again.
    url = postgres_url()
    _, schema, _ = parse_postgres_url(url)
    counting, runs = counting_app()

    async with (
        dtfx.AsyncClient(url) as client,
        dtfx.Worker(url, app=counting, options=HOUR_LEASES),
    ):
        instance_ids = await start_work(client)
        await asyncio.sleep(0.3)
        for _ in range(3):
            assert await asyncio.to_thread(terminate_connections, schema) >= 1
            await asyncio.sleep(0.3)
        states = [await client.wait_for_orchestration_completion(i, timeout=60) for i in instance_ids]

    assert [state.get_output() if state else None for state in states] == OUTPUTS
    assert len(runs) == ACTIVITIES  # every activity ran


async def test_work_goes_on_once_the_server_is_back_without_waiting_for_its_leases(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A proxy in front of the server stands for the server stopping (every connection closed,
    # new ones refused) and starting again. The leases last an hour: the worker gives back
    # what it holds once the server answers again. A call while the server is away fails
    # when its pool_timeout is spent (2 s here), saying why.
    url = postgres_url()
    address = urlsplit(url)
    if address.hostname not in ("127.0.0.1", "localhost") or address.port is None:
        pytest.skip("the test server is not reached over TCP on this host, where the proxy runs")
    proxy = TcpProxy(address.port)
    user, at, _ = address.netloc.rpartition("@")  # the user and password, if any, stay
    proxied = urlunsplit(address._replace(netloc=f"{user}{at}127.0.0.1:{proxy.port}"))
    caplog.set_level(logging.WARNING)
    job = {"steps": 6, "sleep": 0.05}
    try:
        async with (
            dtfx.AsyncClient(proxied) as client,
            dtfx.AsyncClient(proxied + "&pool_timeout=2") as impatient,
            dtfx.Worker(proxied, app=app, options=HOUR_LEASES),
        ):
            instance_ids = [
                await client.schedule_new_orchestration("sequence", input=job, instance_id=f"job-{index}")
                for index in range(8)
            ]
            await asyncio.sleep(0.2)
            running = await client.query_orchestrations(dtfx.OrchestrationQuery(runtime_status=[Status.RUNNING]))
            proxy.go_down()
            with pytest.raises(BackendUnavailableError, match=r"Cannot connect to PostgreSQL: .*refused"):
                await impatient.get_orchestration_state(instance_ids[0])
            proxy.come_up()
            states = [await client.wait_for_orchestration_completion(i, timeout=30) for i in instance_ids]
            histories = [await client.get_orchestration_history(i) for i in instance_ids]
    finally:
        proxy.close()

    assert running.items  # the server went away while orchestrations were running
    for state, history in zip(states, histories, strict=True):
        assert state is not None and state.runtime_status == Status.COMPLETED
        assert state.get_output() == [10 * step for step in range(6)]
        assert sum(isinstance(event, ExecutionCompleted) for event in history) == 1
    noticed = [record for record in caplog.records if record.name.startswith("dtfx")]
    assert noticed  # the connection that listens for notifications, at least, was lost
    assert not [record.getMessage() for record in noticed if record.exc_info], "the store's absence is no bug"
