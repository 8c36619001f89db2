"""Durable entities and the orchestrations that use them, written with the official ``durabletask`` SDK.

They run on the SDK's own worker (``TaskHubGrpcWorker``) against the dtfx sidecar.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from durabletask import task, worker
from durabletask.entities import DurableEntity, EntityContext, EntityInstanceId


def counter(ctx: EntityContext, amount: Any) -> Any:
    """A function entity: ``add``, ``get``, ``reset`` (to a falsy 0), ``fail_after_add``, ``delete``."""
    value = ctx.get_state(int, 0)
    if ctx.operation == "add":
        ctx.set_state(value + amount)
    elif ctx.operation == "reset":
        ctx.set_state(0)
    elif ctx.operation == "fail_after_add":
        ctx.set_state(value + 1000)
        raise ValueError("add rolled back")
    elif ctx.operation == "delete":
        ctx.set_state(None)
    return ctx.get_state(int, 0)


class Account(DurableEntity):
    """A class entity: each public method is an operation."""

    def deposit(self, amount: int) -> int:
        balance = self.get_state(int, 0) + amount
        self.set_state(balance)
        return balance

    def withdraw(self, amount: int) -> int:
        balance = self.get_state(int, 0)
        if amount > balance:
            raise ValueError(f"insufficient funds: {balance} < {amount}")
        self.set_state(balance - amount)
        return balance - amount

    def balance(self) -> int:
        return self.get_state(int, 0)


class Forwarder(DurableEntity):
    """Counts what it forwards, and signals another entity with each amount."""

    def forward(self, amount: int) -> None:
        self.signal_entity(EntityInstanceId("Account", "savings"), "deposit", amount)
        self.set_state(self.get_state(int, 0) + 1)


class Starter(DurableEntity):
    """Starts a ``greet`` orchestration named after its key."""

    def start(self, name: str) -> str:
        key = self.entity_context.entity_id.key
        return self.schedule_new_orchestration("greet", name, instance_id=f"started-by-{key}")


def greet(ctx: task.OrchestrationContext, name: str) -> str:
    return f"hello {name}"


def use_counter(ctx: task.OrchestrationContext, key: str) -> Any:
    """Signals, then calls, a counter; reports a failed call too."""
    target = EntityInstanceId("counter", key)
    ctx.signal_entity(target, "add", 5)
    after_add = yield ctx.call_entity(target, "add", 10)
    try:
        yield ctx.call_entity(target, "fail_after_add")
        failure = None
    except task.TaskFailedError as error:
        failure = error.details.message
    current = yield ctx.call_entity(target, "get")
    return [after_add, failure, current]


def transfer(ctx: task.OrchestrationContext, move: list[Any]) -> Any:
    """Moves money between two accounts inside a critical section."""
    source, target = EntityInstanceId("Account", move[0]), EntityInstanceId("Account", move[1])
    amount = move[2]
    with (yield ctx.lock_entities([target, source])):
        balance = yield ctx.call_entity(source, "balance")
        if balance < amount:
            return "refused"
        yield ctx.call_entity(source, "withdraw", amount)
        yield ctx.call_entity(target, "deposit", amount)
    return "moved"


def hold_lock(ctx: task.OrchestrationContext, key: str) -> Any:
    """Locks a counter, then waits for an event that never comes."""
    with (yield ctx.lock_entities([EntityInstanceId("counter", key)])):
        yield ctx.wait_for_external_event("never")


def schedule_signal(ctx: task.OrchestrationContext, key: str) -> str:
    """Signals a counter a little later than now."""
    later = ctx.current_utc_datetime + timedelta(milliseconds=300)
    ctx.signal_entity(EntityInstanceId("counter", key), "add", 1, signal_time=later)
    return "scheduled"


def call_native_counter(ctx: task.OrchestrationContext, key: str) -> Any:
    """Signals, then calls, the counter entity of a native dtfx worker (registered there as ``native_counter``)."""
    target = EntityInstanceId("native_counter", key)
    ctx.signal_entity(target, "add", 10)
    first = yield ctx.call_entity(target, "add", 2)
    second = yield ctx.call_entity(target, "add", 3)
    return [first, second]


ENTITIES: list[Any] = [counter, Account, Forwarder, Starter]
ORCHESTRATORS = [greet, use_counter, transfer, hold_lock, schedule_signal, call_native_counter]


def register(sdk: worker.TaskHubGrpcWorker) -> None:
    """Register every entity and orchestrator above with an SDK worker."""
    for entity in ENTITIES:
        sdk.add_entity(entity)
    for orchestrator in ORCHESTRATORS:
        sdk.add_orchestrator(orchestrator)
