"""Running the server: embedded (sync and async), TLS, the bind address, SQLite, and ``dtfx serve``."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from durabletask import client as sdk_client
from durabletask.client import OrchestrationStatus
from durabletask.grpc_options import GrpcChannelOptions
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as pb_grpc
from google.protobuf import empty_pb2
from tests.grpc.conftest import (
    FAST,
    WorkItemStream,
    run_sdk_sequence,
    running_sidecar,
)
from tests.polling import wait_until

import dtfx
import grpc
from dtfx.backends.sqlite import SqliteBackend
from dtfx.core.errors import ConfigurationError
from dtfx.grpc import SidecarOptions, SidecarServer, TlsOptions


async def test_embedded_on_the_running_event_loop() -> None:
    async with SidecarServer(dtfx.MemoryBackend(), port=0, options=FAST) as server:
        assert server.is_running and server.port > 0
        async with sdk_client.AsyncTaskHubGrpcClient(host_address=server.address) as client:
            instance_id = await client.schedule_new_orchestration("anything", input=1)
            state = await client.get_orchestration_state(instance_id)
            assert state is not None and state.runtime_status == OrchestrationStatus.PENDING
    assert not server.is_running


def test_a_taken_port_is_a_clear_error() -> None:
    with running_sidecar() as first:
        second = SidecarServer(dtfx.MemoryBackend(), port=first.port, options=FAST)
        with pytest.raises(ConfigurationError, match=str(first.port)):
            second.start()
        assert not second.is_running


def test_a_port_taken_on_one_of_the_hosts_addresses_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = SidecarServer(dtfx.MemoryBackend(), host="localhost", port=port, options=FAST)
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port} is taken"):
            server.start()
        assert not server.is_running


def _new_sqlite_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("dtfx-sqlite")]


def test_a_start_that_fails_half_way_closes_the_backend_it_opened(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    with running_sidecar() as first:
        second = SidecarServer(f"sqlite:///{tmp_path}/hub.db", port=first.port, options=FAST)
        with pytest.raises(ConfigurationError, match=str(first.port)):
            second.start()  # the backend has started by the time the port turns out to be taken
        assert not second.is_running
    wait_until(lambda: _new_sqlite_threads(before) == [])
    unopenable = SidecarServer(f"sqlite:///{tmp_path}", port=0, options=FAST)  # a directory, not a file
    with pytest.raises(dtfx.BackendError, match="Cannot open"):
        unopenable.start()
    wait_until(lambda: _new_sqlite_threads(before) == [])


def test_a_worker_that_pings_often_keeps_its_stream() -> None:
    """An SDK may be configured to send keepalive pings; the server must not call them too many."""
    quiet = dataclasses.replace(FAST, health_ping_interval=timedelta(seconds=60))
    pinging = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.http2.min_time_between_pings_ms", 1000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    with running_sidecar(options=quiet) as server, grpc.insecure_channel(server.address, options=pinging) as channel:
        stub = pb_grpc.TaskHubSidecarServiceStub(channel)
        stream = WorkItemStream(stub)
        try:
            assert stream.nothing_within(7)  # a server that refuses the pings ends the stream meanwhile
            stub.StartInstance(pb.CreateInstanceRequest(instanceId="still-served", name="anything"))
            assert stream.next().orchestratorRequest.instanceId == "still-served"
        finally:
            stream.close()


async def test_a_burst_of_thousands_of_calls_is_served_not_refused() -> None:
    """Calls that arrive faster than the server takes them up wait their turn: gRPC's default
    backlog would refuse some past 1,000 waiting (CANCELLED) and all past 3,000."""
    burst = 4000
    with running_sidecar() as server:
        async with sdk_client.AsyncTaskHubGrpcClient(host_address=server.address) as client:
            started = await asyncio.gather(
                *(client.schedule_new_orchestration("anything", instance_id=f"burst-{n}") for n in range(burst)),
                return_exceptions=True,
            )
            refused = [outcome for outcome in started if isinstance(outcome, BaseException)]
            assert refused == []
            assert started == [f"burst-{n}" for n in range(burst)]
            state = await client.get_orchestration_state(f"burst-{burst - 1}")
            assert state is not None and state.runtime_status == OrchestrationStatus.PENDING


def test_health_pings_come_often_enough_for_sdk_workers() -> None:
    with pytest.raises(ValueError, match="at most 60"):
        SidecarOptions(health_ping_interval=timedelta(seconds=120))
    with pytest.raises(ValueError, match="positive"):
        SidecarOptions(health_ping_interval=timedelta(0))
    assert SidecarOptions(health_ping_interval=timedelta(seconds=60)).health_ping_interval.total_seconds() == 60


def test_keepalive_pings_need_a_positive_pace() -> None:
    for name in ("keepalive_interval", "keepalive_timeout", "lease_duration"):
        with pytest.raises(ValueError, match=f"{name} must be positive"):
            SidecarOptions(**{name: timedelta(0)})


def test_dispatcher_tuning_defaults_to_a_native_workers() -> None:
    options, worker = SidecarOptions(), dtfx.WorkerOptions()
    assert options.fetch_batch_size == worker.fetch_batch_size
    assert (options.backoff_initial, options.backoff_max) == (worker.backoff_initial, worker.backoff_max)
    with pytest.raises(ValueError, match="fetch_batch_size"):
        SidecarOptions(fetch_batch_size=0)
    with pytest.raises(ValueError, match="backoff_initial"):
        SidecarOptions(backoff_initial=timedelta(0))
    with pytest.raises(ValueError, match="backoff_initial"):
        SidecarOptions(backoff_initial=timedelta(seconds=20), backoff_max=timedelta(seconds=10))


def test_bind_address() -> None:
    with running_sidecar(host="127.0.0.1") as server:
        assert server.address == f"127.0.0.1:{server.port}"
        with grpc.insecure_channel(server.address) as channel:
            pb_grpc.TaskHubSidecarServiceStub(channel).Hello(empty_pb2.Empty(), timeout=5)


def test_sqlite_backend_smoke(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/taskhub.db"
    instance_id = run_sdk_sequence(url)
    with dtfx.Client(url) as native:  # it is all in the file
        stored = native.get_orchestration_state(instance_id)
        assert stored is not None and stored.runtime_status == dtfx.OrchestrationStatus.COMPLETED


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost"
    command += " -addext subjectAltName=DNS:localhost"
    subprocess.run([*command.split(), "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_tls(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    with running_sidecar(tls=TlsOptions.from_files(cert, key)) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.address, credentials) as channel:
            client = sdk_client.TaskHubGrpcClient(channel=channel)
            instance_id = client.schedule_new_orchestration("over-tls")
            state = client.get_orchestration_state(instance_id)
            assert state is not None and state.name == "over-tls"
        with grpc.insecure_channel(server.address) as plaintext:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.TaskHubSidecarServiceStub(plaintext).Hello(empty_pb2.Empty(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_messages_past_the_size_limit_are_refused_and_the_limit_can_be_raised() -> None:
    large = "x" * (5 << 20)
    backend = dtfx.MemoryBackend()
    channel = GrpcChannelOptions(max_receive_message_length=8 << 20)  # what the server sends, the client limits
    with (
        running_sidecar(backend) as server,
        sdk_client.TaskHubGrpcClient(host_address=server.address, channel_options=channel) as client,
    ):
        with pytest.raises(grpc.RpcError) as refused:
            client.schedule_new_orchestration("served", input=large)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with dtfx.Client(backend) as native:  # stored another way, it goes out whole
            native_id = native.schedule_new_orchestration("served", input=large)
        state = client.get_orchestration_state(native_id, fetch_payloads=True)
        assert state is not None and state.get_input() == large
    raised = dataclasses.replace(FAST, max_message_bytes=8 << 20)
    with (
        running_sidecar(options=raised) as server,
        sdk_client.TaskHubGrpcClient(host_address=server.address, channel_options=channel) as client,
    ):
        instance_id = client.schedule_new_orchestration("served", input=large)
        state = client.get_orchestration_state(instance_id, fetch_payloads=True)
        assert state is not None and state.runtime_status == OrchestrationStatus.PENDING
        assert state.get_input() == large
    with pytest.raises(ValueError, match="max_message_bytes"):
        SidecarOptions(max_message_bytes=0)


def test_dtfx_serve(tmp_path: Path) -> None:
    """``dtfx serve`` runs until SIGINT; SDK clients reach it meanwhile."""
    env = {**os.environ, "DTFX_BACKEND": f"sqlite:///{tmp_path}/hub.db", "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dtfx.cli", "serve", "--grpc-port", "0", "--health-ping", "1", "--max-message-mib", "8"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stderr is not None
        first_line = process.stderr.readline()
        match = re.search(r"listening on (\S+) \(plaintext\)", first_line)
        assert match, first_line
        with sdk_client.TaskHubGrpcClient(host_address=match.group(1)) as client:
            instance_id = client.schedule_new_orchestration("served", input=[1, 2])
            state = client.get_orchestration_state(instance_id, fetch_payloads=True)
            assert state is not None and state.get_input() == [1, 2]
            assert client.schedule_new_orchestration("served", input="x" * (5 << 20))  # past gRPC's 4 MiB
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=20)
        assert process.returncode == 0, rest
        assert "Sidecar stopped." in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with dtfx.Client(f"sqlite:///{tmp_path}/hub.db") as native:
        assert native.get_orchestration_state(instance_id) is not None


def test_dtfx_serve_tls_needs_both_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not used")
    result = subprocess.run(
        [sys.executable, "-m", "dtfx.cli", "serve", "--backend", "memory://", "--tls-cert", str(cert)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2  # a usage error
    assert "TLS needs both --tls-cert and --tls-key" in result.stderr


def test_stopping_gives_back_the_work_out_with_workers() -> None:
    """Work a worker holds when the server stops is not stuck behind its lease: the next server offers it."""
    backend = dtfx.MemoryBackend()  # shared by both servers, like a database file
    with running_sidecar(backend) as first, grpc.insecure_channel(first.address) as channel:
        stub = pb_grpc.TaskHubSidecarServiceStub(channel)
        stub.StartInstance(pb.CreateInstanceRequest(instanceId="held", name="anything"))
        stream = WorkItemStream(stub)
        assert stream.next().orchestratorRequest.instanceId == "held"
        first.stop(grace_period=0.1)
        stream.close()
    with running_sidecar(backend) as second, grpc.insecure_channel(second.address) as channel:
        stream = WorkItemStream(pb_grpc.TaskHubSidecarServiceStub(channel))
        try:
            assert stream.next().orchestratorRequest.instanceId == "held"  # the lease lasts 60 s
        finally:
            stream.close()


def test_grpc_loads_only_when_used_and_its_absence_names_the_extra() -> None:
    script = """
