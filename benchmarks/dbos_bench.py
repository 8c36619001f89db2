"""The DBOS Transact side of the benchmarks: the same workloads, written the DBOS way.

Steps are ``@DBOS.step`` functions called from ``@DBOS.workflow`` functions; parallel
work is enqueued on a DBOS queue, as the DBOS documentation does fan-out. DBOS keeps
its state in the same kind of store (``system_database_url``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dbos import DBOS

from benchmarks.workload import CITIES, GREETINGS, dispatch, greeting, latency_summary

QUEUE = "fan_out"


@DBOS.step()
def say_hello(city: str) -> str:
    return greeting(city)


@DBOS.workflow()
def hello_cities(cities: list[str]) -> list[str]:
    return [say_hello(city) for city in cities]


@DBOS.step()
def double(value: int) -> int:
    return value * 2


@DBOS.workflow()
def fan_out(count: int) -> int:
    queue = DBOS.retrieve_queue(QUEUE)
    assert queue is not None, "registered by launched()"
    handles = [queue.enqueue(double, index) for index in range(count)]
    return sum(handle.get_result() for handle in handles)


@DBOS.workflow()
def long_sequence(length: int) -> int:
    return sum(double(step) for step in range(length))


def launched(url: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Launch DBOS on ``url``, run ``measure``, shut DBOS down."""
    logging.getLogger("dbos").setLevel(logging.WARNING)
    DBOS(config={"name": "bench", "system_database_url": url})
    DBOS.launch()
    DBOS.register_queue(QUEUE, polling_interval_sec=0.1)
    try:
        return measure()
    finally:
        DBOS.destroy()


def sequence(url: str, count: int = 1000) -> dict[str, Any]:
    def measure() -> dict[str, Any]:
        started = time.perf_counter()
        handles = [DBOS.start_workflow(hello_cities, CITIES) for _ in range(count)]
        outputs = [handle.get_result() for handle in handles]
        elapsed = time.perf_counter() - started
        assert all(output == GREETINGS for output in outputs)
        return {"count": count, "seconds": elapsed, "per_second": count / elapsed}

    return launched(url, measure)


def fan_out_in(url: str, count: int = 1000) -> dict[str, Any]:
    def measure() -> dict[str, Any]:
        started = time.perf_counter()
        total = DBOS.start_workflow(fan_out, count).get_result()
        elapsed = time.perf_counter() - started
        assert total == count * (count - 1)
        return {"count": count, "seconds": elapsed}

    return launched(url, measure)


def long_chain(url: str, length: int = 1000) -> dict[str, Any]:
    def measure() -> dict[str, Any]:
        started = time.perf_counter()
        total = DBOS.start_workflow(long_sequence, length).get_result()
        elapsed = time.perf_counter() - started
        assert total == length * (length - 1)
        return {"length": length, "seconds": elapsed}

    return launched(url, measure)


def latency(url: str, samples: int = 50) -> dict[str, Any]:
    def measure() -> dict[str, Any]:
        timings: list[float] = []
        for index in range(samples + 5):
            started = time.perf_counter()
            assert DBOS.start_workflow(hello_cities, CITIES).get_result() == GREETINGS
            if index >= 5:
                timings.append(time.perf_counter() - started)
        return {"samples": samples, **latency_summary(timings)}

    return launched(url, measure)


if __name__ == "__main__":
    dispatch({"sequence": sequence, "fan_out": fan_out_in, "long_sequence": long_chain, "latency": latency})
