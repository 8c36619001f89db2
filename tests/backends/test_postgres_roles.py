"""A PostgreSQL role that may only read and write a hub's rows runs it, once `dtfx migrate`
has made the hub and granted the role its use; one that may not change the schema is told
to run `dtfx migrate` when the hub needs it; one whose connections are limited runs a
worker on those it has."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Generator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from typer.testing import CliRunner

import dtfx
from dtfx.backends.postgres import PostgresBackend, parse_postgres_url
from dtfx.cli import cli
from dtfx.core.errors import BackendUnavailableError, ConfigurationError
from tests.backends.test_postgres_pipeline import a_read
from tests.polling import wait_until
from tests.postgres import SERVER_URL, postgres_url, terminate_connections

app = dtfx.App()


@app.activity
def shout(ctx: dtfx.ActivityContext, word: str) -> str:
    return word.upper()


@app.entity
def tally(ctx: dtfx.EntityContext, amount: int) -> int:
    total = (ctx.get_state(int) or 0) + amount
    ctx.set_state(total)
    return total


@app.orchestrator
def child(ctx: dtfx.OrchestrationContext, word: str) -> Generator[dtfx.Task[Any], Any, str]:
    return (yield ctx.call_activity(shout, input=word))


@app.orchestrator
def errand(ctx: dtfx.OrchestrationContext, word: str) -> Generator[dtfx.Task[Any], Any, list[Any]]:
    """Activities in a row, a timer, an external event, an entity call and a sub-orchestration."""
    shouted = yield ctx.call_activity(shout, input=word)
    shouted = yield ctx.call_activity(shout, input=shouted)
    yield ctx.create_timer(ctx.current_utc_datetime + timedelta(milliseconds=100))
    event = yield ctx.wait_for_external_event("go")
    total = yield ctx.call_entity(dtfx.EntityInstanceId("tally", "a"), "add", 2)
    nested = yield ctx.call_sub_orchestrator(child, input=event)
    return [shouted, event, total, nested]


@pytest.fixture
def role() -> Iterator[str]:
    """A role that may log in and nothing else, dropped with its privileges after the test."""
    postgres_url()  # skips without a server
    name = f"dtfx_app_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:
        connection.execute(f'CREATE ROLE "{name}" LOGIN')
    yield name
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:
        connection.execute(f'DROP OWNED BY "{name}"')
        connection.execute(f'DROP ROLE "{name}"')


def as_role(url: str, role: str) -> str:
    """``url`` with ``role`` as its user."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))


def look(url: str) -> dtfx.OrchestrationState | None:
    """Open the hub at ``url`` and read an instance from it."""
    with dtfx.Client(url) as client:
        return client.get_orchestration_state("any")


