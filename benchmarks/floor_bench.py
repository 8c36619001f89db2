"""The cost of one durable commit on a store, with the settings each engine uses.

A step of an orchestration (or of a DBOS workflow) is durable only once a commit has
reached the disk, and the next step depends on it: so the time of one small commit is
the floor under the time of a step, whatever the engine does around it.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.workload import dispatch

SAMPLES_AFTER_WARM_UP = 10


def _median_commit_us(commit: Callable[[int], None], count: int) -> float:
    samples: list[float] = []
    for index in range(count + SAMPLES_AFTER_WARM_UP):
        started = time.perf_counter()
        commit(index)
        if index >= SAMPLES_AFTER_WARM_UP:
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def _sqlite_commit_us(path: Path, journal_mode: str, count: int) -> float:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(f"PRAGMA journal_mode={journal_mode}")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("CREATE TABLE steps (id INTEGER PRIMARY KEY, output TEXT)")

    def insert(index: int) -> None:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("INSERT INTO steps VALUES (?, ?)", (index, '"Hello, Tokyo!"'))
        connection.execute("COMMIT")

    try:
        return _median_commit_us(insert, count)
    finally:
        connection.close()


def commit(url: str, count: int = 500) -> dict[str, Any]:
    """The median time of a one-row insert and its commit, in microseconds."""
    if url.startswith("sqlite:///"):
        directory = Path(url.removeprefix("sqlite:///")).parent
        return {
            "wal_us": _sqlite_commit_us(directory / "wal.db", "WAL", count),  # as dtfx
            "rollback_journal_us": _sqlite_commit_us(directory / "rollback.db", "DELETE", count),  # as DBOS
        }
    import psycopg

    # In autocommit mode the insert commits as it runs: one round trip, as a step of dtfx's chain.
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE steps (id integer PRIMARY KEY, output text)")

        def insert(index: int) -> None:
            connection.execute("INSERT INTO steps VALUES (%s, %s)", (index, '"Hello, Tokyo!"'))

        return {"commit_us": _median_commit_us(insert, count)}


if __name__ == "__main__":
    dispatch({"commit": commit})
