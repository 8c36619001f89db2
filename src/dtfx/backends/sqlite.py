"""The embedded default backend: a task hub in one SQLite file.

URL: ``sqlite:///path/to/taskhub.db`` (a relative path, or an absolute one after the
third slash: ``sqlite:////var/lib/hub.db``); ``sqlite://`` alone means
``./.dtfx/taskhub.db`` and ``sqlite:///:memory:`` a private in-memory database.
``?synchronous=normal`` trades the durability of the last commits on power loss
(never on a process crash) for speed; the default is ``full``.

``sqlite3`` blocks, so a backend object has a database thread of its own, and can be
awaited from any loop or thread. A brief transaction (a step of an orchestration, a
lease, a creation, a read of one instance) runs on the caller's thread instead when the
database thread has nothing to do: handing it over and back would cost two thread
wake-ups, more than most such transactions take (unless
:attr:`SqliteBackend.callers_transact` is off, as the gRPC sidecar turns it). Under
load, work queues on the database thread and the callers' loops go on meanwhile;
queries, histories and purges, whose size has no bound, always go there; and a caller
never waits for another process (it hands the transaction to the database thread when
the file is busy). The file is in WAL mode and write transactions begin with
``BEGIN IMMEDIATE`` (waiting up to a busy timeout for other processes), so several
worker processes on one machine can share a file: leases expire, and what a dead worker
held is picked up again. Other processes' changes are seen by a watch every
:attr:`SqliteBackend.watch_interval`: once ``PRAGMA data_version`` says that another
connection has committed since the round before, it wakes the dispatchers (which
otherwise look for work only every :attr:`SqliteBackend.poll_interval`, or when their
own process's work is due) and reads the instances waited for. On opening, the log is
made as long as it grows between checkpoints (see :func:`_lengthen_log`), so that the
first commits flush as fast as the later ones.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msgspec

from dtfx.backends.sql.backend import Coalesced, CoalescedRun, SqlBackend
from dtfx.backends.sql.program import (
    AssumptionFailed,
    Dialect,
    Execute,
    ExecuteMany,
    Expect,
    Fetch,
    FetchEach,
    InsertNew,
    Program,
    Stepper,
)
from dtfx.backends.sql.schema import migrate
from dtfx.core.errors import BackendError, BackendUnavailableError, ConfigurationError, UnstorableValueError

T = TypeVar("T")

logger = logging.getLogger(__name__)

DEFAULT_PATH = "./.dtfx/taskhub.db"
_SYNCHRONOUS = ("off", "normal", "full", "extra")
_BUSY_TIMEOUT = 30.0
"""How long a transaction waits for other processes to release the database."""
_BUSY_WAIT = 0.002
"""How long SQLite itself waits before reporting the database busy (then we retry)."""
_TAKEN_KEY = (sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY, sqlite3.SQLITE_CONSTRAINT_UNIQUE)
"""The extended error codes of an insert whose key is taken."""
_OLDEST_LIBRARY = (3, 35, 0)
"""The oldest SQLite the task hub's SQL runs on: ``RETURNING`` and ``AS MATERIALIZED`` came in 3.35."""


class SqliteDialect(Dialect):
    """SQLite's SQL: lists travel as one JSON array parameter; a transaction locks the whole file."""

    for_update = ""
    skip_locked = ""
    serial_key = "INTEGER PRIMARY KEY AUTOINCREMENT"
    bigint = "INTEGER"

    def in_list(self, column: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(?))"

    def list_param(self, values: Sequence[Any]) -> Any:
        return msgspec.json.encode(values).decode()

    def is_same(self, column: str) -> str:
        return f"{column} IS ?"

    def in_select(self, column: str, select: str) -> str:
        return f"{column} IN ({select})"