def migrate(url: str, *grants: str) -> str:
    result = CliRunner().invoke(cli, ["migrate", "-b", url, *(arg for role in grants for arg in ("--grant", role))])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_role_that_may_only_read_and_write_rows_runs_a_hub_made_by_dtfx_migrate(
    role: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = postgres_url()
    schema = parse_postgres_url(url)[1]
    migrate(url)
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:  # as a hardened database does
        connection.execute(f'REVOKE EXECUTE ON FUNCTION "{schema}".dtfx_expect(boolean) FROM PUBLIC')
    assert f"Granted its use to {role}." in migrate(url, role)
    with psycopg.connect(as_role(SERVER_URL, role)) as connection, pytest.raises(psycopg.errors.InsufficientPrivilege):
        connection.execute(f'CREATE TABLE "{schema}".anything (id int)')
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:  # as a later migration would
        connection.execute(f'CREATE TABLE "{schema}".later (id int GENERATED ALWAYS AS IDENTITY, note text)')
    with psycopg.connect(as_role(SERVER_URL, role)) as connection:
        connection.execute(f'INSERT INTO "{schema}".later (note) VALUES (%s)', ("the role's too",))

    with dtfx.Worker(as_role(url, role), app=app) as worker, dtfx.Client(worker.backend) as client:
        instance_id = client.schedule_new_orchestration(errand, input="hello")
        client.wait_for_orchestration_start(instance_id, timeout=30)
        client.raise_orchestration_event(instance_id, "go", data="there")
        state = client.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED, state
        assert state.get_output() == ["HELLO", "there", 2, "THERE"]
        ended = client.get_all_orchestration_states(dtfx.OrchestrationQuery())
        assert {state.instance_id for state in ended} >= {instance_id}
        assert client.purge_orchestration(instance_id, recursive=True).deleted_instance_count == 2
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_role_that_may_not_change_the_schema_is_told_to_run_dtfx_migrate(role: str) -> None:
    url = postgres_url()
    schema = parse_postgres_url(url)[1]
    with pytest.raises(ConfigurationError, match="Run `dtfx migrate` once as a role that may"):
        look(as_role(url, role))

    # Made by an earlier version of dtfx, whose function differs: the role cannot replace it.
    migrate(url, role)
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:
        connection.execute(
            f'CREATE OR REPLACE FUNCTION "{schema}".dtfx_expect(holds boolean) RETURNS boolean'
            " LANGUAGE sql AS 'SELECT holds'"
        )
    with pytest.raises(ConfigurationError, match="needs creating or migrating"):
        look(as_role(url, role))
    migrate(url)  # the upgrade's migration, by a role that may
    assert look(as_role(url, role)) is None

    # Migrated by a later version of dtfx: upgrade dtfx, whatever the role.
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:
        connection.execute(f'UPDATE "{schema}".schema_version SET version = 99')
    with pytest.raises(ConfigurationError, match="newer than this dtfx knows"):
        look(as_role(url, role))


@app.orchestrator
def three_shouts(ctx: dtfx.OrchestrationContext, word: str) -> Generator[dtfx.Task[Any], Any, str]:
    for _ in range(3):
        word = yield ctx.call_activity(shout, input=word + "!")
    return word


def connections_of(role: str) -> int:
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:
        row = connection.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,)).fetchone()
    assert row is not None
    return int(row[0])


def limit_connections(role: str, limit: int) -> None:
    """Set the role's ``CONNECTION LIMIT`` (-1: none); connections beyond it stay open."""
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:
        connection.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT {limit}')


def settled_connections_of(role: str) -> int:
    """The role's connections once their number has stayed the same for a moment (a pool that
    grows, on calls at its start, opens its connections one after another)."""
    counts = [connections_of(role)]
    while len(counts) < 2 or counts[-1] != counts[-2]:
        time.sleep(0.2)
        counts.append(connections_of(role))
        assert len(counts) < 50, counts
    return counts[-1]


def test_a_worker_that_the_server_refuses_more_connections_commits_on_those_it_has(role: str) -> None:
    # A chain of eager steps commits on a pool of sync connections of its own, opened by its
    # first step. When the server will not open it one (the role's CONNECTION LIMIT is
    # reached, by the process's other pools here), the steps commit through the worker's
    # event loop instead: they had waited for a connection until the pool gave up, ten
    # seconds a step.
    url = postgres_url()
    migrate(url, role)
    with dtfx.Worker(as_role(url, role), app=app) as worker, dtfx.Client(worker.backend) as client:
        backend = worker.backend
        assert isinstance(backend, PostgresBackend)
        wait_until(lambda: backend._listener_pid)  # its last connection at the start
        limit_connections(role, settled_connections_of(role))
        opened = settled_connections_of(role)  # with any that was opening as the limit came
        for index in range(3):
            instance_id = client.schedule_new_orchestration(three_shouts, input=f"w{index}")
            state = client.wait_for_orchestration_completion(instance_id, timeout=8)
            assert state is not None and state.runtime_status == dtfx.OrchestrationStatus.COMPLETED, state
            assert state.get_output() == f"W{index}!!!"
        assert backend._blocking_pool is not None and backend._blocking_pool.get_stats()["pool_available"] == 0
        assert connections_of(role) == opened


def test_a_worker_that_the_server_allows_too_few_connections_to_start_says_so(role: str) -> None:
    url = postgres_url()
    migrate(url, role)
    # A backend opens two pools of two at its start, and its listener in the background
    # (which a failure does not stop): whichever of the listener and the second pool
    # connects first, that pool cannot open both of its connections.
    limit_connections(role, 3)
    # The server's refusal; or, if a connection opens when the error is made (the pool that
    # could not open has closed its connections), the likely reasons.
    with (
        pytest.raises(BackendUnavailableError, match=r"too many connections|CONNECTION LIMIT"),
        dtfx.Worker(as_role(url, role) + "&pool_timeout=1", app=app),  # stopped again, should it start
    ):
        pass
    assert connections_of(role) == 0


