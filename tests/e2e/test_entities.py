"""Durable entities, end to end: functions and classes, calls, signals, locks, queries, cleanup."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from typing import Annotated, Any

import pytest

import dtfx
from dtfx import EntityInstanceId
from dtfx import OrchestrationStatus as Status
from dtfx.backends.base import utc_now
from dtfx.core.history import EntityLockRequested
from tests.e2e.conftest import Hub


def counter(ctx: dtfx.EntityContext, amount: int | None) -> Any:
    value = ctx.get_state(int, 0)
    if ctx.operation == "add":
        ctx.set_state(value + (amount or 0))
    elif ctx.operation == "reset":
        ctx.set_state(0)
    elif ctx.operation == "fail_after_add":
        ctx.set_state(value + 1000)
        raise ValueError("add rolled back")
    elif ctx.operation == "delete":
        ctx.delete_state()
    return ctx.get_state(int, 0)


class Account(dtfx.DurableEntity):
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
        return int(self.get_state(int, 0))

    def close(self) -> None:
        self.delete_state()


async def _wait_for_entity_state(hub: Hub, entity: EntityInstanceId, expected: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        metadata = await hub.client.get_entity(entity)
        if metadata is not None and metadata.get_state() == expected:
            return
        assert asyncio.get_running_loop().time() < deadline, f"entity state is {metadata and metadata.get_state()}"
        await asyncio.sleep(0.01)


async def _wait_for_unlocked(hub: Hub, entity: EntityInstanceId, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (metadata := await hub.client.get_entity(entity)) is not None and metadata.locked_by is not None:
        assert asyncio.get_running_loop().time() < deadline, f"{entity} stays locked by {metadata.locked_by}"
        await asyncio.sleep(0.01)


async def test_client_signals_run_in_order_and_state_is_visible(hub: Hub, app: dtfx.App) -> None:
    @app.entity
    def journal(ctx: dtfx.EntityContext, entry: str) -> None:
        ctx.set_state([*ctx.get_state(list, []), entry])

    entity = EntityInstanceId("Journal", "today")
    assert str(entity) == "@journal@today"
    async with hub.worker(app):
        before = utc_now()
        for index in range(30):
            await hub.client.signal_entity(entity, "append", f"entry-{index}")
        await _wait_for_entity_state(hub, entity, [f"entry-{index}" for index in range(30)])
    metadata = await hub.client.get_entity(entity)
    assert metadata is not None and metadata.last_modified >= before and metadata.locked_by is None
    assert (await hub.client.get_entity(entity, include_state=False)).serialized_state is None  # type: ignore[union-attr]
    assert await hub.client.get_entity(EntityInstanceId("journal", "never-used")) is None


async def test_a_batch_that_outlasts_the_lease_keeps_it_and_runs_once(hub: Hub, app: dtfx.App) -> None:
    runs: list[int] = []

    @app.entity
    def slow(ctx: dtfx.EntityContext, amount: int) -> None:
        runs.append(amount)
        time.sleep(0.8)  # longer than the lease
        ctx.set_state(ctx.get_state(int, 0) + amount)

    entity = EntityInstanceId("slow", "one")
    options = dtfx.WorkerOptions(lease_duration=timedelta(milliseconds=500))
    async with hub.worker(app, options=options):
        for amount in (1, 2, 4):
            await hub.client.signal_entity(entity, "add", amount)
        await _wait_for_entity_state(hub, entity, 7)
    assert runs == [1, 2, 4]


async def test_orchestrations_call_and_signal_entities(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(counter)
    target = EntityInstanceId("counter", "c1")

    @app.orchestrator
    def use_counter(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        ctx.signal_entity(target, "add", 5)
        after_add = yield ctx.call_entity(target, "add", 10)
        current = yield ctx.call_entity(target, "get")
        return [after_add, current]

    async with hub.worker(app):
        state = await hub.run(use_counter)
    assert state.get_output() == [15, 15]


async def test_falsy_state_is_real_state(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(counter)
    entity = EntityInstanceId("counter", "zero")
    async with hub.worker(app):
        await hub.client.signal_entity(entity, "reset")
        await _wait_for_entity_state(hub, entity, 0)
        metadata = await hub.client.get_entity(entity)
        assert metadata is not None and metadata.serialized_state == "0"
        await hub.client.signal_entity(entity, "delete")
        deadline = asyncio.get_running_loop().time() + 10
        while await hub.client.get_entity(entity) is not None:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)


async def test_a_failed_operation_rolls_back_only_its_own_change(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(counter)
    target = EntityInstanceId("counter", "rollback")

    @app.orchestrator
    def failing_call(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_entity(target, "add", 1)
        try:
            yield ctx.call_entity(target, "fail_after_add")
        except dtfx.EntityOperationFailedError as error:
            failure = [error.entity_id, error.operation, error.details.message, isinstance(error, dtfx.TaskFailedError)]
        total = yield ctx.call_entity(target, "add", 1)
        return [failure, total]

    async with hub.worker(app):
        state = await hub.run(failing_call)
    assert state.get_output() == [["@counter@rollback", "fail_after_add", "add rolled back", True], 2]


async def test_a_failed_signal_is_a_warning_in_the_log_and_a_failed_call_is_the_callers(
    hub: Hub, app: dtfx.App, caplog: pytest.LogCaptureFixture
) -> None:
    # No one hears of a signal's failure but the log (a deploy that renamed the operation, say).
    app.add_entity(Account)
    entity = EntityInstanceId("account", "renamed")

    @app.orchestrator
    def calls(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_entity(entity, "add_funds", 1)
        except dtfx.EntityOperationFailedError as error:
            return error.details.message
        return None

    caplog.set_level(logging.DEBUG, logger="dtfx.worker.entities")
    async with hub.worker(app):
        await hub.client.signal_entity(entity, "add", 5)
        await hub.client.signal_entity(entity, "deposit", 5)
        await _wait_for_entity_state(hub, entity, 5)
        called = await hub.run(calls)
    failures = [(r.levelno, r.getMessage()) for r in caplog.records if "failed" in r.getMessage()]
    assert failures == [
        (logging.WARNING, "Entity @account@renamed: operation add failed"),
        (logging.DEBUG, "Entity @account@renamed: operation add_funds failed"),
    ]
    assert "add_funds" in called.get_output()  # the caller hears of it


async def test_a_state_of_another_plain_type_is_converted_as_the_sdk_does_or_refused(hub: Hub, app: dtfx.App) -> None:
    # The state a deploy's earlier code kept: 5, read by code that keeps a dict now.
    @app.entity
    def tally(ctx: dtfx.EntityContext, _: Any) -> Any:
        if ctx.operation == "start":
            ctx.set_state(5)
            return None
        kinds = {"as_text": str, "as_number": float, "as_dict": dict, "annotated": Annotated[int, {"unit": "apples"}]}
        return ctx.get_state(kinds[ctx.operation])

    entity = EntityInstanceId("tally", "t")

    @app.orchestrator
    def reads(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_entity(entity, "start")
        seen = []
        for operation in ("as_text", "as_number", "annotated"):
            seen.append((yield ctx.call_entity(entity, operation)))
        try:
            yield ctx.call_entity(entity, "as_dict")
        except dtfx.EntityOperationFailedError as error:
            seen.append(error.details.message)
        return seen

    async with hub.worker(app):
        state = await hub.run(reads)
    assert state.get_output() == ["5", 5.0, 5, "Could not convert state of type 'int' to 'dict'"]


async def test_class_entities_and_entity_to_entity_signals(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(Account)

    @app.entity
    def forwarder(ctx: dtfx.EntityContext, amount: int) -> None:
        ctx.signal_entity(EntityInstanceId("account", "savings"), "deposit", amount)
        ctx.set_state(ctx.get_state(int, 0) + 1)

    @app.orchestrator
    def check(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        try:
            yield ctx.call_entity(EntityInstanceId("account", "savings"), "withdraw", 1_000_000)
        except dtfx.EntityOperationFailedError as error:
            refused = error.details.message
        balance = yield ctx.call_entity(EntityInstanceId("account", "savings"), "balance", return_type=int)
        return [refused, balance]

    async with hub.worker(app):
        for _ in range(3):
            await hub.client.signal_entity(EntityInstanceId("forwarder", "f"), "forward", 25)
        await _wait_for_entity_state(hub, EntityInstanceId("account", "savings"), 75)
        state = await hub.run(check)
        for deleting in ("close", "delete"):  # its own operation, then the built-in one
            await hub.client.signal_entity(EntityInstanceId("account", "savings"), "deposit", 5)
            await _wait_for_entity_state(hub, EntityInstanceId("account", "savings"), 80 if deleting == "close" else 5)
            await hub.client.signal_entity(EntityInstanceId("account", "savings"), deleting)
            deadline = asyncio.get_running_loop().time() + 10
            while await hub.client.get_entity(EntityInstanceId("account", "savings")) is not None:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
    assert state.get_output() == ["insufficient funds: 75 < 1000000", 75]


class Tally(dtfx.DurableEntity):
    def add(self, amount: int = 1) -> int:
        total = self.get_state(int, 0) + amount
        self.set_state(total)
        return total


async def test_a_class_entitys_parameter_default_applies_when_no_input_comes(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(Tally)

    @app.orchestrator
    def tally(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        once = yield ctx.call_entity(EntityInstanceId("tally", "t"), "add")
        return [once, (yield ctx.call_entity(EntityInstanceId("tally", "t"), "add", 10))]

    async with hub.worker(app):
        state = await hub.run(tally)
    assert state.runtime_status == Status.COMPLETED and state.get_output() == [1, 11]


async def test_an_entity_is_named_by_its_id_and_never_by_another_instances(hub: Hub, app: dtfx.App) -> None:
    """A plain instance id as an entity would send the entity's message to that orchestration."""
    app.add_entity(counter)

    @app.orchestrator
    def bystander(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.wait_for_external_event("go"))

    @app.orchestrator
    def misnamed(ctx: dtfx.OrchestrationContext, target: str) -> Any:
        outcomes = []
        for send in (ctx.signal_entity, ctx.call_entity, lambda target, _: ctx.lock_entities([target])):
            try:
                send(target, "add")
            except ValueError as error:
                outcomes.append(str(error))
        outcomes.append((yield ctx.call_entity("@counter@text", "add", 2)))  # the id's text form is fine
        return outcomes

    async with hub.worker(app):
        await hub.client.schedule_new_orchestration(bystander, instance_id="bystander")
        state = await hub.run(misnamed, "bystander")
        with pytest.raises(ValueError, match="Not an entity id"):
            await hub.client.signal_entity("bystander", "add")  # type: ignore[arg-type]
        await hub.client.raise_orchestration_event("bystander", "go", data="unharmed")
        bystanding = await hub.client.wait_for_orchestration_completion("bystander", timeout=10)
    assert state.get_output() == ["Not an entity id (expected '@name@key'): 'bystander'"] * 3 + [2]
    assert bystanding is not None and bystanding.get_output() == "unharmed"