def parse_sqlite_url(url: str) -> tuple[str, str]:
    """The database path and ``synchronous`` setting of a ``sqlite://`` URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite":
        raise ConfigurationError(f"Not a SQLite URL: {url!r}")
    if parts.netloc:
        raise ConfigurationError(
            f"A SQLite URL has no host: use sqlite:///relative.db or sqlite:////absolute.db ({url!r})"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    synchronous = options.pop("synchronous", "full").lower()
    if synchronous not in _SYNCHRONOUS:
        raise ConfigurationError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)} (got {synchronous!r})")
    if options:
        raise ConfigurationError(f"Unknown SQLite URL option(s): {', '.join(sorted(options))}")
    return path or DEFAULT_PATH, synchronous


class SqliteBackend(SqlBackend):
    """A task hub in a SQLite file (see the module docstring).

    Args:
        url: ``sqlite:///path.db``, optionally with ``?synchronous=normal``.
    """

    poll_interval = 1.0  # other processes' changes wake dispatchers through the watch
    watch_interval: ClassVar[float] = 0.1
    """How often the backend looks whether other processes have committed (``PRAGMA data_version``)."""
    blocking_commits = True  # sqlite3 blocks anyway

    def __init__(self, url: str = f"sqlite:///{DEFAULT_PATH}") -> None:
        super().__init__(SqliteDialect())
        self.path, self._synchronous = parse_sqlite_url(url)
        self._url = url
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dtfx-sqlite")
        self._connection: sqlite3.Connection | None = None
        self._connection_lock = threading.Lock()
        """Held by whoever uses the connection: the database thread, or a caller running a transaction itself."""
        self._queued = 0
        """Jobs handed to the database thread and not finished yet."""
        self._queued_lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._seen_version: int | None = None
        """The file's ``data_version`` at the last watch round (or at opening)."""
        self._watched_version: int | None = None
        """The file's ``data_version`` at the last watch round that read the instances."""
        self.callers_transact = True
        """Whether a brief transaction runs on the caller's thread when the database thread
        has nothing to do. A server whose event loop serves many peers (the gRPC sidecar)
        turns it off: its transactions then wait on the database thread while the loop
        goes on with the peers' requests, which then commit together."""

    @property
    def url(self) -> str:
        """The URL this backend was opened with."""
        return self._url

    async def start(self) -> None:
        self._opening()
        if self._connection is None:  # once open, no trip to the database thread
            await self._on_thread(self._open)

    async def close(self) -> None:
        if self._closed:
            return
        if self.opened_in_another_process():  # its thread and connection are that process's to close
            self._closed = True
            return
        self._stopping.set()
        try:
            await self._on_thread(self._close)
        finally:
            self._closed = True
            self._thread.shutdown(wait=False)
            self._instance_signals.notify_all()  # their waits end, told that it has closed

    async def _run(
        self, program: Callable[[], Program[T]], *, write: bool, durable: bool = True, brief: bool = True
    ) -> T:
        if self._closed:
            raise self._closed_error()
        self._opening()
        transaction = partial(self._transact, program, write, durable)
        if brief and self._take_connection():
            try:
                return transaction(patient=False)
            except _BusyError:
                pass  # another process holds the database: the database thread waits for it
            finally:
                self._connection_lock.release()
        return await self._on_thread(transaction)

    def _run_blocking(self, program: Callable[[], Program[T]]) -> T:
        if self._closed:
            raise self._closed_error()
        self._opening()
        with self._connection_lock:
            return self._transact(program, True)

    def _idle(self) -> bool:
        """Whether the caller may transact: the database thread has nothing to do (and
        nobody holds the connection)."""
        return (
            self.callers_transact
            and self._connection is not None
            and not self._queued
            and not self._connection_lock.locked()
        )

    def _take_connection(self) -> bool:
        """Take the connection for the caller's thread if the database thread has nothing to do."""
        return self._idle() and self._connection_lock.acquire(blocking=False)

    async def _ensure_started(self) -> None:
        await self.start()  # which returns at once once open

    def _start_draining(self, kind: Coalesced) -> None:
        if self._idle():
            # Run the queue here, once the requests made in this turn of the loop have joined it.
            asyncio.get_running_loop().call_soon(self._drain_here, kind)
        else:
            self._drain_on_thread(kind)

    def _drain_here(self, kind: Coalesced) -> None:
        if not self._take_connection():
            self._drain_on_thread(kind)
            return
        try:
            run = self._drain(kind)
            if run is None or self._run_requests(run, patient=False):
                return
        finally:
            self._connection_lock.release()
        self._drain_on_thread(kind, run)  # the database was busy: the database thread runs the rest

    def _drain_on_thread(self, kind: Coalesced, run: CoalescedRun | None = None) -> None:
        try:
            self._submit(partial(self._drain_now, kind, run))
        except RuntimeError:  # closed meanwhile
            error = self._closed_error()
            if run is not None:
                self._settle(run.futures, run.outcomes + [error] * (len(run.futures) - len(run.outcomes)))
            self._refuse_queued(kind, error)

    async def _on_thread(self, work: Callable[[], T]) -> T:
        if self._closed:
            raise self._closed_error()
        return await asyncio.wrap_future(self._submit(work))

    def _submit(self, work: Callable[[], T]) -> Future[T]:
        """Run ``work`` on the database thread, holding the connection."""

        def job() -> T:
            try:
                with self._connection_lock:
                    return work()
            finally:
                with self._queued_lock:
                    self._queued -= 1

        with self._queued_lock:
            self._queued += 1
        try:
            return self._thread.submit(job)
        except BaseException:
            with self._queued_lock:
                self._queued -= 1
            raise

    def _closed_error(self) -> BackendUnavailableError:
        return BackendUnavailableError(f"The SQLite backend for {self.path} has been closed.")

    # -- on the database thread ----------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        if self._stopping.is_set():  # work queued behind close() must not open the file again
            raise self._closed_error()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = sqlite3.connect(
                self.path, isolation_level=None, timeout=_BUSY_WAIT, cached_statements=256, check_same_thread=False
            )
            _while_busy(partial(connection.execute, "PRAGMA journal_mode=WAL"))  # other processes opening it
            connection.execute(f"PRAGMA synchronous={self._synchronous}")
        except sqlite3.Error as error:
            raise BackendUnavailableError(f"Cannot open the SQLite task hub {self.path}: {error}") from error
        self._connection = connection
        try:
            _check_library(connection)
            self._transact(partial(migrate, self._dialect), write=True)
        except BaseException:
            self._close()
            raise
        if self.path != ":memory:" and self._synchronous in ("full", "extra"):
            _lengthen_log(connection, Path(f"{self.path}-wal"))
        self._seen_version = _data_version(connection)
        self._watcher = threading.Thread(target=self._watch, name="dtfx-sqlite-watch", daemon=True)
        self._watcher.start()
        logger.debug("Opened SQLite task hub %s", self.path)
        return connection

    def _watch(self) -> None:
        """Start a watch round on the database thread every :attr:`watch_interval` (see :class:`SqlBackend`)."""
        while not self._stopping.wait(self.watch_interval):
            try:
                self._submit(self._watch_once).result()
            except RuntimeError:  # the thread has been shut down
                return
            except Exception:
                logger.debug("Watching instances failed", exc_info=True)

    def _watch_once(self) -> None:
        connection = self._connection
        if connection is None:  # closed meanwhile
            return
        # It changes only when another connection (another process) commits: this
        # process's own commits have woken their waiters already.
        version = _data_version(connection)
        if version != self._seen_version:
            self._seen_version = version
            self._changed_outside()
        watch = self._watch_round()
        if watch is None or version == self._watched_version:
            return
        instance_ids, program = watch
        self._observe(instance_ids, self._transact(program, write=False))
        self._watched_version = version

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
            self._watched_version = None  # a connection's own counter

    def _drain_now(self, kind: Coalesced, run: CoalescedRun | None = None) -> None:
        """Run ``kind``'s queue (or what is left of ``run``, taken from it before)."""
        run = run or self._drain(kind)
        if run is not None:
            self._run_requests(run, patient=True)

    def _run_requests(self, run: CoalescedRun, *, patient: bool) -> bool:
        """Run the programs of ``run`` and settle its futures; False if one found the
        database busy and ``patient`` is false (the rest of ``run`` is left to run)."""
        while (program := run.next_program()) is not None:
            try:
                run.ran(self._transact(program, run.kind.write, patient=patient))
            except _BusyError:
                return False
            except Exception as error:
                run.ran(error)
        self._settle(run.futures, run.outcomes)
        return True

    def _transact(
        self, program: Callable[[], Program[T]], write: bool, durable: bool = True, *, patient: bool = True
    ) -> T:
        # What failed as busy was never committed, so running the program again is safe.
        try:
            return _while_busy(partial(self._transact_once, program, write, durable), patient=patient)
        except sqlite3.OperationalError as error:
            if _is_full(error) or _is_busy(error):  # rolled back; it may go through once there is room, or time
                raise BackendUnavailableError(f"SQLite task hub {self.path}: {error}") from error
            raise BackendError(f"SQLite task hub {self.path}: {error}") from error
        except (sqlite3.DataError, UnicodeEncodeError) as error:  # one past the size limit, a lone surrogate
            raise UnstorableValueError(f"SQLite task hub {self.path}: {error}") from error
        except sqlite3.Error as error:
            raise BackendError(f"SQLite task hub {self.path}: {error}") from error

    def _transact_once(self, program: Callable[[], Program[T]], write: bool, durable: bool) -> T:
        connection = self._open()
        stepper = Stepper(program())
        # In WAL mode, NORMAL skips the flush at commit only; the next FULL commit flushes
        # the log, this transaction's part of it included (and checkpoints flush anyway).
        relaxed = write and not durable and self._synchronous in ("full", "extra")
        if relaxed:
            connection.execute("PRAGMA synchronous=NORMAL")
        try:
            if write:
                connection.execute("BEGIN IMMEDIATE")
            try:
                result = _drive(connection, stepper)
                if write:
                    connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        finally:
            if relaxed:
                self._restore_synchronous(connection)
        self._after_commit(stepper.notifications)
        return result

    def _restore_synchronous(self, connection: sqlite3.Connection) -> None:
        try:
            connection.execute(f"PRAGMA synchronous={self._synchronous}")
        except sqlite3.Error:
            self._close()  # never commit a step with the relaxed setting: reopen with the configured one
            raise


