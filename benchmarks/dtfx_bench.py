"""The dtfx side of the benchmarks: a worker and a client in one process, on one backend.

The process runs on the loop ``dtfx worker`` runs on: uvloop's, with the ``fast`` extra
that ``make bench`` installs (``DTFX_BENCH_LOOP=asyncio`` runs it on asyncio's).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import dtfx
from benchmarks.workload import CITIES, GREETINGS, dispatch, greeting, latency_summary
from dtfx import _loops as loops
from dtfx.backends import open_backend

app = dtfx.App()


@app.activity
def say_hello(ctx: dtfx.ActivityContext, city: str) -> str:
    return greeting(city)


@app.orchestrator
def hello_cities(ctx: dtfx.OrchestrationContext, cities: list[str]) -> Any:
    greetings = []
    for city in cities:
        greetings.append((yield ctx.call_activity(say_hello, input=city)))
    return greetings


@app.activity
def double(ctx: dtfx.ActivityContext, value: int) -> int:
    return value * 2


@app.orchestrator
def fan_out(ctx: dtfx.OrchestrationContext, count: int) -> Any:
    results = yield dtfx.when_all([ctx.call_activity(double, input=i) for i in range(count)])
    return sum(results)


@app.orchestrator
def long_sequence(ctx: dtfx.OrchestrationContext, length: int) -> Any:
    total = 0
    for step in range(length):
        total += yield ctx.call_activity(double, input=step)
    return total


@app.entity
def counter(ctx: dtfx.EntityContext, amount: int) -> int:
    value = int(ctx.get_state(int, 0)) + amount
    ctx.set_state(value)
    return value


@asynccontextmanager
async def hub(url: str) -> AsyncIterator[dtfx.AsyncClient]:
    """A started worker and a client on the backend at ``url``."""
    backend = open_backend(url)
    try:
        async with dtfx.Worker(backend, app=app):
            yield dtfx.AsyncClient(backend)
    finally:
        await backend.close()


async def _complete(client: dtfx.AsyncClient, instance_id: str) -> Any:
    state = await client.wait_for_orchestration_completion(instance_id, timeout=1800)
    assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED, state
    return state.get_output()


async def one_hello_cities(client: dtfx.AsyncClient) -> float:
    """Seconds from the schedule of one hello-cities orchestration to its completion."""
    started = time.perf_counter()
    instance_id = await client.schedule_new_orchestration(hello_cities, input=CITIES)
    assert await _complete(client, instance_id) == GREETINGS
    return time.perf_counter() - started


async def one_long_sequence(client: dtfx.AsyncClient, length: int) -> float:
    """Seconds from the schedule of one sequence of ``length`` activities to its completion."""
    started = time.perf_counter()
    instance_id = await client.schedule_new_orchestration(long_sequence, input=length)
    total = await _complete(client, instance_id)
    elapsed = time.perf_counter() - started
    assert total == length * (length - 1)
    return elapsed


def _run(main: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    if os.environ.get("DTFX_BENCH_LOOP") == "asyncio":
        return asyncio.run(main())
    return loops.run(main())


async def many_hello_cities(client: dtfx.AsyncClient, count: int) -> float:
    """Seconds from the schedule of ``count`` hello-cities orchestrations, all at once, to their completion."""
    started = time.perf_counter()
    ids = await asyncio.gather(*(client.schedule_new_orchestration(hello_cities, input=CITIES) for _ in range(count)))
    outputs = await asyncio.gather(*(_complete(client, instance_id) for instance_id in ids))
    elapsed = time.perf_counter() - started
    assert all(output == GREETINGS for output in outputs)
    return elapsed


def sequence(url: str, count: int = 1000) -> dict[str, Any]:
    """``count`` hello-cities orchestrations (3 sequential activities each), all started at once."""

    async def main() -> dict[str, Any]:
        async with hub(url) as client:
            elapsed = await many_hello_cities(client, count)
        return {"count": count, "seconds": elapsed, "per_second": count / elapsed}

    return _run(main)


def fan_out_in(url: str, count: int = 1000) -> dict[str, Any]:
    """One orchestration that runs ``count`` activities in parallel and sums their results."""

    async def main() -> dict[str, Any]:
        async with hub(url) as client:
            started = time.perf_counter()
            instance_id = await client.schedule_new_orchestration(fan_out, input=count)
            total = await _complete(client, instance_id)
            elapsed = time.perf_counter() - started
        assert total == count * (count - 1)
        return {"count": count, "seconds": elapsed}

    return _run(main)


def long_chain(url: str, length: int = 1000) -> dict[str, Any]:
    """One orchestration of ``length`` sequential activities."""

    async def main() -> dict[str, Any]:
        async with hub(url) as client:
            elapsed = await one_long_sequence(client, length)
        return {"length": length, "seconds": elapsed}

    return _run(main)


def latency(url: str, samples: int = 50) -> dict[str, Any]:
    """Schedule-to-completion time of one hello-cities orchestration at a time."""

    async def main() -> dict[str, Any]:
        timings: list[float] = []
        async with hub(url) as client:
            for index in range(samples + 5):
                elapsed = await one_hello_cities(client)
                if index >= 5:  # the first few warm up caches and connections
                    timings.append(elapsed)
        return {"samples": samples, **latency_summary(timings)}

    return _run(main)


def entity_signals(url: str, count: int = 10_000) -> dict[str, Any]:
    """``count`` signals to one counter entity, until its state shows them all."""

    async def main() -> dict[str, Any]:
        entity = dtfx.EntityInstanceId("counter", "hot")
        async with hub(url) as client:
            started = time.perf_counter()
            await asyncio.gather(*(client.signal_entity(entity, "add", 1) for _ in range(count)))
            await _entity_reaches(client, entity, count)
            elapsed = time.perf_counter() - started
        return {"count": count, "seconds": elapsed, "per_second": count / elapsed}

    return _run(main)


def entity_many(url: str, entities: int = 1000) -> dict[str, Any]:
    """10 signals to each of ``entities`` counter entities."""

    async def main() -> dict[str, Any]:
        ids = [dtfx.EntityInstanceId("counter", f"k{index}") for index in range(entities)]
        async with hub(url) as client:
            started = time.perf_counter()
            for _ in range(10):
                await asyncio.gather(*(client.signal_entity(entity, "add", 1) for entity in ids))
            for entity in ids:
                await _entity_reaches(client, entity, 10)
            elapsed = time.perf_counter() - started
        operations = entities * 10
        return {"operations": operations, "seconds": elapsed, "per_second": operations / elapsed}

    return _run(main)


async def _entity_reaches(client: dtfx.AsyncClient, entity: dtfx.EntityInstanceId, value: int) -> None:
    while True:
        metadata = await client.get_entity(entity)
        if metadata is not None and metadata.get_state() == value:
            return
        await asyncio.sleep(0.005)


if __name__ == "__main__":
    dispatch(
        {
            "sequence": sequence,
            "fan_out": fan_out_in,
            "long_sequence": long_chain,
            "latency": latency,
            "entity_signals": entity_signals,
            "entity_many": entity_many,
        }
    )
