"""Scale-out backend: a task hub in a PostgreSQL schema, shared by any number of workers.

URL: ``postgresql://user:password@host:port/database?schema=dtfx`` (``schema`` names
the task hub; default ``dtfx``; it is created and migrated on first use). Optional
``pool_min_size`` / ``pool_max_size`` size the connection pools, and ``pool_timeout``
bounds how long a transaction keeps trying while the server cannot carry it out (15 s
by default); other parameters go to libpq, whose TCP keepalives and user timeout
default here to finding a vanished server within about a minute (``_TCP_SETTINGS``).

Work items are leased with ``FOR UPDATE SKIP LOCKED``, so concurrent workers never
wait for each other's picks; completing one is one transaction guarded by the lease.
Commits announce new work, and when the work they wrote for later is due, with
``NOTIFY``; each backend object ``LISTEN``s and wakes its dispatchers and waiting clients
at once, whichever process committed (polling every :attr:`PostgresBackend.poll_interval`
stays as a fallback). While no other backend object listens to the hub, commits announce
nothing (see :class:`PostgresDialect`).

Programs run through libpq's pipeline mode (:mod:`~dtfx.backends.postgres_pipeline`):
a write transaction costs one round trip per fetch that its program waits for, plus
the commit's. A transaction that starts while no other runs on the backend object (low
load) streams its statements, which the server then runs while the program builds the
next ones, and one that waits on its thread polls for the answer briefly before it
sleeps; under load they go out together. psycopg's async pool belongs to one event
loop, so the driver runs on a loop of its own in a background thread (the loop that
started the backend runs its transactions itself); the backend can be awaited from any
loop or thread (a worker's, a sync client's). A worker's chain of eager steps commits
on its activity thread instead, blocking it, through a pool of sync connections that the
first such commit opens, while that pool has one idle (:meth:`can_commit_blocking`). A
transaction that fails before its commit because the connection was lost (a database
restart) is retried on a fresh connection with back-off, for up to ``pool_timeout`` in
all (at once if the server had closed the connection while it idled in the pool: nothing
was sent); one lost during its commit is reported, since it may or may not have
committed (the lease guards keep that safe: the work item is simply redone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import msgspec

from dtfx._portal import LoopThread
from dtfx.backends.base import WorkKind
from dtfx.backends.clock import ReferenceClock, ticks
from dtfx.backends.sql.backend import Coalesced, SqlBackend
from dtfx.backends.sql.program import Dialect, Execute, ExecuteMany, Fetch, Notify, Program, Step, Stepper
from dtfx.backends.sql.rows import from_micros, to_micros
from dtfx.backends.sql.schema import MIGRATIONS, migrate, read_version
from dtfx.backends.urls import redact
from dtfx.core.errors import (
    BackendError,
    BackendUnavailableError,
    CommitInDoubtError,
    ConfigurationError,
    UnstorableValueError,
)

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolClosed, PoolTimeout

    from dtfx.backends.postgres_pipeline import (
        EXPECT_FUNCTION,
        EXPECT_FUNCTION_BODY,
        EXPECT_FUNCTION_SQL,
        Pipeline,
        StaleConnection,
    )
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"PostgreSQL support needs `pip install 'dtfx[postgres]'` ({error})") from error

T = TypeVar("T")

logger = logging.getLogger(__name__)

DEFAULT_SCHEMA = "dtfx"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_MAX_PAYLOAD = 7000  # NOTIFY payloads must stay below 8000 bytes
_VALUES_ROWS = 8  # rows inserted by a list of values, above which by a JSON document
_CONFLICTS = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.UniqueViolation)
_MAX_CONFLICT_RETRIES = 10
_POOL_TIMEOUT = 15.0  # seconds a transaction keeps trying while the server cannot carry it out
_LAST_WAIT = 1.0  # seconds an attempt may wait for a connection at the least (past pool_timeout: after a conflict, say)
_MAX_STALE_CONNECTIONS = 3
"""Pooled connections found closed by the server that a transaction replaces at once. The pool's
other idle connections are checked after the first (as after any lost connection), so finding
more means a server that closes connections as soon as they open: those count as lost ones."""
_REFUSAL_CHECK_AFTER = 1.0
"""Seconds a pool may take to open before a connection of its own asks the server why: a
refusal that waiting cannot end (an unknown database or role, a wrong password) ends the start."""
_LASTING_REFUSALS = re.compile(
    r"FATAL:.*(does not exist|authentication failed|no pg_hba\.conf entry|permission denied for database"
    r"|not permitted to log in)"
)
"""What the server (in English) answers a connection that trying again cannot help."""
_MIGRATION_ATTEMPTS = 3  # a start checks (or migrates) the hub again while that commit is in doubt
_TCP_SETTINGS = (
    ("keepalives_idle", "30"),
    ("keepalives_interval", "10"),
    ("keepalives_count", "3"),
    ("tcp_user_timeout", "60000"),
)
"""libpq's TCP settings of every connection, unless the URL sets them: a server whose host
vanishes without closing its connections (a power loss, a network partition) is found
dead within about a minute, instead of the system's defaults (two hours for an idle
connection, a quarter of an hour of retransmissions for one that waits for its data to
be acknowledged). Then a transaction fails as on any lost connection, and a blocking
commit does not hold its thread for hours. Unix-socket connections ignore them."""
_IDLE_IN_TRANSACTION = "60s"
"""How long the server lets a session of the hub sit in an open transaction waiting for its
client before it ends the session (unless the URL's ``options`` say otherwise). A hub's
transactions last milliseconds; one whose client has vanished (its host lost, its process
stopped) would otherwise hold its row locks, and keep other workers from the instances it
had locked, until the server noticed the connection was dead: with the server's TCP defaults,
after two hours."""
_RECONNECT_TIMEOUT = 10.0
"""Seconds a pool goes on trying to open a connection, at growing intervals (1, 2, 4 s, ...),
before it gives up: then it tries again at once if transactions wait for a connection
(:func:`_reconnect_while_awaited`), and otherwise when the next one does. So a pool finds a
server that has come back within a few seconds, however long it was away (psycopg's own
five minutes let the intervals grow to two)."""
_HOME_POOL_GRACE = 5.0  # seconds close(), on another loop, waits for the home loop to close its pool
_CATCH_UP_DELAY = 1.0  # seconds from a listener's hello to its look for what was not announced to it
_LISTENERS = 0x64746678  # "dtfx": the class of the advisory locks by which listeners show themselves
_KIND_CODES = {WorkKind.ORCHESTRATION: "o", WorkKind.ACTIVITY: "a", WorkKind.ENTITY: "e"}
_CODE_KINDS = {code: kind for kind, code in _KIND_CODES.items()}


def _closed_error() -> BackendUnavailableError:
    return BackendUnavailableError("This PostgreSQL backend has been closed.")


class _Retries:
    """What to do after each failed attempt at a transaction: run it again (at once after a
    conflict or on a pooled connection found closed before anything was sent on it, after a
    back-off once the connection was lost before the commit or the server could not carry
    the transaction out for now: a full disk, a standby that cannot write, no connection to
    be had) or raise. The latter are tried again until ``timeout`` seconds after the first
    attempt began, and at least once (a long transaction whose connection was lost, say)."""

    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        self._conflicts = 0
        self._unavailable = 0
        self._stale = 0
        self.check_pool = False
        """Whether the pool's idle connections should be checked before the next attempt:
        the last one failed on a lost connection, and others may have been lost with it."""

    def connection_wait(self) -> float:
        """The seconds the next attempt may wait for a pooled connection."""
        return max(self._deadline - time.monotonic(), _LAST_WAIT)

    def after(self, error: Exception, pipeline: Pipeline | None) -> float:
        """The seconds to wait before the next attempt (0: at once); or raise the error as the caller sees it."""
        self.check_pool = isinstance(error, psycopg.OperationalError) and _connection_lost(error)
        if isinstance(error, PoolClosed):  # close() ran meanwhile
            raise _closed_error() from error
        if isinstance(error, StaleConnection) and self._stale < _MAX_STALE_CONNECTIONS:
            self._stale += 1
            logger.debug("Replacing a pooled connection that the server closed: %s", error)
            return 0.0
        if isinstance(error, _CONFLICTS):
            self._conflicts += 1
            if self._conflicts > _MAX_CONFLICT_RETRIES:
                raise BackendUnavailableError(f"PostgreSQL: {error}") from error
            logger.debug("Retrying a transaction after a conflict: %s", error)
            return 0.0
        if isinstance(error, pg_errors.ProgramLimitExceeded):  # an index row too large, say: an operational error
            raise UnstorableValueError(f"PostgreSQL: {error}") from error  # that retries would only repeat
        if isinstance(error, psycopg.OperationalError | pg_errors.ReadOnlySqlTransaction):  # a standby's refusal too
            self._unavailable += 1
            if _connection_lost(error) and pipeline is not None and pipeline.committing:
                raise CommitInDoubtError(
                    f"PostgreSQL: the connection failed after the commit had gone out, so the transaction may or "
                    f"may not have committed ({str(error).strip()})"
                ) from error
            delay = min(2.0, 0.05 * 2.0**self._unavailable)
            if self._unavailable > 1 and time.monotonic() + delay >= self._deadline:
                raise BackendUnavailableError(_unavailability(error)) from error
            logger.warning("%s; retrying in %.2fs", _unavailability(error), delay)
            return delay
        if isinstance(error, psycopg.DataError | UnicodeEncodeError):  # a NUL in text, a lone surrogate, say
            raise UnstorableValueError(f"PostgreSQL: {error}") from error
        if isinstance(error, psycopg.Error):
            raise BackendError(f"PostgreSQL: {error}") from error
        raise error


async def _reconnect_while_awaited(pool: AsyncConnectionPool) -> None:
    """Once ``pool`` has given up opening a connection: try again at once if a transaction waits for one."""
    if pool.get_stats().get("requests_waiting"):
        await pool.check()  # which grows a pool that is not growing


def _reconnect_blocking_while_awaited(pool: ConnectionPool) -> None:
    """:func:`_reconnect_while_awaited`, for a pool of sync connections."""
    if pool.get_stats().get("requests_waiting"):
        pool.check()


def _why_no_connection(pool: AsyncConnectionPool | ConnectionPool) -> str:
    """Why ``pool`` gave a transaction no connection in time, by what it holds then. Holding as
    many connections as it may, all in use, it is too small for the work; holding fewer, it
    could not open more in that time: the server was away (a restart: the pool was opening
    its connections again) or slow to take them, or refused them. A pool counts the
    connections it is opening again as held, so one that the server left while it was full
    reads as too small."""
    stats = pool.get_stats()
    if stats["pool_size"] >= stats["pool_max"]:
        return "its connections are all in use (see pool_max_size)"
    return (
        "it could not open connections in that time: the server was away (a restart, say) or slow to take"
        " them, or allowed no more to this role or database (max_connections, CONNECTION LIMIT)"
    )


def _connection_lost(error: psycopg.Error) -> bool:
    """Whether the connection failed, taking the server's answer with it if there was one. The
    server's own refusals (a full disk, too many connections) come with a SQLSTATE of another
    class, and a transaction it refused did not commit: in a pipeline, what follows an error
    up to the next sync is skipped, the ``COMMIT`` too."""
    state = error.sqlstate
    return state is None or state.startswith(("08", "57P"))  # connection exception, operator intervention


def _unavailability(error: psycopg.Error) -> str:
    if isinstance(error, PoolTimeout):  # the pool had no connection to give
        return (
            f"PostgreSQL: the pool gave no connection ({error}): its connections are all in use "
            "(see pool_max_size), or the server cannot be reached"
        )
    if _connection_lost(error):
        return f"PostgreSQL connection failed: {error}"
    return f"PostgreSQL: {error}"


class _Announcement(msgspec.Struct, frozen=True, omit_defaults=True):
    """A NOTIFY payload: who committed, which queues got work, which instances changed status,
    and when the earliest work it wrote for later becomes visible, by queue (microseconds);
    or, with ``hello``, that the sender has just started listening (and nothing else)."""

    sender: str
    kinds: str
    instances: list[str]
    delayed: dict[str, int] = {}
    hello: bool = False

    def payload(self) -> str:
        """The NOTIFY payload (read back by :meth:`PostgresBackend._announced`)."""
        return msgspec.json.encode(self).decode()


class PostgresDialect(Dialect):
    """PostgreSQL's SQL: arrays for lists, row locks, rows written many at once, and NOTIFY on ``channel``.

    A notification wakes every listener, the sender's own too, which made a commit that
    announces something about a quarter slower; so commits announce nothing while no
    other backend object listens (:attr:`others_listening`).

    Many rows are written with one statement whose one parameter is the rows as a JSON
    array of objects, read by ``json_populate_recordset`` with the table's own row type
    (``NULL::table``, found through the hub's ``search_path``), so no column type is
    written here. Measured on 320 history rows a transaction, this costs the client half
    the CPU of a statement per row, and the server a fifth less; arrays per column
    (``unnest``) cost the client six times what a statement per row does, as psycopg
    writes array literals in Python. A text PostgreSQL cannot hold (a NUL, which JSON writes ``\\u0000``) is
    refused by the server as a data error, as it is when sent as a parameter. Up to
    eight rows go as one list of values instead (``VALUES (?, ?), (?, ?)``, a statement
    per number of rows): measured on a chain's four history rows, the server's part of
    its commit is about 25 µs shorter than with the JSON document; the eight of the
    first step of a chain (two episodes) take the same way.
    """

    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    serial_key = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    bigint = "BIGINT"
    writes_in_with = True

    def __init__(self, channel: str, sender: str) -> None:
        self.channel = channel
        self.sender = sender
        self.others_listening = True
        """Whether another backend object listens on the channel (as last seen; at first, assume so)."""
        self.clock = ReferenceClock("the PostgreSQL server")
        """The hub's clock: the server's, which :meth:`PostgresBackend._read_clock` reads."""
        self._row_types: dict[tuple[str, ...], type[msgspec.Struct]] = {}

    def now(self) -> datetime:
        return self.clock.now()

    def in_list(self, column: str) -> str:
        return f"{column} = ANY(?)"

    def list_param(self, values: Sequence[Any]) -> Any:
        return list(values)

    def is_same(self, column: str) -> str:
        return f"{column} IS NOT DISTINCT FROM ?"

    def in_select(self, column: str, select: str) -> str:
        # A join with the select's rows gets a generic plan that scans the whole table.
        return f"{column} = ANY(ARRAY({select}))"

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> Execute | ExecuteMany:
        if len(rows) < 2:  # the plain statement costs less than a JSON document
            return super().insert_rows(table, columns, rows)
        if len(rows) <= _VALUES_ROWS:  # and a list of a few rows costs the server less than one
            values = ", ".join([f"({', '.join('?' * len(columns))})"] * len(rows))
            return Execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}", list(chain(*rows)))
        # Inserted in the array's order (an identity column numbers inbox messages as sent).
        names = ", ".join(columns)
        return Execute(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM json_populate_recordset(NULL::{table}, ?)"
            " WITH ORDINALITY AS given ORDER BY given.ordinality",
            (self._json_rows(columns, rows),),
        )

    def update_rows(
        self, table: str, columns: tuple[str, ...], key: str, rows: Sequence[Sequence[Any]]
    ) -> Execute | ExecuteMany:
        if len(rows) < 2:
            return super().update_rows(table, columns, key, rows)
        # The rows are found through the key's index: a join with the function's rows alone
        # gets a generic plan that scans the whole table (as in in_select).
        assignments = ", ".join(f"{column} = given.{column}" for column in columns)
        return Execute(
            f"WITH given AS MATERIALIZED (SELECT {key}, {', '.join(columns)}"
            f" FROM json_populate_recordset(NULL::{table}, ?)) UPDATE {table} SET {assignments} FROM given"
            f" WHERE {self.in_select(f'{table}.{key}', f'SELECT {key} FROM given')} AND {table}.{key} = given.{key}",
            (self._json_rows((*columns, key), rows),),
        )

    def _json_rows(self, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> str:
        """``rows`` as a JSON array of objects keyed by ``columns``, for ``json_populate_recordset``.

        Through a struct type per list of columns: building one from a tuple costs a
        sixth of building a dict (the values are texts, numbers and ``None``: no
        reference cycles, so no garbage-collector tracking).
        """
        row_type = self._row_types.get(columns)
        if row_type is None:
            row_type = self._row_types[columns] = msgspec.defstruct("Row", columns, gc=False)
        return msgspec.json.encode([row_type(*row) for row in rows]).decode()

    def notify(self, notify: Notify) -> Sequence[Step]:
        if not self.others_listening:
            return (notify,)
        kinds = "".join(sorted(_KIND_CODES[kind] for kind in notify.kinds))
        delayed: dict[str, int] = {}
        for kind, visible_at in notify.delayed:
            code, moment = _KIND_CODES[kind], to_micros(visible_at)
            delayed[code] = min(delayed.get(code, moment), moment)
        chunks: list[list[str]] = [[]]
        size = 0
        for instance_id in notify.instances:
            if size + len(instance_id) > _MAX_PAYLOAD and chunks[-1]:
                chunks.append([])
                size = 0
            chunks[-1].append(instance_id)
            size += len(instance_id.encode()) + 3
        announcements: list[Step] = [
            Execute(
                "SELECT pg_notify(?, ?)",
                (self.channel, _Announcement(self.sender, kinds, chunk, delayed).payload()),
            )
            for chunk in chunks
        ]
        return [*announcements, notify]


@dataclass(frozen=True)
class PoolOptions:
    """A backend URL's options for its connection pools."""

    min_size: int = 2
    max_size: int = 10
    timeout: float = _POOL_TIMEOUT
    """Seconds a transaction keeps trying while the server cannot carry it out (see :class:`_Retries`)."""


def _check_pool_sizes(pool: dict[str, Any]) -> None:
    """Refuse pool sizes given in a URL that no pool can have (a maximum given below the
    minimum is refused too; a minimum given alone raises the default maximum to it)."""
    for name, least in (("min_size", 0), ("max_size", 1)):
        if name in pool and pool[name] < least:
            raise ConfigurationError(f"pool_{name} must be at least {least} (got {pool[name]})")
    if pool.get("max_size", math.inf) < pool.get("min_size", 0):
        raise ConfigurationError(
            f"pool_max_size must be at least pool_min_size (got {pool['max_size']} and {pool['min_size']})"
        )


def _positive_seconds(key: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ConfigurationError(f"{key} must be a positive number of seconds (got {value!r})")
    return seconds


def parse_postgres_url(url: str) -> tuple[str, str, PoolOptions]:
    """The libpq connection URL, the task hub's schema and the pool options of a backend URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower().partition("+")[0]
    if scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"Not a PostgreSQL URL: {redact(url)!r}")
    options = parse_qsl(parts.query.replace("+", "%2B"), keep_blank_values=True)  # libpq's reading: no + for a space
    schema = DEFAULT_SCHEMA
    pool: dict[str, Any] = {}  # PoolOptions' fields
    passed: list[tuple[str, str]] = []
    for key, value in options:
        if key == "schema":
            schema = value
        elif key in ("pool_min_size", "pool_max_size"):
            try:
                pool[key.removeprefix("pool_")] = int(value)
            except ValueError:
                raise ConfigurationError(f"{key} must be an integer (got {value!r})") from None
        elif key == "pool_timeout":
            pool["timeout"] = _positive_seconds(key, value)
        else:
            passed.append((key, value))
    _check_pool_sizes(pool)
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            "The schema name must be lowercase letters, digits and underscores, not starting with a digit,"
            f" at most 48 (got {schema!r})"
        )
    given = {key for key, _ in passed}
    # The application name lets operators (and tests) find a hub's connections.
    defaults = (("application_name", f"dtfx:{schema}"), *_TCP_SETTINGS)
    passed.extend((key, value) for key, value in defaults if key not in given)
    # Percent-encoded, as libpq reads a URL: it takes a ``+`` as it is, not as a space.
    query = urlencode(passed, quote_via=quote)
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, query, parts.fragment))
    return conninfo, schema, PoolOptions(**pool)


class PostgresBackend(SqlBackend):
    """A task hub in a PostgreSQL schema (see the module docstring).

    Args:
        url: ``postgresql://user@host/database``, optionally with ``?schema=name``.
    """

    poll_interval = 2.0  # other processes' commits wake dispatchers through notifications
    watch_interval: ClassVar[float] = 0.5
    """How often the backend reads the instances waited for (:meth:`_watch`)."""
    listeners_interval: ClassVar[float] = 10.0
    """How often the backend looks for other backend objects listening to the hub, and reads
    the server's clock (:meth:`_read_clock`). One that starts listening says so itself (a
    hello), so this look only notices those that have gone, after which commits stop
    announcing themselves."""
    blocking_commits = True  # on a pool of sync connections, opened by the first such commit
    listener_retry_first: ClassVar[float] = 0.2
    listener_retry_max: ClassVar[float] = 5.0
    """How long the notification connection waits to be opened again after it failed: the first
    wait, doubled after each failure up to the longest; less if a transaction goes through
    meanwhile (:meth:`_answered`)."""

    def __init__(self, url: str) -> None:
        self._conninfo, self.schema, pool_options = parse_postgres_url(url)
        self._sender = uuid.uuid4().hex
        self._channel = f"dtfx_{self.schema}"
        self._postgres_dialect = PostgresDialect(self._channel, self._sender)
        super().__init__(self._postgres_dialect)
        self._url = url
        self._pool_min_size = pool_options.min_size
        self._pool_max_size = max(pool_options.max_size, self._pool_min_size)
        self._pool_timeout = pool_options.timeout
        self._lock = threading.Lock()
        self._driver: LoopThread | None = None
        self._startup: futures.Future[None] | None = None
        self._pool: AsyncConnectionPool | None = None
        # The loop that started the backend (a worker's, usually) runs its transactions
        # itself, on a pool of its own: no hop to the driver thread.
        self._home: asyncio.AbstractEventLoop | None = None
        self._home_pool: AsyncConnectionPool | None = None
        # Closed by close() itself if the home loop has ended: the pool's close() needs that loop.
        self._home_connections: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()
        self._home_tasks: set[asyncio.Task[None]] = set()
        self._blocking_pool: ConnectionPool | None = None
        self._blocking_lock = threading.Lock()
        self._under_way = 0  # transactions running on this object, on any thread
        self._under_way_lock = threading.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._listener_pid = 0  # the server process of this object's notification connection
        self._listener_nudge: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        """While the listener waits to connect again: its loop, and what wakes it (:meth:`_answered`)."""
        self._listeners_key = zlib.crc32(self.schema.encode()) & 0x7FFFFFFF  # this hub's listener locks
        self._hellos = 0  # hellos heard from other backend objects
        self._watcher: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The URL this backend was opened with."""
        return self._url

    async def start(self) -> None:
        with self._lock:
            if self._closed:
                raise _closed_error()
            self._opening()
            if self._driver is None:
                self._driver = LoopThread(f"dtfx-postgres-{self.schema}")
                self._startup = self._driver.submit(self._open())
            driver, startup = self._driver, self._startup
        assert startup is not None
        try:
            if not startup.done():  # once done, no thread-safe wake-up of this loop to learn it
                await asyncio.wrap_future(startup)
            startup.result()  # raises what the start raised
            if self._home is None:
                await self._open_home_pool()
        except BaseException:
            await self._stop_driver(driver)  # a start that fails leaves nothing open; the next one begins afresh
            raise

    async def _open_home_pool(self) -> None:
        """Open the pool on which the loop that starts the backend runs its own transactions."""
        self._home = asyncio.get_running_loop()
        pool = self._new_pool(configure=self._adopt_home_connection)
        try:
            await self._open_pool(pool)
        except BaseException as error:
            self._home = None
            await pool.close()
            if isinstance(error, Exception):
                raise await asyncio.to_thread(self._cannot_open, error) from error
            raise
        with self._lock:
            closed = self._closed
            if not closed:
                self._home_pool = pool
        if closed:  # close() ran meanwhile, before this pool was there to close
            await pool.close()
            raise _closed_error()

    async def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.opened_in_another_process():  # its connections and threads are that process's to close
                return
            driver = self._driver
            blocking_pool, self._blocking_pool = self._blocking_pool, None
        home, home_pool = self._home, self._home_pool
        self._home = self._home_pool = None
        try:
            if blocking_pool is not None:
                await asyncio.to_thread(blocking_pool.close)
            if home_pool is not None and home is not None:
                if home is asyncio.get_running_loop():
                    await home_pool.close()
                elif home.is_running():
                    await self._close_home_pool_on(home, home_pool)
                else:  # the loop has ended, and the pool's tasks with it: its connections are closed here
                    await self._close_home_connections()
        finally:
            if driver is not None:
                await self._stop_driver(driver)
            self._instance_signals.notify_all()  # their waits end, told that it has closed

    async def _close_home_pool_on(self, home: asyncio.AbstractEventLoop, pool: AsyncConnectionPool) -> None:
        """Have the home loop close its pool; if it does not in time (blocked, perhaps on this
        very close()), close the pool's connections here, and let the pool's own close() run
        whenever that loop is free again."""
        closing = asyncio.run_coroutine_threadsafe(pool.close(), home)
        done, _ = await asyncio.to_thread(futures.wait, [closing], _HOME_POOL_GRACE)
        if done:
            closing.result()
            return
        logger.warning(
            "The event loop that started this PostgreSQL backend did not close its pool within %.0f s"
            " (is it blocked, waiting for this close()?); closing the pool's connections here",
            _HOME_POOL_GRACE,
        )
        await self._close_home_connections()

    async def _close_home_connections(self) -> None:
        for connection in list(self._home_connections):
            await connection.close()

    async def _stop_driver(self, driver: LoopThread) -> None:
        """Close what the driver's loop opened (pool, listener, watcher) and stop its thread, if
        ``driver`` is still this backend's."""
        with self._lock:
            if self._driver is not driver:
                return
            startup, self._driver, self._startup = self._startup, None, None
        try:
            if startup is not None and not startup.done():  # what it opens is closed below
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.wrap_future(startup))
            await asyncio.wrap_future(driver.submit(self._shut_down()))
        finally:
            driver.close()

    async def _run(
        self, program: Callable[[], Program[T]], *, write: bool, durable: bool = True, brief: bool = True
    ) -> T:
        if self._pool is None:
            await self.start()
        self._opening()
        if self._home_pool is not None and self._home is asyncio.get_running_loop():
            return await self._transact(program, write, self._home_pool, durable=durable)
        driver = self._driver
        if driver is None:
            raise _closed_error()
        return await asyncio.wrap_future(driver.submit(self._transact(program, write, durable=durable)))

    async def _ensure_started(self) -> None:
        if self._pool is None:
            await self.start()

    def _start_draining(self, kind: Coalesced) -> None:
        if self._home_pool is not None and self._home is asyncio.get_running_loop():
            task = self._home.create_task(self._drain_now(kind, self._home_pool))
            self._home_tasks.add(task)
            task.add_done_callback(self._home_tasks.discard)
            return
        driver = self._driver
        try:
            if driver is None:
                raise RuntimeError("closed")
            driver.submit(self._drain_now(kind))
        except RuntimeError:  # closed meanwhile
            self._refuse_queued(kind, _closed_error())

    # -- on the driver's loop ----------------------------------------------------------------

    async def _drain_now(self, kind: Coalesced, pool: AsyncConnectionPool | None = None) -> None:
        run = self._drain(kind)
        if run is None:
            return
        while (program := run.next_program()) is not None:
            try:
                run.ran(await self._transact(program, kind.write, pool))
            except Exception as error:
                run.ran(error)
        self._settle(run.futures, run.outcomes)

    def _connection_options(self) -> dict[str, Any]:
        # Generic plans: planning a statement's custom plan at every execution costs more
        # than running it (lists travel as arrays, whose sizes custom plans would weigh).
        # A connection keeps the plan it made when it first ran a statement, and on a near-empty
        # table (a new task hub) the planner would read the whole table: that plan stayed while
        # the table grew, until it was next analysed. Every statement here has an index to go
        # through (by key, by visible-at time, by creation time): no plan needs to read a table whole.
        options = f"-c search_path={self.schema} -c plan_cache_mode=force_generic_plan -c enable_seqscan=off"
        # After the application's own (the URL's ``options``, or else ``PGOPTIONS``, which
        # libpq would read itself if no options were given here): of two settings of one
        # parameter, the server keeps the later. The defaults come before them.
        given = conninfo_to_dict(self._conninfo).get("options") or os.environ.get("PGOPTIONS", "")
        defaults = f"-c idle_in_transaction_session_timeout={_IDLE_IN_TRANSACTION}"
        return {"autocommit": True, "options": f"{defaults} {given} {options}".replace("  ", " ")}

    def _new_pool(
        self, configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None
    ) -> AsyncConnectionPool:
        return AsyncConnectionPool(
            self._conninfo,
            min_size=self._pool_min_size,
            max_size=self._pool_max_size,
            kwargs=self._connection_options(),
            name=f"dtfx-{self.schema}",
            timeout=self._pool_timeout,
            reconnect_timeout=_RECONNECT_TIMEOUT,
            reconnect_failed=_reconnect_while_awaited,
            open=False,
            configure=configure,
        )

    async def _adopt_home_connection(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._home_connections.add(connection)

    async def _open(self) -> None:
        if self._pool is not None:
            return
        pool = self._new_pool()
        try:
            await self._open_pool(pool)
        except BaseException as error:
            await pool.close()
            if isinstance(error, Exception):
                raise await asyncio.to_thread(self._cannot_open, error) from error
            raise
        self._pool = pool
        try:
            await self._set_up_hub()
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        await self._read_clock()
        self._listener = asyncio.create_task(self._listen())
        self._watcher = asyncio.create_task(self._watch())
        await self._look_for_listeners()
        logger.debug("PostgreSQL task hub %r ready", self.schema)

    async def _open_pool(self, pool: AsyncConnectionPool[Any]) -> None:
        """Open ``pool``, waiting up to ``pool_timeout`` for its connections (a server that is
        starting, say), but not for a server that refuses them for good."""
        opening = asyncio.ensure_future(pool.open(wait=True, timeout=self._pool_timeout))
        try:
            done, _ = await asyncio.wait({opening}, timeout=min(_REFUSAL_CHECK_AFTER, self._pool_timeout))
            if not done:  # ask the server why, unless the pool opens meanwhile
                asking = asyncio.ensure_future(asyncio.to_thread(self._refusal))
                await asyncio.wait({opening, asking}, return_when=asyncio.FIRST_COMPLETED)
                refused = None if opening.done() else await asking
                if refused is not None and _LASTING_REFUSALS.search(str(refused)):
                    raise refused
            await opening
        finally:
            if not opening.done():  # refused for good, or the start was cancelled: stop opening
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await opening

    async def _set_up_hub(self) -> None:
        """Create the hub's schema, or migrate it to this version, unless it is there already
        (which makes it safe to do again when its commit is in doubt)."""
        try:
            for attempt in range(_MIGRATION_ATTEMPTS):
                try:
                    await self._transact(self._migration, write=True)
                    return
                except CommitInDoubtError:
                    if attempt == _MIGRATION_ATTEMPTS - 1:
                        raise
        except BackendError as error:
            if not isinstance(error.__cause__, pg_errors.InsufficientPrivilege):
                raise
            raise ConfigurationError(
                f"The task hub {self.schema!r} needs creating or migrating to this version of dtfx, which this"
                f" database role may not do ({str(error.__cause__).strip()}). Run `dtfx migrate` once as a role"
                " that may (the owner of the database or of the schema), with `--grant ROLE` to let a role"
                " that may only read and write the hub's rows use it."
            ) from error

    def _migration(self) -> Program[int]:
        # A hub as this version made it is left alone: no lock, no DDL, so that a role that
        # may only read and write its rows can start (see grant()).
        found = yield Fetch(
            "SELECT to_regclass('schema_version') IS NOT NULL,"
            f" (SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure('{EXPECT_FUNCTION}(boolean)'))"
        )
        has_version, expect_source = found[0]
        if has_version:
            current = yield from read_version()
            if current == len(MIGRATIONS) and expect_source == EXPECT_FUNCTION_BODY:
                return current
        # Concurrent first starts (several workers) take turns; the schema is created once.
        yield Execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"dtfx-migrate-{self.schema}",))
        yield Execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        version = yield from migrate(self._dialect)
        yield Execute(EXPECT_FUNCTION_SQL)  # this version's
        return version

    async def grant(self, role: str) -> None:
        """Let the database role ``role`` use this task hub, as workers, clients and ``dtfx
        serve`` do: read and write the rows of its tables, and of those a later migration by
        the role calling this adds. Nothing more: a worker of that role starts on a hub that
        is at its version of dtfx, and one at another version needs ``dtfx migrate`` (or a
        start) by a role that may change the schema first."""
        schema = sql.Identifier(self.schema).as_string(None)
        grantee = sql.Identifier(role).as_string(None)
        statements = [
            f"GRANT USAGE ON SCHEMA {schema} TO {grantee}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {grantee}",
            f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {grantee}",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {grantee}",
        ]

        def program() -> Program[None]:
            for statement in statements:
                yield Execute(statement)

        await self._run(program, write=True)

    async def _shut_down(self) -> None:
        tasks = [task for task in (self._listener, self._watcher) if task is not None]
        self._listener = self._watcher = None
        for task in tasks:
            task.cancel()  # a watch round under way stops cleanly (see postgres_pipeline)
        await asyncio.gather(*tasks, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _transact(
        self,
        program: Callable[[], Program[T]],
        write: bool,
        pool: AsyncConnectionPool | None = None,
        *,
        durable: bool = True,
    ) -> T:
        pool = pool or self._pool
        if pool is None:
            raise _closed_error()
        retries = _Retries(self._pool_timeout)
        while True:
            stepper = Stepper(program())
            pipeline: Pipeline | None = None
            try:
                with self._alone() as alone:
                    connection = await pool.getconn(retries.connection_wait())
                    try:  # the pipeline leaves the connection idle, or closes it
                        pipeline = Pipeline(connection, transaction=write, durable=durable, alone=alone)
                        result = await pipeline.run(stepper)
                    finally:
                        await pool.putconn(connection)
            except Exception as error:
                try:
                    delay = retries.after(error, pipeline)
                except BackendUnavailableError:
                    if isinstance(error, PoolTimeout):
                        raise await asyncio.to_thread(self._no_connection, _why_no_connection(pool)) from error
                    raise
                if retries.check_pool:
                    await pool.check()
                if delay:
                    await asyncio.sleep(delay)
                continue
            self._after_commit(stepper.notifications)
            self._answered()
            return result

    def _run_blocking(self, program: Callable[[], Program[T]]) -> T:
        self._opening()
        pool = self._blocking_pool or self._open_blocking_pool()
        retries = _Retries(self._pool_timeout)
        while True:
            stepper = Stepper(program())
            pipeline: Pipeline | None = None
            try:
                with self._alone() as alone:
                    connection = pool.getconn(retries.connection_wait())
                    try:  # the pipeline leaves the connection idle, or closes it
                        pipeline = Pipeline(connection, transaction=True, alone=alone)
                        result = pipeline.run_blocking(stepper)
                    finally:
                        pool.putconn(connection)
            except Exception as error:
                try:
                    delay = retries.after(error, pipeline)
                except BackendUnavailableError:
                    if isinstance(error, PoolTimeout):
                        raise self._no_connection(_why_no_connection(pool)) from error
                    raise
                if retries.check_pool:
                    pool.check()
                if delay:
                    time.sleep(delay)
                continue
            self._after_commit(stepper.notifications)
            self._answered()
            return result

    @contextlib.contextmanager
    def _alone(self) -> Iterator[bool]:
        """Count a transaction as under way while it runs; whether it started as the only one
        (then its pipeline runs alone: see :mod:`dtfx.backends.postgres_pipeline`)."""
        with self._under_way_lock:
            self._under_way += 1
            alone = self._under_way == 1
        try:
            yield alone
        finally:
            with self._under_way_lock:
                self._under_way -= 1

    def _cannot_open(self, error: Exception) -> BackendUnavailableError:
        """The error for a pool that did not open in time."""
        return self._cannot_connect(
            f"Cannot open {self._pool_min_size} connections to PostgreSQL ({error}), though one opens now: the server"
            " may allow no more to this role or database (max_connections, CONNECTION LIMIT), or see pool_min_size"
        )

    def _no_connection(self, why: str) -> BackendUnavailableError:
        """The error for a transaction that got no connection from its pool in ``pool_timeout``
        (``why``: :func:`_why_no_connection`)."""
        return self._cannot_connect(
            f"PostgreSQL: the pool gave no connection within {self._pool_timeout:g} s, though one opens now: {why}"
        )

    def _cannot_connect(self, otherwise: str) -> BackendUnavailableError:
        """The error for pools that gave no connection, with the reason the server gives a
        connection of its own (a refused port, an unknown database, a wrong password, too
        many connections): a pool says only that it gave up. If one opens: ``otherwise``."""
        refused = self._refusal()
        if refused is not None:
            return BackendUnavailableError(f"Cannot connect to PostgreSQL: {str(refused).strip()}")
        return BackendUnavailableError(otherwise)

    def _refusal(self) -> psycopg.Error | None:
        """Why the server refuses a connection of its own (``None``: it opens)."""
        options = self._connection_options()
        if "connect_timeout" not in conninfo_to_dict(self._conninfo):  # one given, even a bad one, is kept
            options["connect_timeout"] = 5
        try:
            psycopg.connect(self._conninfo, **options).close()
        except psycopg.Error as refused:
            return refused
        return None

    def can_commit_blocking(self) -> bool:
        """Whether the pool of sync connections has an idle one. The first call opens the pool,
        in the background; while it has none to give (its connections are opening, or the
        server refuses more: ``max_connections`` or the role's or database's ``CONNECTION
        LIMIT``, taken by this process's other pools, say), the worker commits on its event
        loop's connections instead of waiting for one, and the pool keeps trying."""
        pool = self._blocking_pool or self._open_blocking_pool()
        if pool.get_stats()["pool_available"]:
            return True
        pool.check()  # with no connection left, the pool tries to open one again
        return False

    def _open_blocking_pool(self) -> ConnectionPool:
        """The pool of sync connections on which worker threads commit, opened by the first
        thread that needs it; it connects in the background."""
        with self._blocking_lock:
            if self._blocking_pool is not None:
                return self._blocking_pool
            if self._closed:
                raise _closed_error()
            pool = ConnectionPool(
                self._conninfo,
                min_size=1,
                max_size=self._pool_max_size,
                kwargs=self._connection_options(),
                name=f"dtfx-{self.schema}-blocking",
                timeout=self._pool_timeout,
                reconnect_timeout=_RECONNECT_TIMEOUT,
                reconnect_failed=_reconnect_blocking_while_awaited,
                open=False,
            )
            pool.open()
            with self._lock:
                closed = self._closed
                if not closed:
                    self._blocking_pool = pool
            if closed:  # close() ran meanwhile, before this pool was there to close
                pool.close()
                raise _closed_error()
            return pool

    async def _listen(self) -> None:
        """Wake this process's waiters for what other processes commit; reconnect when the connection drops."""
        failures = 0
        nudged = False  # since the connection was last lost
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            except psycopg.Error as error:
                failures += 1
                delay = min(self.listener_retry_max, self.listener_retry_first * 2 ** (failures - 1))
                logger.warning("Cannot listen for PostgreSQL notifications (%s); retrying in %.1fs", error, delay)
                if nudged:  # once only: a server that takes transactions but refuses this connection is not hurried
                    await asyncio.sleep(delay)
                else:
                    nudged = await self._answered_within(delay)
                continue
            try:
                async with connection:
                    if connection.info.server_version >= 140000:
                        # This session idles by design, waiting for notifications: a server's
                        # idle_session_timeout (which pooled connections keep) would end it again and again.
                        await connection.execute("SET idle_session_timeout = 0")
                    await connection.execute(f"LISTEN {self._channel}")
                    # Held as long as this connection lives: how other backend objects know
                    # that this one listens (see PostgresDialect).
                    await connection.execute(
                        "SELECT pg_advisory_lock_shared(%s, %s)", (_LISTENERS, self._listeners_key)
                    )
                    self._listener_pid = connection.info.backend_pid
                    hello = _Announcement(self._sender, "", [], hello=True)
                    await connection.execute("SELECT pg_notify(%s, %s)", (self._channel, hello.payload()))
                    # The look at start may have seen this connection's lock as another's.
                    await self._look_for_listeners()
                    if failures:
                        logger.info("Listening for PostgreSQL notifications again")
                        self._wake_everyone()  # what was announced meanwhile is lost
                    failures, nudged = 0, False
                    # The others announce their commits once they have heard the hello: what
                    # they committed until then (or while not listening) is looked for later.
                    seen = asyncio.get_running_loop().call_later(_CATCH_UP_DELAY, self._changed_outside)
                    try:
                        async for notification in connection.notifies():
                            self._announced(notification.payload)
                    finally:
                        seen.cancel()
            except psycopg.Error as error:
                failures += 1
                logger.warning("Lost the PostgreSQL notification connection (%s); reconnecting", error)
                self._wake_everyone()

    async def _answered_within(self, delay: float) -> bool:
        """Wait up to ``delay`` seconds, less if a transaction of this object goes through
        meanwhile (:meth:`_answered`); whether one did. Then the server is back, and the
        listener connects again at once: this process's dispatchers and waits hear of other
        processes' commits without waiting for the back-off (or for their polling)."""
        answered = asyncio.Event()
        self._listener_nudge = (asyncio.get_running_loop(), answered)
        try:
            async with asyncio.timeout(delay):
                await answered.wait()
        except TimeoutError:
            return False
        finally:
            self._listener_nudge = None
        return True

    def _answered(self) -> None:
        """A transaction went through: a listener waiting to connect again tries at once."""
        nudge = self._listener_nudge
        if nudge is not None:
            loop, answered = nudge
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(answered.set)

    async def _look_for_listeners(self) -> None:
        """See whether other backend objects listen to this hub: if none does, commits announce nothing.

        Looked at when the backend starts and every :attr:`listeners_interval`; one that starts
        listening in between says hello, and a hello heard while the look is under way
        counts, since its sender may have shown itself after the look saw the locks.
        """
        listeners = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = ? AND objid = ?"
            " AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND pid <> ?"
        )

        def program() -> Program[int]:
            rows = yield Fetch(listeners, (_LISTENERS, self._listeners_key, self._listener_pid))
            return int(rows[0][0])

        hellos = self._hellos
        try:
            listening = await self._transact(program, write=False) > 0
        except BackendError:
            listening = True
            logger.debug("Looking for other listeners failed", exc_info=True)
        self._postgres_dialect.others_listening = listening or self._hellos != hellos

    async def _read_clock(self) -> None:
        """Set the hub's clock by the server's (see :mod:`dtfx.backends.clock`), so that the
        machines sharing the hub agree on its times whatever their own clocks say. Read when
        the backend starts and every :attr:`listeners_interval`, which follows a clock that
        drifts or is set."""

        def program() -> Program[tuple[datetime, float, float]]:
            sent = ticks()
            rows = yield Fetch("SELECT clock_timestamp()")
            return rows[0][0], sent, ticks()

        try:
            reading, sent, received = await self._transact(program, write=False)
        except BackendError:
            logger.debug("Reading the server's clock failed", exc_info=True)
            return
        self._postgres_dialect.clock.set_by(reading, sent, received)

    async def _watch(self) -> None:
        """A watch round every :attr:`watch_interval` (see :class:`SqlBackend`), which catches what
        notifications miss, and a look for listeners and at the server's clock every
        :attr:`listeners_interval`."""
        looked_at = time.monotonic()
        while True:
            await asyncio.sleep(self.watch_interval)
            if time.monotonic() - looked_at >= self.listeners_interval:
                looked_at = time.monotonic()
                await self._look_for_listeners()
                await self._read_clock()
            watch = self._watch_round()
            if watch is None:
                continue
            instance_ids, program = watch
            try:
                versions = await self._transact(program, write=False)
            except BackendError:
                logger.debug("Watching instances failed", exc_info=True)
                continue
            self._observe(instance_ids, versions)

    def _announced(self, payload: str) -> None:
        try:
            announcement = msgspec.json.decode(payload, type=_Announcement)
        except msgspec.DecodeError:
            logger.warning("Ignoring a malformed notification: %r", payload[:200])
            return
        if announcement.sender == self._sender:
            return  # this object's own commit (or hello); its waiters were woken already
        if announcement.hello:
            self._hellos += 1
            self._postgres_dialect.others_listening = True
            return
        self._notify_work(*(_CODE_KINDS[code] for code in announcement.kinds if code in _CODE_KINDS))
        for code, moment in announcement.delayed.items():
            if code in _CODE_KINDS:
                self._note_delayed(_CODE_KINDS[code], from_micros(moment))
        for instance_id in announcement.instances:
            self._notify_instance(instance_id)

    def _wake_everyone(self) -> None:
        self._notify_work(*WorkKind)
        self._instance_signals.notify_all()
