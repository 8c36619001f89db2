"""The task hub's tables, versioned: an ordered list of migrations applied at start.

A migration is a list of statements with ``{bigint}`` and ``{serial_key}`` standing for
the dialect's types. ``schema_version`` holds how many migrations have been applied;
:func:`migrate` applies the rest in one transaction. Append new migrations; never edit
one that has shipped.
"""

from __future__ import annotations

from dtfx.backends.sql.program import Dialect, Execute, Fetch, Program
from dtfx.core.errors import ConfigurationError

MIGRATIONS: list[list[str]] = [
    [
        # One row per orchestration or entity instance: its state, its lease, and two
        # derived columns that keep the hot queries cheap: history_size (cached executors
        # skip loading the history) and next_visible_at (the earliest visible-at time in
        # its inbox, NULL when the inbox is empty).
        """CREATE TABLE instances (
            instance_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            status INTEGER NOT NULL,
            created_at {bigint} NOT NULL,
            last_updated_at {bigint} NOT NULL,
            input TEXT,
            output TEXT,
            custom_status TEXT,
            failure_details TEXT,
            version TEXT,
            execution_id TEXT,
            parent_instance_id TEXT,
            scheduled_start_at {bigint},
            completed_at {bigint},
            tags TEXT,
            is_entity INTEGER NOT NULL,
            lock_token TEXT,
            locked_until {bigint},
            history_size INTEGER NOT NULL DEFAULT 0,
            next_visible_at {bigint}
        )""",
        # What lock_orchestration_work_items and next_visible_at scan: instances with
        # messages, by due time.
        """CREATE INDEX instances_ready ON instances (is_entity, next_visible_at)
            WHERE next_visible_at IS NOT NULL""",
        "CREATE INDEX instances_created ON instances (is_entity, created_at, instance_id)",
        """CREATE TABLE history (
            instance_id TEXT NOT NULL,
            sequence INTEGER NOT NULL,
            event TEXT NOT NULL,
            PRIMARY KEY (instance_id, sequence)
        )""",
        """CREATE TABLE inbox (
            id {serial_key},
            instance_id TEXT NOT NULL,
            execution_id TEXT,
            visible_at {bigint} NOT NULL,
            event TEXT NOT NULL
        )""",
        "CREATE INDEX inbox_instance ON inbox (instance_id, visible_at)",
        # An activity task's lease is its visible_at: a leased task is invisible until
        # the lease expires, so the lock query scans visible tasks only.
        """CREATE TABLE tasks (
            id {serial_key},
            instance_id TEXT NOT NULL,
            execution_id TEXT,
            name TEXT NOT NULL,
            event TEXT NOT NULL,
            visible_at {bigint} NOT NULL,
            lock_token TEXT,
            dequeue_count INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX tasks_visible ON tasks (visible_at, id)",
        "CREATE INDEX tasks_instance ON tasks (instance_id)",
    ],
    [
        # Eager activity tasks are queued leased and found again by their lock token.
        "CREATE INDEX tasks_lease ON tasks (lock_token)",
    ],
]


def read_version() -> Program[int]:
    """The version of the hub's schema in ``schema_version`` (0: none yet); a version newer than
    this dtfx's raises :class:`~dtfx.ConfigurationError`."""
    rows = yield Fetch("SELECT version FROM schema_version")
    current: int = rows[0][0] if rows else 0
    if current > len(MIGRATIONS):
        raise ConfigurationError(
            f"The task hub's schema is at version {current}, newer than this dtfx knows ({len(MIGRATIONS)}); "
            "upgrade dtfx."
        )
    return current


def migrate(dialect: Dialect) -> Program[int]:
    """Create ``schema_version`` if needed and apply the missing migrations; return the version.

    The backend runs it as a write transaction that excludes concurrent migrations.
    """
    yield Execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    current = yield from read_version()
    for statements in MIGRATIONS[current:]:
        for statement in statements:
            yield Execute(statement.format(bigint=dialect.bigint, serial_key=dialect.serial_key))
    if current == 0:  # no row yet: dtfx writes none below version 1
        yield Execute("INSERT INTO schema_version (version) VALUES (?)", (len(MIGRATIONS),))
    elif current < len(MIGRATIONS):
        yield Execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))
    return len(MIGRATIONS)
