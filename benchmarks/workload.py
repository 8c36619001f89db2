"""What every benchmark process shares: the workload sizes and the way results are reported.

Each measurement runs in a process of its own (``python -m benchmarks.dtfx_bench ...``
or ``benchmarks.dbos_bench``), on a store of its own, and prints one JSON object on
its last line of output: the measurement plus the process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
from collections.abc import Callable
from typing import Any

CITIES = ["Tokyo", "Seattle", "London"]
GREETINGS = [f"Hello, {city}!" for city in CITIES]


def greeting(city: str) -> str:
    """The activity / step of the sequence workload."""
    return f"Hello, {city}!"


def percentile(samples: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of the samples fall (nearest rank)."""
    ordered = sorted(samples)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))
    return ordered[index]


def latency_summary(samples: list[float]) -> dict[str, float]:
    """p50 / p99 / mean of latencies, in milliseconds."""
    return {
        "p50_ms": percentile(samples, 0.50) * 1000,
        "p99_ms": percentile(samples, 0.99) * 1000,
        "mean_ms": statistics.fmean(samples) * 1000,
    }


def report(result: dict[str, Any]) -> None:
    """Print the result, with the process's peak RSS, as the last line of output."""
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)


def dispatch(workloads: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """``python -m benchmarks.X WORKLOAD URL [N]``: run one workload and report it."""
    name, url, *rest = sys.argv[1:]
    size = int(rest[0]) if rest else None
    result = workloads[name](url, size) if size is not None else workloads[name](url)
    report(result)