_WAL_HEADER, _FRAME_HEADER = 32, 24
"""Bytes of the write-ahead log's header, and of each frame's (a frame holds one page)."""
_FILLER_CACHE_PAGES = 16
"""The page cache while the log is lengthened: small, so that the filler's pages spill to the log."""


def _lengthen_log(connection: sqlite3.Connection, log: Path) -> None:
    """Make the write-ahead log as long as it grows between two checkpoints, at once.

    A commit that appends to the log makes its flush to disk grow the file too (its size
    and its new blocks go through the file system's journal); a commit that writes where
    the log was written before flushes its pages alone, in about half the time on ext4.
    The log reaches that length after its first checkpoint and keeps it; this gets there
    at start: a transaction writes as many pages with a page cache too small to hold
    them, so that SQLite spills them to the log, and rolls back. Nothing is committed:
    frames after the log's last commit frame are never read back, and the next commits
    write over them. Skipped, being only an optimisation, when the file is busy.
    """
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    pages = connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    length = _WAL_HEADER + pages * (_FRAME_HEADER + page_size)
    if pages <= 0 or (log.exists() and log.stat().st_size >= length):
        return
    cache_size = connection.execute("PRAGMA cache_size").fetchone()[0]
    try:
        connection.execute(f"PRAGMA cache_size={_FILLER_CACHE_PAGES}")
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute("CREATE TABLE dtfx_log_filler (filler BLOB)")
            connection.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                " INSERT INTO dtfx_log_filler SELECT zeroblob(?) FROM n",
                (pages + 2 * _FILLER_CACHE_PAGES, page_size - 200),  # a row fills most of a page; the last stay cached
            )
        finally:
            connection.execute("ROLLBACK")
    except sqlite3.OperationalError as error:
        logger.debug("Not lengthening the write-ahead log of %s: %s", log, error)
    finally:
        connection.execute(f"PRAGMA cache_size={int(cache_size)}")


