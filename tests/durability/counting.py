"""An app whose one activity counts its runs, for the tests of work in flight when the store
goes away: ``chain`` runs it ``length`` times one after the other (and returns ``length``),
``fan`` ``count`` times at once (and returns the sum of 1 to ``count``); and the work those
tests start on it, with what it should give."""

from __future__ import annotations

import collections
from datetime import timedelta
from typing import Any

import dtfx
from tests.chain_orchestrators import chain

Runs = collections.Counter[tuple[str, int]]
"""The activity's runs, by instance id and task id."""

HOUR_LEASES = dtfx.WorkerOptions(lease_duration=timedelta(hours=1))
"""Leases that outlast the test: only the worker giving its work back carries it on."""
OUTPUTS = [600, 600, 20100, 20100]
"""The outputs of :func:`start_work`'s orchestrations, in order."""
ACTIVITIES = 2 * 600 + 2 * 200
"""The activities :func:`start_work`'s orchestrations run."""


def counting_app() -> tuple[dtfx.App, Runs]:
    """A fresh app, and the counter of its activity's runs."""
    runs: Runs = collections.Counter()
    counting = dtfx.App()

    @counting.activity
    def step(ctx: dtfx.ActivityContext, value: int) -> int:
        runs[ctx.orchestration_id, ctx.task_id] += 1
        return value + 1

    counting.orchestrator(chain)

    @counting.orchestrator
    def fan(ctx: dtfx.OrchestrationContext, count: int) -> Any:
        return sum((yield dtfx.when_all([ctx.call_activity(step, input=n) for n in range(count)])))

    return counting, runs


async def start_work(client: dtfx.AsyncClient) -> list[str]:
    """Start two chains of 600 steps and two fan-outs of 200 activities; their instance ids."""
    chains = [await client.schedule_new_orchestration("chain", input=600) for _ in range(2)]
    fans = [await client.schedule_new_orchestration("fan", input=200) for _ in range(2)]
    return chains + fans