async def test_an_entity_starts_an_orchestration(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def greet(ctx: dtfx.OrchestrationContext, name: str) -> str:
        return f"hello {name}"

    @app.entity
    def starter(ctx: dtfx.EntityContext, name: str) -> str:  # by function, as orchestrations call it
        return ctx.schedule_new_orchestration(greet, name, instance_id=f"started-by-{ctx.entity_id.key}")

    async with hub.worker(app):
        await hub.client.signal_entity(EntityInstanceId("starter", "k"), "start", "ann")
        await hub.wait_for_state("started-by-k", lambda s: s.runtime_status.is_terminal)
        state = await hub.client.get_orchestration_state("started-by-k")
    assert state is not None and state.get_output() == "hello ann"


async def test_an_entity_cannot_start_an_orchestration_under_a_bad_id(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def greet(ctx: dtfx.OrchestrationContext, name: str) -> str:
        return f"hello {name}"

    @app.entity
    def starter(ctx: dtfx.EntityContext, instance_id: str) -> str:
        ctx.set_state(instance_id)  # rolled back with the operation when the start is refused
        return ctx.schedule_new_orchestration("greet", "ann", instance_id=instance_id)

    @app.orchestrator
    def start_all(ctx: dtfx.OrchestrationContext, job: tuple[str, list[str]]) -> Any:
        """Call the entity ``job[0]`` to start once with each input, collecting results or error types."""
        entity, inputs = job
        outcomes = []
        for value in inputs:
            try:
                outcomes.append((yield ctx.call_entity(EntityInstanceId(entity, "k"), "start", value)))
            except dtfx.EntityOperationFailedError as error:
                outcomes.append(error.details.error_type)
        return outcomes

    @app.entity
    def named_starter(ctx: dtfx.EntityContext, name: str) -> str:
        return ctx.schedule_new_orchestration(name, "ann", instance_id=f"named-{len(name)}")

    async with hub.worker(app):
        state = await hub.run(start_all, ("starter", ["bad\x00id", "@greet@x", "good"]))
        await hub.wait_for_state("good", lambda s: s.runtime_status.is_terminal)
        metadata = await hub.client.get_entity(EntityInstanceId("starter", "k"))
        named = await hub.run(start_all, ("named_starter", ["gr\x00eet", "greet"]))  # a NUL: the entity goes on
        await hub.wait_for_state("named-5", lambda s: s.runtime_status.is_terminal)
    assert named.get_output() == ["ValueError", "named-5"]
    refused = "dtfx.core.errors.InvalidInstanceIdError"
    assert state.get_output() == [refused, refused, "good"]
    assert metadata is not None and metadata.get_state() == "good"
    assert await hub.client.get_entity(EntityInstanceId("greet", "x")) is None


async def test_scheduled_signals_wait_for_their_time(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(counter)
    entity = EntityInstanceId("counter", "later")

    @app.orchestrator
    def schedule(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        ctx.signal_entity(entity, "add", 1, signal_time=ctx.current_utc_datetime + timedelta(milliseconds=400))
        return "scheduled"

    async with hub.worker(app):
        await hub.client.signal_entity(entity, "add", 10, signal_time=utc_now() + timedelta(milliseconds=500))
        await asyncio.sleep(0.1)
        assert await hub.client.get_entity(entity) is None
        await hub.run(schedule)
        await _wait_for_entity_state(hub, entity, 11)


async def test_critical_sections_keep_transfers_consistent(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(Account)
    a, b = EntityInstanceId("account", "a"), EntityInstanceId("account", "b")

    @app.orchestrator
    def transfer(ctx: dtfx.OrchestrationContext, move: list[Any]) -> Any:
        source, target, amount = EntityInstanceId("account", move[0]), EntityInstanceId("account", move[1]), move[2]
        lock = yield ctx.lock_entities([target, source])  # any order: locks are taken in a global order
        with lock:
            balance = yield ctx.call_entity(source, "balance")
            if balance < amount:
                return "refused"
            yield ctx.call_entity(source, "withdraw", amount)
            yield ctx.call_entity(target, "deposit", amount)
        return "moved"

    async with hub.worker(app):
        await hub.client.signal_entity(a, "deposit", 100)
        await hub.client.signal_entity(b, "deposit", 100)
        ids = [
            await hub.client.schedule_new_orchestration(transfer, input=["a", "b", 30] if n % 2 else ["b", "a", 20])
            for n in range(12)
        ]
        results = [await hub.client.wait_for_orchestration_completion(i, timeout=30) for i in ids]
        balances = [await _unlocked(hub, e) for e in (a, b)]
    assert all(r is not None and r.runtime_status == Status.COMPLETED for r in results)
    assert sum(m.get_state() for m in balances) == 200


async def _unlocked(hub: Hub, entity: EntityInstanceId, timeout: float = 10) -> dtfx.EntityMetadata:
    """The entity's metadata once its lock is released (unlocks travel as messages)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        metadata = await hub.client.get_entity(entity)
        if metadata is not None and metadata.locked_by is None:
            return metadata
        assert asyncio.get_running_loop().time() < deadline, f"{entity} stays locked"
        await asyncio.sleep(0.01)


async def test_locks_are_released_when_the_orchestration_fails(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(counter)
    entity = EntityInstanceId("counter", "locked")

    @app.orchestrator
    def crash_in_section(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.lock_entities([entity])
        yield ctx.call_entity(entity, "add", 1)
        raise RuntimeError("crash inside the critical section")

    @app.orchestrator
    def after(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_entity(entity, "add", 1))

    async with hub.worker(app):
        failed = await hub.run(crash_in_section)
        later = await hub.run(after)
    assert failed.runtime_status == Status.FAILED
    assert later.get_output() == 2


HELD = EntityInstanceId("counter", "held")


def holds_a_lock(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
    with (yield ctx.lock_entities([HELD])):
        yield ctx.call_entity(HELD, "add", 1)
        ctx.set_custom_status("in the section")
        yield ctx.wait_for_external_event("go")


def calls_held(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.call_entity(HELD, "add", 1))


_LOCK_HOLDER_APP = dtfx.App()
_LOCK_HOLDER_APP.add_entity(counter)
_LOCK_HOLDER_APP.add_orchestrator(holds_a_lock)
_LOCK_HOLDER_APP.add_orchestrator(calls_held)


@pytest.mark.parametrize("ending", ["not registered", "terminated by a worker of another version"])
async def test_locks_are_released_when_the_orchestration_ends_without_its_code(
    hub: Hub, app: dtfx.App, ending: str
) -> None:
    """A deploy that dropped the orchestrator, or a terminate that a worker which may not run
    its version carries out: its code cannot release the locks, so the worker does."""
    app.update(_LOCK_HOLDER_APP)
    async with hub.worker(app):
        holder = await hub.client.schedule_new_orchestration(holds_a_lock, version="1.0")
        await hub.wait_for_state(holder, lambda state: state.serialized_custom_status is not None)

    next_deploy = dtfx.App()
    next_deploy.add_entity(counter)
    next_deploy.add_orchestrator(calls_held)
    strict = dtfx.VersioningOptions(
        version="2.0",
        match_strategy=dtfx.VersionMatchStrategy.STRICT,
        failure_strategy=dtfx.VersionFailureStrategy.FAIL,
    )
    async with hub.worker(next_deploy if ending == "not registered" else app, versioning=strict):
        if ending == "not registered":
            await hub.client.raise_orchestration_event(holder, "go")
        else:
            await hub.client.terminate_orchestration(holder)
        ended = await hub.client.wait_for_orchestration_completion(holder, timeout=10)
        assert ended is not None and ended.runtime_status == (
            Status.FAILED if ending == "not registered" else Status.TERMINATED
        )
        await _unlocked(hub, HELD)
        after = await hub.run(calls_held, version="2.0", timeout=10)
    assert after.get_output() == 2
    if ending == "not registered":  # its code would go on inside the section, without the lock
        with pytest.raises(dtfx.OrchestrationStateError, match=r"inside a critical section.*@counter@held.*Restart"):
            await hub.client.rewind_orchestration(holder)


async def test_a_start_that_replaces_a_lock_holder_releases_its_locks(hub: Hub, app: dtfx.App) -> None:
    app.update(_LOCK_HOLDER_APP)
    replace_live = dtfx.OrchestrationIdReusePolicy.of(Status.RUNNING, Status.PENDING, Status.COMPLETED)
    async with hub.worker(app):
        await hub.client.schedule_new_orchestration(holds_a_lock, instance_id="same")
        await hub.wait_for_state("same", lambda state: state.serialized_custom_status is not None)
        await hub.client.schedule_new_orchestration(calls_held, instance_id="same", reuse_id_policy=replace_live)
        replaced = await hub.client.wait_for_orchestration_completion("same", timeout=10)
        # And the lock that the new execution takes under the same id is its own.
        await hub.client.schedule_new_orchestration(holds_a_lock, instance_id="same", reuse_id_policy=replace_live)
        await hub.wait_for_state("same", lambda state: state.serialized_custom_status is not None)
        await hub.client.raise_orchestration_event("same", "go")
        await hub.client.wait_for_orchestration_completion("same", timeout=10)
        unlocked = await _unlocked(hub, HELD)
    assert replaced is not None and replaced.get_output() == 2
    assert unlocked.get_state(int) == 3


async def test_a_start_that_replaces_a_lock_holder_lets_a_call_that_waits_for_the_lock_in_at_once(
    hub: Hub, app: dtfx.App
) -> None:
    app.update(_LOCK_HOLDER_APP)

    @app.orchestrator
    def touches_nothing(ctx: dtfx.OrchestrationContext, _: Any) -> str:
        return "replaced"

    replace_live = dtfx.OrchestrationIdReusePolicy.of(Status.RUNNING)
    async with hub.worker(app):
        await hub.client.schedule_new_orchestration(holds_a_lock, instance_id="holder")
        await hub.wait_for_state("holder", lambda state: state.serialized_custom_status is not None)
        waiting = await hub.client.schedule_new_orchestration(calls_held)
        await hub.wait_for_history(waiting, lambda h: any(type(e).__name__ == "EntityOperationCalled" for e in h))
        await hub.client.schedule_new_orchestration(touches_nothing, instance_id="holder", reuse_id_policy=replace_live)
        # Sooner than the dispatchers' next look for work (every 5 s on memory): the unlock woke the entity's.
        called = await hub.client.wait_for_orchestration_completion(waiting, timeout=3)
    assert called is not None and called.get_output() == 2


async def test_a_lock_given_up_while_it_waits_is_not_granted_later(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(counter)
    # Locks are taken in the ids' order: the request waits at the first entity, held, while the
    # second, free, has not heard of it yet.
    held, free = EntityInstanceId("counter", "a-held"), EntityInstanceId("counter", "b-free")

    @app.orchestrator
    def holder(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        with (yield ctx.lock_entities([held])):
            yield ctx.wait_for_external_event("release")

    @app.orchestrator
    def impatient(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        lock = ctx.lock_entities([held, free])
        winner = yield dtfx.when_any([lock, ctx.create_timer(timedelta(milliseconds=300))])
        return "locked" if winner is lock else "gave up"

    @app.orchestrator
    def later(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        with (yield ctx.lock_entities([held, free])):
            return (yield ctx.call_entity(free, "add", 1))

    async with hub.worker(app):
        holder_id = await hub.client.schedule_new_orchestration(holder)
        await hub.wait_for_history(holder_id, lambda h: any(type(e).__name__ == "EntityLockGranted" for e in h))
        assert (await hub.run(impatient)).get_output() == "gave up"
        await hub.client.raise_orchestration_event(holder_id, "release")
        assert (await hub.run(later, timeout=10)).get_output() == 1  # it got both locks
        for entity in (held, free):
            await _wait_for_unlocked(hub, entity)


async def test_critical_section_misuse_raises_the_documented_errors(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(counter)
    locked, other = EntityInstanceId("counter", "x"), EntityInstanceId("counter", "y")

    @app.orchestrator
    def misuse(ctx: dtfx.OrchestrationContext, case: str) -> Any:
        request = ctx.lock_entities([locked])
        if case == "call before the lock":
            ctx.call_entity(locked, "get")
        lock = yield request
        with lock:
            if case == "nested":
                ctx.lock_entities([other])
            elif case == "unlocked entity":
                ctx.call_entity(other, "get")
            elif case == "signal locked":
                ctx.signal_entity(locked, "add", 1)
            elif case == "two calls":
                ctx.call_entity(locked, "get")
                ctx.call_entity(locked, "get")
            elif case == "sub-orchestration":
                ctx.call_sub_orchestrator("anything")
        return "no error"

    cases = ["call before the lock", "nested", "unlocked entity", "signal locked", "two calls", "sub-orchestration"]
    async with hub.worker(app):
        states = [await hub.run(misuse, case) for case in cases]
    for case, state in zip(cases, states, strict=True):
        assert state.runtime_status == Status.FAILED, case
        assert state.failure_details is not None
        assert state.failure_details.error_type == "dtfx.core.errors.LockingRulesViolationError", case


async def test_query_entities_and_clean_entity_storage(hub: Hub, app: dtfx.App) -> None:
    app.add_entity(counter)
    held = EntityInstanceId("counter", "held")

    @app.orchestrator
    def hold_lock(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        lock = yield ctx.lock_entities([held])
        with lock:
            yield ctx.wait_for_external_event("never")

    async with hub.worker(app):
        for key in ("a1", "a2", "b1"):
            await hub.client.signal_entity(EntityInstanceId("counter", key), "add", 1)
        await hub.client.signal_entity(EntityInstanceId("counter", "gone"), "add", 1)
        await hub.client.signal_entity(EntityInstanceId("counter", "gone"), "delete")
        for key in ("a1", "a2", "b1"):
            await _wait_for_entity_state(hub, EntityInstanceId("counter", key), 1)
        holder = await hub.client.schedule_new_orchestration(hold_lock)
        assert (await _locked_by(hub, held, holder)).serialized_state is None

        everything = await hub.client.get_all_entities(dtfx.EntityQuery(page_size=2))
        assert [str(m.id) for m in everything] == ["@counter@a1", "@counter@a2", "@counter@b1", "@counter@held"]
        prefixed = await hub.client.get_all_entities(dtfx.EntityQuery(instance_id_starts_with="@counter@a"))
        assert [(str(m.id), m.get_state()) for m in prefixed] == [("@counter@a1", 1), ("@counter@a2", 1)]
        by_name = await hub.client.get_all_entities(
            dtfx.EntityQuery(instance_id_starts_with="Counter", include_state=False)
        )
        assert len(by_name) == 4 and all(m.serialized_state is None for m in by_name)

        # Ending the orchestration releases its locks.
        await hub.client.terminate_orchestration(holder)
        await _unlocked_or_gone(hub, held)

        # A lock whose holder is gone is orphaned; cleaning releases it.
        await hub.client.signal_entity(held, "add", 5)
        await _wait_for_entity_state(hub, held, 5)
        ghost_lock = EntityLockRequested(
            timestamp=utc_now(), critical_section_id="cs", lock_set=[str(held)], position=0, parent_instance_id="ghost"
        )
        await hub.backend.send_event(str(held), ghost_lock)
        await _locked_by(hub, held, "ghost")
        result = await hub.client.clean_entity_storage()
        assert result == dtfx.CleanEntityStorageResult(empty_entities_removed=1, orphaned_locks_released=1)
        await _unlocked_or_gone(hub, held)
    assert await hub.backend.get_instance("@counter@gone") is None
    assert (await hub.client.get_entity(held)).get_state() == 5  # type: ignore[union-attr]


async def _locked_by(hub: Hub, entity: EntityInstanceId, owner: str, timeout: float = 10) -> dtfx.EntityMetadata:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        metadata = await hub.client.get_entity(entity)
        if metadata is not None and metadata.locked_by == owner:
            return metadata
        assert asyncio.get_running_loop().time() < deadline, f"{entity} is not locked by {owner}"
        await asyncio.sleep(0.01)


async def _unlocked_or_gone(hub: Hub, entity: EntityInstanceId, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        metadata = await hub.client.get_entity(entity)
        if metadata is None or metadata.locked_by is None:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{entity} stays locked"
        await asyncio.sleep(0.01)


async def test_unknown_entities_fail_their_callers(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def call_unknown(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        yield ctx.call_entity(EntityInstanceId("nobody", "k"), "op")

    async with hub.worker(app):
        state = await hub.run(call_unknown)
    assert state.runtime_status == Status.FAILED
    inner = state.failure_details.inner_failure if state.failure_details else None
    assert inner is not None and "No entity named 'nobody'" in inner.message


def test_entity_ids_are_validated_and_parsed() -> None:
    assert EntityInstanceId.parse("@Counter@key@with@ats") == EntityInstanceId("counter", "key@with@ats")
    assert sorted([EntityInstanceId("b", "1"), EntityInstanceId("a", "2")])[0].entity == "a"
    with pytest.raises(ValueError):
        EntityInstanceId("bad@name", "k")
    with pytest.raises(ValueError):
        EntityInstanceId.parse("counter@key")
    # No instance can have these ids: a NUL, which SQLite stored and then could not find, or too long.
    with pytest.raises(dtfx.InvalidInstanceIdError, match="control character"):
        EntityInstanceId("counter", "a\x00b")
    with pytest.raises(dtfx.InvalidInstanceIdError, match="at most 1024"):
        EntityInstanceId("counter", "k" * 1024)
    with pytest.raises(TypeError, match="An entity key is a string"):
        EntityInstanceId("counter", 5)  # type: ignore[arg-type]


def fails_its_episode_in_a_section(ctx: dtfx.OrchestrationContext, how: str) -> Any:
    with (yield ctx.lock_entities([HELD])):
        yield ctx.call_entity(HELD, "add", 1)
        if how == "after an activity":  # the episode that follows an eager activity's result
            yield ctx.call_activity(echo, input="x")
        else:  # the episode of an event, run by the cached orchestration
            ctx.set_custom_status("in the section")
            yield ctx.wait_for_external_event("go")
        yield ctx.call_activity(NOT_STORABLE if how == "refused by the store" else "no\x00such activity")


def echo(ctx: dtfx.ActivityContext, value: Any) -> Any:
    return value


NOT_STORABLE = "a lone \ud800 surrogate"
"""A name that passes the worker's own checks and that the store's commit refuses."""


@pytest.mark.parametrize("how", ["after an event", "after an activity", "refused by the store"])
async def test_locks_are_released_when_the_worker_fails_an_episode_it_cannot_store(
    hub: Hub, app: dtfx.App, how: str
) -> None:
    if how == "refused by the store" and isinstance(hub.backend, dtfx.MemoryBackend):
        pytest.skip("the memory store keeps any string")
    app.update(_LOCK_HOLDER_APP)
    app.add_activity(echo)
    app.add_orchestrator(fails_its_episode_in_a_section)
    async with hub.worker(app):
        holder = await hub.client.schedule_new_orchestration(fails_its_episode_in_a_section, input=how)
        if how != "after an activity":
            await hub.wait_for_state(holder, lambda state: state.serialized_custom_status is not None)
            await hub.client.raise_orchestration_event(holder, "go")
        failed = await hub.client.wait_for_orchestration_completion(holder, timeout=10)
        await _unlocked(hub, HELD)
        after = await hub.run(calls_held, timeout=10)
    assert failed is not None and failed.failure_details is not None
    assert failed.failure_details.is_caused_by(dtfx.UnstorableValueError)
    assert after.get_output() == 2
    with pytest.raises(dtfx.OrchestrationStateError, match=r"inside a critical section.*@counter@held"):
        await hub.client.rewind_orchestration(holder)
