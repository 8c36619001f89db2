"""Orchestrators that chain the ``step`` activity of whichever app registers them (each test's
app has a step of its own: counted, slowed, signalling), so that they are written once."""

from __future__ import annotations

from typing import Any

import dtfx


def chain(ctx: dtfx.OrchestrationContext, length: int) -> Any:
    """``length`` steps, each given the result of the one before; the last result."""
    value = 0
    for _ in range(length):
        value = yield ctx.call_activity("step", input=value)
    return value


def chain_then_wait(ctx: dtfx.OrchestrationContext, length: int) -> Any:
    """:func:`chain`, then a wait for the event ``go``; the last result and the event's data."""
    value = yield from chain(ctx, length)
    return [value, (yield ctx.wait_for_external_event("go"))]