def test_calls_that_the_server_refuses_connections_fail_with_its_reason_within_the_pool_timeout(role: str) -> None:
    # As while a server is down: every connection a pool opens is refused. A call keeps trying
    # for the URL's pool_timeout (15 s by default), then says why (the pools' own error says
    # only that they gave up). Once the server takes connections again, the same backend goes
    # on: its pools try at most four seconds apart while a transaction waits.
    url = postgres_url()
    migrate(url, role)
    with dtfx.Client(as_role(url, role) + "&pool_timeout=4.5") as client:  # which closes the backend it opens
        backend = client.backend
        assert isinstance(backend, PostgresBackend)
        assert client.get_orchestration_state("any") is None
        blocking = backend._open_blocking_pool()  # as a worker's chain commits, on its thread
        blocking.wait()
        assert backend._run_blocking(a_read) == [(1,)]
        limit_connections(role, 0)
        assert terminate_connections(backend.schema) >= 5  # two pools of two on event loops, the sync pool's one
        refused = f'too many connections for role "{role}"'
        with pytest.raises(BackendUnavailableError, match=refused):
            client.get_orchestration_state("any")
        with pytest.raises(BackendUnavailableError, match=refused):
            backend._run_blocking(a_read)
        limit_connections(role, -1)
        assert client.get_orchestration_state("any") is None
        assert backend._run_blocking(a_read) == [(1,)]


def test_a_bad_connection_parameter_is_the_reason_given() -> None:
    # The diagnosis opens a connection of its own with a connect_timeout, unless the URL has
    # one: a bad one is what it must report, not overrule.
    url = postgres_url() + "&connect_timeout=abc&pool_timeout=0.5"
    with (
        pytest.raises(BackendUnavailableError, match="bad value for connect_timeout: 'abc'"),
        dtfx.Client(url) as client,
    ):
        client.get_orchestration_state("any")


def test_grant_needs_a_postgresql_hub(tmp_path: Any) -> None:
    result = CliRunner().invoke(cli, ["migrate", "-b", f"sqlite:///{tmp_path}/hub.db", "--grant", "someone"])
    assert result.exit_code != 0
    assert "--grant needs a PostgreSQL task hub" in result.output
    assert not (Path(tmp_path) / "hub.db").exists()  # refused before a task hub was made


def test_a_listener_that_the_server_refuses_while_it_takes_transactions_keeps_to_its_back_off(
    role: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A transaction that goes through has a listener waiting to connect again try at once
    # (the server is back), but only once: when the server takes the pools' transactions and
    # refuses the listener's connection (the role's CONNECTION LIMIT reached), the listener
    # is not tried again at every transaction, only as its back-off (0.4 s, 0.8 s, ...) says.
    url = postgres_url()
    migrate(url, role)
    with dtfx.Client(as_role(url, role)) as client:
        backend = client.backend
        assert isinstance(backend, PostgresBackend)
        assert client.get_orchestration_state("any") is None
        listener = wait_until(lambda: backend._listener_pid)
        limit_connections(role, settled_connections_of(role) - 1)
        with psycopg.connect(SERVER_URL, autocommit=True) as connection:
            connection.execute("SELECT pg_terminate_backend(%s)", (listener,))
        caplog.set_level(logging.WARNING, logger="dtfx.backends.postgres")
        deadline = time.monotonic() + 1.0
        reads = 0
        while time.monotonic() < deadline:
            assert client.get_orchestration_state("any") is None
            reads += 1
        refusals = [r for r in caplog.records if r.getMessage().startswith("Cannot listen for PostgreSQL")]
        limit_connections(role, -1)
        wait_until(lambda: backend._listener_pid not in (0, listener), timeout=10)

    assert reads > 50
    assert 1 <= len(refusals) <= 5, [r.getMessage() for r in refusals]
    assert all("too many connections" in r.getMessage() for r in refusals)