import sys
import dtfx, dtfx.cli, dtfx.grpc
assert "grpc" not in sys.modules and "durabletask" not in sys.modules, "loaded too early"
sys.modules["grpc"] = None  # as if the extra were not installed
from dtfx.cli import cli
cli(["serve", "--backend", "memory://", "--grpc-port", "0"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "pip install 'dtfx[grpc]'" in result.stderr


def test_a_sqlite_hub_transacts_on_its_database_thread_not_on_the_servers_loop(tmp_path: Path) -> None:
    """The server's loop serves every peer, so no transaction waits for the disk on it."""
    backend = SqliteBackend(f"sqlite:///{tmp_path}/hub.db")
    threads: set[str] = set()
    transact = backend._transact

    def spied(*args: object, **kwargs: object) -> object:
        threads.add(threading.current_thread().name)
        return transact(*args, **kwargs)  # type: ignore[arg-type]

    backend._transact = spied  # type: ignore[method-assign,assignment]
    run_sdk_sequence(backend)
    assert not backend.callers_transact
    assert threads and all(name.startswith("dtfx-sqlite") for name in threads), threads


def test_history_chunks_stay_within_their_size_unless_one_event_is_larger() -> None:
    """So that a chunk fits in a message whenever its events each do (a large output after
    many small events went out as one chunk past gRPC's 4 MiB)."""
    app = dtfx.App()

    @app.activity
    def sized(ctx: dtfx.ActivityContext, size: int) -> str:
        return "x" * size

    @app.orchestrator
    def growing(ctx: dtfx.OrchestrationContext, sizes: list[int]) -> object:
        lengths = []
        for size in sizes:
            lengths.append(len((yield ctx.call_activity(sized, input=size))))
        return lengths

    limit = 1000
    options = dataclasses.replace(FAST, history_chunk_bytes=limit)
    with running_sidecar(options=options) as server, dtfx.Worker(server.backend, app=app):
        with dtfx.Client(server.backend) as native:
            instance_id = native.schedule_new_orchestration(growing, input=[100, 100, 100, 100, 900, 3000, 10])
            state = native.wait_for_orchestration_completion(instance_id, timeout=15)
            assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED
            stored = native.get_orchestration_history(instance_id)
        with grpc.insecure_channel(server.address) as channel:
            request = pb.StreamInstanceHistoryRequest(instanceId=instance_id)
            chunks = list(pb_grpc.TaskHubSidecarServiceStub(channel).StreamInstanceHistory(request))
    assert sum(len(chunk.events) for chunk in chunks) == len(stored)
    for chunk in chunks:
        assert len(chunk.events) == 1 or sum(event.ByteSize() for event in chunk.events) <= limit
    assert any(len(chunk.events) == 1 and chunk.events[0].ByteSize() > limit for chunk in chunks)
