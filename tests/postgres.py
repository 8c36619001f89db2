"""Access to the PostgreSQL test server: a fresh schema per test, dropped after it.

The server is ``DTFX_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``).
When it cannot be reached, PostgreSQL tests skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from functools import cache

import psycopg
import pytest

SERVER_URL = os.environ.get("DTFX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

_schemas: list[str] = []


@cache
def _unreachable() -> str | None:
    """Why the test server cannot be used, or ``None``."""
    try:
        with psycopg.connect(SERVER_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        return f"PostgreSQL test server {SERVER_URL} is not reachable: {error}"
    return None


def require_server() -> None:
    """Skip the test when no server is reachable (fail instead in CI)."""
    reason = _unreachable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def postgres_url() -> str:
    """A URL for a fresh, empty task hub on the test server (skips when none is reachable outside CI).

    The hub's schema is dropped when the test ends (:func:`drop_postgres_schemas`).
    """
    require_server()
    schema = f"dtfx_test_{uuid.uuid4().hex[:16]}"
    _schemas.append(schema)
    separator = "&" if "?" in SERVER_URL else "?"
    return f"{SERVER_URL}{separator}schema={schema}"


def terminate_connections(schema: str) -> int:
    """End every server connection of the task hub ``schema`` (as a database restart would); return how many."""
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"dtfx:{schema}",),
        ).fetchall()
    return len(rows)


@pytest.fixture(autouse=True)
def drop_postgres_schemas() -> Iterator[None]:
    """Drop the schemas the test created, once its other fixtures are torn down."""
    yield
    if not _schemas:
        return
    schemas, _schemas[:] = list(_schemas), []
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:
        for schema in schemas:
            terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s"
            connection.execute(terminate, (f"dtfx:{schema}",))
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
