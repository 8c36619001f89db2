"""A change measured in one process, against itself: the "paired" rows of BENCHMARKS.md.

The machine's speed drifts by up to 2.5x within minutes, more than most changes gain, so
separate processes a few minutes apart cannot tell them apart. Here one worker and client
on one fresh store run rounds of a workload, with the change switched on and off in
alternating order (off-on, on-off, ...); each round pair gives a ratio, and the report is
the median ratio with its quartiles. A ratio below 1 means the change made it faster.

The change is a Python file defining ``on()`` and ``off()``, which switch between the two
behaviours (by monkeypatching, typically: the new code is in place, and ``on()`` puts the
old one back, or the reverse). Workloads: ``latency`` (the median of 40 hello-cities
orchestrations, one at a time), ``chain`` (a step of one 200-activity sequence) and
``sequence`` (300 hello-cities orchestrations started at once, per orchestration).

Usage: ``python -m benchmarks.paired sqlite|postgres CHANGE.py [--rounds 20] [--workload latency|chain|sequence]``
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import dtfx
from benchmarks import dtfx_bench
from benchmarks.run import store_url


async def latency(client: dtfx.AsyncClient) -> float:
    """Seconds from schedule to completion, the median of 40 hello-cities orchestrations."""
    return statistics.median([await dtfx_bench.one_hello_cities(client) for _ in range(40)])


async def chain(client: dtfx.AsyncClient) -> float:
    """Seconds per step of a 200-activity sequence."""
    return await dtfx_bench.one_long_sequence(client, 200) / 200


async def sequence(client: dtfx.AsyncClient) -> float:
    """Seconds per orchestration of 300 hello-cities orchestrations started at once (the
    inverse of the sequence workload's throughput)."""
    return await dtfx_bench.many_hello_cities(client, 300) / 300


WORKLOADS: dict[str, Callable[[dtfx.AsyncClient], Awaitable[float]]] = {
    "latency": latency,
    "chain": chain,
    "sequence": sequence,
}


def load_change(path: str) -> ModuleType:
    """The change's module, which defines ``on()`` and ``off()``."""
    spec = importlib.util.spec_from_file_location("change", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"Cannot load {path}")
    change = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(change)
    return change


async def pairs(
    url: str, change: ModuleType, workload: Callable[[dtfx.AsyncClient], Awaitable[float]], rounds: int
) -> dict[str, Any]:
    """``rounds`` pairs of the workload, off and on in alternating order; the medians and the ratio's."""
    offs: list[float] = []
    ons: list[float] = []
    async with dtfx_bench.hub(url) as client:
        for switch in (change.on, change.off):  # warm both up
            switch()
            await workload(client)
        for index in range(rounds):
            order = ((change.off, offs), (change.on, ons))
            for switch, values in order if index % 2 == 0 else reversed(order):
                switch()
                values.append(await workload(client))
        change.off()
    ratios = [on / off for on, off in zip(ons, offs, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "off_us": statistics.median(offs) * 1e6,
        "on_us": statistics.median(ons) * 1e6,
        "ratio": statistics.median(ratios),
        "ratio_q1": quartiles[0],
        "ratio_q3": quartiles[2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", choices=["sqlite", "postgres"])
    parser.add_argument("change", help="a Python file defining on() and off()")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="latency")
    arguments = parser.parse_args()
    change = load_change(arguments.change)
    with store_url(arguments.store) as url:
        result = dtfx_bench._run(lambda: pairs(url, change, WORKLOADS[arguments.workload], arguments.rounds))
    print(
        f"{arguments.workload} on {arguments.store}: off {result['off_us']:.0f} µs, on {result['on_us']:.0f} µs;"
        f" on/off {result['ratio']:.3f} (quartiles {result['ratio_q1']:.3f}-{result['ratio_q3']:.3f})"
    )


if __name__ == "__main__":
    main()
