"""The gRPC path: the official ``durabletask`` SDK worker and client against ``dtfx serve``.

The server runs in a process of its own (``dtfx serve``), as in production; this process
runs the SDK's worker and its async client, so that the measurement includes the
protocol on both sides.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from typing import Any

from durabletask import client as sdk_client
from durabletask import task as sdk_task
from durabletask import worker as sdk_worker

from benchmarks.workload import CITIES, GREETINGS, dispatch, greeting


def say_hello(ctx: sdk_task.ActivityContext, city: str) -> str:
    return greeting(city)


def hello_cities(ctx: sdk_task.OrchestrationContext, cities: list[str]) -> Any:
    greetings = []
    for city in cities:
        greetings.append((yield ctx.call_activity(say_hello, input=city)))
    return greetings


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve(url: str, port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, "-m", "dtfx.cli", "serve", "--backend", url, "--grpc-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.05)
    server.kill()
    raise RuntimeError("dtfx serve did not start listening")


def sequence(url: str, count: int = 1000) -> dict[str, Any]:
    """``count`` hello-cities orchestrations run by the SDK worker, all started at once."""
    # The SDK makes loggers of its own, which log INFO lines for every orchestration, unless given one.
    quiet = logging.getLogger("durabletask")
    quiet.setLevel(logging.WARNING)
    port = _free_port()
    server = _serve(url, port)
    address = f"localhost:{port}"
    worker = sdk_worker.TaskHubGrpcWorker(host_address=address, logger=quiet)
    worker.add_orchestrator(hello_cities)
    worker.add_activity(say_hello)
    worker.start()  # type: ignore[no-untyped-call]
    try:

        async def main() -> float:
            client = sdk_client.AsyncTaskHubGrpcClient(host_address=address, logger=quiet)
            try:
                started = time.perf_counter()
                ids = await asyncio.gather(
                    *(client.schedule_new_orchestration(hello_cities, input=CITIES) for _ in range(count))
                )
                states = await asyncio.gather(
                    *(client.wait_for_orchestration_completion(instance_id, timeout=600) for instance_id in ids)
                )
                elapsed = time.perf_counter() - started
            finally:
                await client.close()
            assert all(state is not None and state.get_output() == GREETINGS for state in states)
            return elapsed

        elapsed = asyncio.run(main())
    finally:
        worker.stop()  # type: ignore[no-untyped-call]
        server.terminate()
        server.wait(30)
    return {"count": count, "seconds": elapsed, "per_second": count / elapsed}


if __name__ == "__main__":
    dispatch({"sequence": sequence})
