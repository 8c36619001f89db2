"""Hello cities: an orchestration that greets cities one after another.

Run it all in one process (a worker and a client on the default SQLite task hub,
``./.dtfx/taskhub.db``)::

    python -m dtfx.examples.hello_cities

or run the worker and the client as two processes::

    dtfx run dtfx.examples.hello_cities
    dtfx start hello_cities --input '["Tokyo", "Lima"]' --wait
"""

from __future__ import annotations

import sys
from collections.abc import Generator
from typing import Any

import dtfx

app = dtfx.App()

CITIES = ["Tokyo", "Seattle", "London"]


@app.activity
def say_hello(ctx: dtfx.ActivityContext, city: str) -> str:
    """An activity: ordinary code that may do I/O. Its result is recorded in the history."""
    return f"Hello, {city}!"


@app.orchestrator
def hello_cities(ctx: dtfx.OrchestrationContext, cities: list[str] | None) -> Generator[dtfx.Task[Any], Any, list[str]]:
    """An orchestrator: each ``yield`` waits durably for a task; after a crash it resumes where it was."""
    greetings = []
    for city in cities or CITIES:
        greeting = yield ctx.call_activity(say_hello, input=city)
        greetings.append(greeting)
    return greetings


def main(cities: list[str]) -> list[str]:
    """Run a worker and a client on the default backend, start one orchestration and return its result."""
    # The client shares the worker's backend: it hears of the result at once.
    with dtfx.Worker(app=app) as worker, dtfx.Client(worker.backend) as client:
        instance_id = client.schedule_new_orchestration(hello_cities, input=cities)
        state = client.wait_for_orchestration_completion(instance_id, timeout=60)
    if state is None:  # only if someone purged it meanwhile
        raise dtfx.OrchestrationNotFoundError(instance_id)
    state.raise_if_failed()
    result: list[str] = state.get_output()
    return result


if __name__ == "__main__":
    for line in main(sys.argv[1:] or CITIES):
        print(line)
