"""The sidecar rides out a restart of its PostgreSQL server, with the official SDK's worker and
client as its peers: a crash (the server killed and recovered from its log) or a clean
shutdown, on a server of the test's own."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from durabletask import client as sdk_client
from durabletask.client import OrchestrationStatus
from tests.grpc import sdk_app
from tests.grpc.conftest import running_sdk_worker, running_sidecar
from tests.private_postgres import PrivateServer, private_server


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateServer]:
    with private_server() as server:
        yield server


@pytest.mark.parametrize("mode", ["immediate", "fast"])
def test_sdk_work_goes_on_through_a_restart_of_the_sidecars_server(server: PrivateServer, mode: str) -> None:
    with (
        running_sidecar(server.url(f"sidecar_restart_{mode}")) as sidecar,
        running_sdk_worker(sidecar.address),
        sdk_client.TaskHubGrpcClient(host_address=sidecar.address) as client,
    ):
        fans = [client.schedule_new_orchestration(sdk_app.fan_out_fan_in, input=50) for _ in range(4)]
        sequences = [client.schedule_new_orchestration(sdk_app.sequence) for _ in range(4)]
        time.sleep(0.2)
        before = [client.get_orchestration_state(i) for i in fans + sequences]
        server.stop(mode)
        late: list[str] = []  # a start while the server is down: the call waits for it
        starting = threading.Thread(target=lambda: late.append(client.schedule_new_orchestration(sdk_app.sequence)))
        starting.start()
        time.sleep(0.5)
        assert not late
        server.start()
        starting.join(timeout=30)
        states = [client.wait_for_orchestration_completion(i, timeout=30) for i in fans + sequences + late]

    assert any(state is None or state.runtime_status != OrchestrationStatus.COMPLETED for state in before)
    assert len(states) == 9
    for state in states:
        assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED, state
    outputs = [json.loads(state.serialized_output or "null") for state in states if state is not None]
    greetings = ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]
    assert outputs == [sum(n * n for n in range(50))] * 4 + [greetings] * 5