class _BusyError(Exception):
    """Another process holds the database, and the caller does not wait (it hands the work to the database thread)."""


def _check_library(connection: sqlite3.Connection) -> None:
    """Refuse, clearly, a SQLite library that lacks what the task hub's SQL uses."""
    if sqlite3.sqlite_version_info < _OLDEST_LIBRARY:
        raise ConfigurationError(
            f"dtfx needs SQLite {'.'.join(map(str, _OLDEST_LIBRARY))} or newer; this Python's sqlite3 module"
            f" uses SQLite {sqlite3.sqlite_version} (use a newer Python build, or PostgreSQL)"
        )
    try:
        connection.execute("SELECT count(*) FROM json_each('[]')")
    except sqlite3.OperationalError as error:
        raise ConfigurationError(f"dtfx needs SQLite's JSON functions, which this SQLite lacks ({error})") from error


def _data_version(connection: sqlite3.Connection) -> int:
    """A number that changes whenever another connection (another process) commits to the file."""
    version: int = connection.execute("PRAGMA data_version").fetchone()[0]
    return version


def _primary_code(error: sqlite3.Error) -> int:
    code: int = getattr(error, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
    return code


def _while_busy(attempt: Callable[[], T], *, patient: bool = True) -> T:
    """``attempt()``, made again while the file is busy, for up to :data:`_BUSY_TIMEOUT` (then
    the busy error is raised; if not ``patient``, :class:`_BusyError` at once).

    SQLite's own busy handler backs off up to 100 ms at a time, which lets busy processes
    starve a third one; waiting briefly and trying again is fairer.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT
    while True:
        try:
            return attempt()
        except sqlite3.OperationalError as error:
            if not _is_busy(error) or time.monotonic() > deadline:
                raise
            if not patient:
                raise _BusyError from error
        time.sleep(random.uniform(0.0005, 0.003))


def _is_busy(error: sqlite3.OperationalError) -> bool:
    return _primary_code(error) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_full(error: sqlite3.OperationalError) -> bool:
    """The disk (or the file's size limit) is full."""
    return _primary_code(error) == sqlite3.SQLITE_FULL


def _drive(connection: sqlite3.Connection, stepper: Stepper[T]) -> T:
    """Run the program's statements on ``connection``."""
    value: Any = None
    while (statement := stepper.advance(value)) is not None:
        value = None
        if isinstance(statement, Fetch):
            value = connection.execute(statement.sql, statement.params).fetchall()
        elif isinstance(statement, FetchEach):
            value = [connection.execute(fetch.sql, fetch.params).fetchall() for fetch in statement.fetches]
        elif isinstance(statement, Expect):
            if connection.execute(statement.sql, statement.params).fetchone() is None:
                raise AssumptionFailed(statement.sql)
        elif isinstance(statement, InsertNew):
            try:
                _execute(connection, statement.insert)
            except sqlite3.IntegrityError as error:
                if error.sqlite_errorcode not in _TAKEN_KEY:
                    raise
                raise AssumptionFailed(str(error)) from error
        else:
            _execute(connection, statement)
    return stepper.result


def _execute(connection: sqlite3.Connection, statement: Execute | ExecuteMany) -> None:
    if isinstance(statement, Execute):
        connection.execute(statement.sql, statement.params)
    else:
        connection.executemany(statement.sql, statement.rows)
