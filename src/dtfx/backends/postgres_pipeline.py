"""Running a program's statements on a psycopg connection through libpq's pipeline mode.

psycopg's cursors cost about 25 µs of Python and a socket write (with a poll) per
statement, which made up most of a transaction's time. Here a statement is only
queued in libpq's output buffer (parameters dumped by psycopg's adapters, statements
prepared once per connection), and the buffer goes out once per round trip: when the
program needs rows, and at the end. A write transaction costs one round trip per
fetch plus one for the commit (``BEGIN`` and ``COMMIT`` travel with the rest).

A pipeline that runs *alone* (the only transaction under way in its backend: at low load)
sends each statement as soon as it is queued, so that the server runs it while the program
builds the next one: the round trip then waits only for the last statements and the
commit. Under load, when both keep their cores busy anyway, a socket write per statement
costs more than it saves, and the statements go out together.

A pipeline alone that waits for the server on its thread (:meth:`Pipeline.run_blocking`)
also keeps polling the socket for up to :data:`_SPIN` before it sleeps: on a virtual
machine, a thread that the server's answer wakes from sleep runs again 75-100 µs later,
about as long as the server takes for a commit's statements, and a commit's wait mostly
ends within :data:`_SPIN`. It yields its core at each poll, to a thread of the process
that wants the interpreter or a process that wants the core (the server's). A loop's
wait (:meth:`Pipeline.run`) sleeps at once: the loop has other work to run.

A statement the server refuses fails the transaction cleanly (the rest of the
pipeline is skipped, the transaction rolled back) and raises psycopg's error class
for its SQLSTATE; so does one whose parameters psycopg cannot send (a NUL in text, a
lone surrogate), with psycopg's error or Python's. A pipeline cancelled while it waits
for the server has the server cancel the statement under way, sends nothing more, and
ends rolled back (or committed, if its commit had gone out) within :data:`_STOP_GRACE`:
its connection goes back to the pool clean. Anything else that interrupts a pipeline (a
lost connection, an error in the program, a stop that takes longer) closes the
connection: the server rolls back whatever was sent, and the pool replaces it. So does a
refusal to write in a read-only transaction: the server is a standby (the old primary,
after a failover), and the pool's next connection may reach the new primary (libpq picks
it among the URL's hosts with ``target_session_attrs=read-write``).

A pipeline first makes sure that the server has not closed its connection while it was
idle in the pool (a restart, a terminated session, the server's ``idle_session_timeout``):
such a connection fails with :class:`StaleConnection` before anything is sent, so that the
transaction can run again at once on another one, where one found closed during the commit
would leave its outcome unknown.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import time
from collections import deque
from collections.abc import Generator, Sequence
from functools import lru_cache
from typing import Any, TypeVar, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer

from dtfx.backends.sql.program import (
    AssumptionFailed,
    Execute,
    ExecuteMany,
    Expect,
    Fetch,
    FetchEach,
    InsertNew,
    Row,
    Stepper,
)

T = TypeVar("T")

_PREPARED_KINDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "BEGIN", "COMMIT")
"""Statements worth preparing (the others, migrations' DDL, run once); prepared, ``BEGIN`` and
``COMMIT`` are not parsed again by every transaction."""
_MAX_PREPARED = 100
"""Prepared statements per connection; beyond that, statements are sent unprepared."""
_names = itertools.count(1)
_SYNC = "sync"
"""A pending entry: the result of a pipeline sync."""
_NEW_KEYS = "new keys"
"""A pending entry: the result of an :class:`InsertNew`'s statement."""
_UNIQUE_VIOLATION = b"23505"
_SPIN = 0.002
"""Seconds a blocking wait of a pipeline alone polls the socket before it sleeps (see the
module docstring): a commit's wait mostly ends sooner, a slow one then costs at most this
much of a core more."""
_STOP_GRACE = 1.0
"""Seconds a cancelled pipeline may take to end cleanly (see the module docstring)."""

EXPECT_FUNCTION = "dtfx_expect"
"""The server-side function that checks an :class:`Expect`: it raises :data:`EXPECT_FAILED` on false."""
EXPECT_FAILED = "DX001"
"""The SQLSTATE of an :class:`Expect` found false."""
EXPECT_FUNCTION_BODY = f"""
BEGIN
    IF NOT holds THEN
        RAISE EXCEPTION 'dtfx: a row changed since this process wrote it' USING ERRCODE = '{EXPECT_FAILED}';
    END IF;
    RETURN true;
END """
"""The function's source, as the server keeps it (``pg_proc.prosrc``)."""
EXPECT_FUNCTION_SQL = f"""CREATE OR REPLACE FUNCTION {EXPECT_FUNCTION}(holds boolean) RETURNS boolean
LANGUAGE plpgsql AS $${EXPECT_FUNCTION_BODY}$$"""

_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.EMPTY_QUERY)
_IN_TRANSACTION = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)


class _ConnectionState:
    """What a connection keeps between transactions: its adapters, its prepared statements
    and the server's farewell, if it said one. It lives on the connection (an attribute),
    and goes with it: a table of states by connection would keep every connection alive,
    since a state's adapters refer to their connection."""

    def __init__(self, connection: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> None:
        self.transformer = Transformer(connection)
        self.prepared: dict[str, bytes] = {}
        self.readable = select.poll()
        self.readable.register(connection.pgconn.socket, select.POLLIN)
        self.farewell: str | None = None
        connection.add_notice_handler(self._note)

    @staticmethod
    def of(connection: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> _ConnectionState:
        """The connection's state, made on its first pipeline."""
        state = getattr(connection, _STATE_ATTRIBUTE, None)
        if state is None:
            state = _ConnectionState(connection)
            setattr(connection, _STATE_ATTRIBUTE, state)
        return cast(_ConnectionState, state)

    def _note(self, diagnostic: psycopg.errors.Diagnostic) -> None:
        if diagnostic.severity_nonlocalized == "FATAL":  # the server's last word before it closes
            self.farewell = f"{diagnostic.message_primary} ({diagnostic.sqlstate})"

    def ensure_open(self, pgconn: pq.abc.PGconn) -> None:
        """Raise :class:`StaleConnection` if the server has closed this idle connection. An
        idle connection has nothing to read: one that is readable holds the server's farewell
        (a FATAL error, which libpq passes on as a notice) and then the connection's end,
        which may not have arrived yet. Anything else it may hold (a notice, a setting's new
        value) is read, and the connection is used."""
        for _ in range(3):
            if not self.readable.poll(0):
                return
            try:
                pgconn.consume_input()
                pgconn.is_busy()  # parses what was read: a farewell reaches _note
            except psycopg.OperationalError as error:
                raise StaleConnection(str(error).strip()) from error
            if self.farewell is not None:
                raise StaleConnection(f"the server closed the connection: {self.farewell}")


class StaleConnection(psycopg.OperationalError):
    """The server closed this connection while it was idle in the pool (a restart, a
    terminated session, its ``idle_session_timeout``): nothing was sent on it, and the
    transaction can run at once on another connection."""


_STATE_ATTRIBUTE = "_dtfx_pipeline_state"


@lru_cache(maxsize=512)
def _numbered(sql: str) -> bytes:
    """A program's ``?`` placeholders as ``$1``, ``$2``, ... (programs' SQL has no other ``?``)."""
    parts = sql.split("?")
    numbered = [parts[0]]
    for number, part in enumerate(parts[1:], 1):
        numbered.append(f"${number}{part}")
    return "".join(numbered).encode()


class Pipeline:
    """One program run on ``connection`` (see the module docstring).

    ``transaction``: wrap the statements in ``BEGIN`` / ``COMMIT``; otherwise each
    fetch is its own implicit transaction (reads). ``durable=False``: the transaction's
    commit does not wait for the server's disk (``synchronous_commit=off``). ``alone``: the
    only transaction under way in its backend; each statement goes out as soon as it is
    queued, and a blocking wait polls before it sleeps (see the module docstring).

    The pipeline's work is one generator (:meth:`_steps`) that yields whenever it must
    wait for the connection's socket; :meth:`run` waits on an event loop, with an async
    connection, and :meth:`run_blocking` on the calling thread, with a sync one.
    """

    def __init__(
        self,
        connection: psycopg.AsyncConnection[Any] | psycopg.Connection[Any],
        *,
        transaction: bool,
        durable: bool = True,
        alone: bool = False,
    ) -> None:
        self._connection = connection
        self._pgconn = connection.pgconn
        self._state = _ConnectionState.of(connection)
        self._transaction = transaction
        self._durable = durable
        self._alone = alone
        self._pending: deque[list[pq.abc.PGresult] | str | None] = deque()
        """Per command sent, in order: where its result goes (``None``: nowhere; ``_NEW_KEYS``:
        nowhere, from an :class:`InsertNew`), or ``_SYNC``."""
        self._new_statements: list[str] = []
        self._unsynced = False
        """Commands were sent since the last sync."""
        self.committing = False
        """The ``COMMIT`` has been sent: a lost connection leaves the outcome unknown."""
        self._stopping = False
        """Cancelled: the program gets no further (see :meth:`_stop`)."""

    async def run(self, stepper: Stepper[T]) -> T:
        """Run the program's statements; return its result once they are all done (committed)."""
        connection = self._connection
        assert isinstance(connection, psycopg.AsyncConnection)
        steps = self._steps(stepper)
        try:
            write = next(steps)
            while True:
                await _readable(self._pgconn.socket, write=write)
                write = steps.send(None)
        except StopIteration as done:
            return cast(T, done.value)
        except _RefusedError as refused:
            if isinstance(refused.error, pg_errors.ReadOnlySqlTransaction):
                await connection.close()  # a standby's: see the module docstring
            raise refused.error from None
        except asyncio.CancelledError:
            if not await self._stop(connection, steps, write):
                await self._close(connection, steps)
            raise
        except BaseException:
            await self._close(connection, steps)
            raise

    async def _stop(self, connection: psycopg.AsyncConnection[Any], steps: _Waits[T], write: bool) -> bool:
        """After a cancellation: have the server cancel the statement under way and see the
        pipeline to its end, for at most :data:`_STOP_GRACE`; whether it ended cleanly. The
        program sends nothing more: the transaction is rolled back unless its commit had gone out."""
        self._stopping = True
        try:
            async with asyncio.timeout(_STOP_GRACE):
                await connection.cancel_safe()
                while True:
                    await _readable(self._pgconn.socket, write=write)
                    write = steps.send(None)
        except (StopIteration, _RefusedError):
            return True
        except BaseException:  # the time is up, cancelled again, the connection lost
            return False

    async def _close(self, connection: psycopg.AsyncConnection[Any], steps: _Waits[T]) -> None:
        """The pipeline is in an unknown state: closing the connection makes the server roll
        back whatever was sent; the pool replaces it."""
        self._give_up(steps)
        await connection.close()

    def _give_up(self, steps: _Waits[T]) -> None:
        """Before the connection is closed: the program ends, and what it prepared is forgotten."""
        steps.close()
        self._forget_new_statements()

    def run_blocking(self, stepper: Stepper[T]) -> T:
        """:meth:`run` on the calling thread, which waits for the server (a sync connection)."""
        connection = self._connection
        assert isinstance(connection, psycopg.Connection)
        steps = self._steps(stepper)
        try:
            write = next(steps)
            while True:
                _wait_here(self._pgconn.socket, write=write, spin=self._alone)
                write = steps.send(None)
        except StopIteration as done:
            return cast(T, done.value)
        except _RefusedError as refused:
            if isinstance(refused.error, pg_errors.ReadOnlySqlTransaction):
                connection.close()  # a standby's: see the module docstring
            raise refused.error from None
        except BaseException:  # as _close does
            self._give_up(steps)
            connection.close()
            raise

    def _steps(self, stepper: Stepper[T]) -> _Waits[T]:
        try:
            return (yield from self._run_steps(stepper))
        except _AbandonedError as abandoned:  # nothing of the statement at hand went out
            yield from self._abandon()
            raise _RefusedError(abandoned.error) from None

    def _run_steps(self, stepper: Stepper[T]) -> _Waits[T]:
        pgconn = self._pgconn
        self._state.ensure_open(pgconn)
        pgconn.enter_pipeline_mode()
        if self._transaction:
            self._send("BEGIN", ())
            if not self._durable:
                self._send("SET LOCAL synchronous_commit TO OFF", ())
        value: Any = None
        while (statement := stepper.advance(value)) is not None:
            value = None
            if self.committing:
                raise RuntimeError(f"A statement after the last one: {statement}")
            if isinstance(statement, Fetch):
                value = (yield from self._fetch([statement], last=statement.last))[0]
            elif isinstance(statement, FetchEach):
                value = yield from self._fetch(statement.fetches)
            elif isinstance(statement, Expect):  # checked by the server: nothing to wait for
                self._send(f"SELECT {EXPECT_FUNCTION}(EXISTS ({statement.sql}))", statement.params)
            elif isinstance(statement, InsertNew):  # so is this one, by its keys
                self._queue(statement.insert, _NEW_KEYS)
            else:
                self._queue(statement)
            if self._alone:
                pgconn.flush()  # what the socket cannot take now goes with the next flush
        if self._transaction and not self.committing:
            self._commit()
        if self._unsynced:
            yield from self._sync()
        pgconn.exit_pipeline_mode()
        return stepper.result

    def _queue(self, statement: Execute | ExecuteMany, destination: str | None = None) -> None:
        """Queue a statement run for its effect (once per row, for an :class:`ExecuteMany`)."""
        if isinstance(statement, Execute):
            self._send(statement.sql, statement.params, destination)
        else:
            for params in statement.rows:
                self._send(statement.sql, params, destination)

    def _send(self, sql: str, params: Sequence[Any], result: list[pq.abc.PGresult] | str | None = None) -> None:
        """Queue a statement; its result goes to ``result`` (or, :data:`_NEW_KEYS`, nowhere,
        and a taken key is an :class:`AssumptionFailed`)."""
        if self._stopping:
            raise _AbandonedError(asyncio.CancelledError())
        state = self._state
        query = _numbered(sql)
        try:
            values = state.transformer.dump_sequence(params, [PyFormat.TEXT] * len(params)) if params else None
        except (psycopg.DataError, UnicodeEncodeError) as error:  # a NUL in text, a lone surrogate
            raise _AbandonedError(error) from error
        name = state.prepared.get(sql)
        if name is None and len(state.prepared) < _MAX_PREPARED and sql.lstrip().startswith(_PREPARED_KINDS):
            # Parameter types are left to the server, which infers them from the statement.
            name = state.prepared[sql] = f"dtfx_{next(_names)}".encode()
            self._new_statements.append(sql)
            self._pgconn.send_prepare(name, query)
            self._pending.append(None)
        if name is None:
            self._pgconn.send_query_params(query, values)
        else:
            self._pgconn.send_query_prepared(name, values)
        self._pending.append(result)
        self._unsynced = True

    def _commit(self) -> None:
        self._send("COMMIT", ())
        self.committing = True

    def _fetch(self, fetches: Sequence[Fetch], *, last: bool = False) -> _Waits[list[list[Row]]]:
        """Send the fetches (and what was queued before them) and return their rows; with
        ``last``, the transaction commits first."""
        results: list[list[pq.abc.PGresult]] = []
        for fetch in fetches:
            results.append([])
            self._send(fetch.sql, fetch.params, results[-1])
        if not self._transaction:
            yield from self._sync()
        elif last:
            self._commit()
            yield from self._sync()
        else:
            self._pgconn.send_flush_request()
            yield from self._receive()
        transformer = self._state.transformer
        rows: list[list[Row]] = []
        for (result,) in results:
            transformer.set_pgresult(result)
            rows.append(transformer.load_rows(0, result.ntuples, tuple))
        return rows

    def _sync(self) -> _Waits[None]:
        """End the pipeline's current part (committing an implicit transaction) and read its results."""
        self._pgconn.pipeline_sync()
        self._pending.append(_SYNC)
        self._unsynced = False
        yield from self._receive()

    def _receive(self) -> _Waits[None]:
        """Flush, then read the results of every command sent; raise :class:`_RefusedError` for
        the first statement the server refused, once the connection is clean again."""
        yield from self._flush()
        error = yield from self._drain()
        if error is not None:
            yield from self._abandon()
            raise _RefusedError(error)

    def _abandon(self) -> _Waits[None]:
        """Skip what is left of the pipeline and roll its transaction back: the connection is
        clean again, out of pipeline mode."""
        self._forget_new_statements()
        pgconn = self._pgconn
        if self._unsynced or pgconn.pipeline_status == pq.PipelineStatus.ABORTED:
            pgconn.pipeline_sync()  # the server skips the rest up to here
            self._pending.append(_SYNC)
            yield from self._flush()
            yield from self._drain()
        if pgconn.transaction_status in _IN_TRANSACTION:
            pgconn.send_query_params(b"ROLLBACK", None)
            pgconn.pipeline_sync()
            self._pending.extend((None, _SYNC))
            yield from self._flush()
            yield from self._drain()
        pgconn.exit_pipeline_mode()

    def _drain(self) -> _Waits[psycopg.Error | AssumptionFailed | None]:
        """Read the results of every command sent; return the first refusal among them."""
        error: psycopg.Error | AssumptionFailed | None = None
        while self._pending:
            destination = self._pending.popleft()
            result = yield from self._next_result()
            assert result is not None, "a pipeline result went missing"
            if destination is _SYNC:
                continue
            end = yield from self._next_result()
            assert end is None, "a statement gave more than one result"
            status = result.status
            if status in _OK:
                if isinstance(destination, list):
                    destination.append(result)
            elif status != pq.ExecStatus.PIPELINE_ABORTED and error is None:
                error = _server_error(result, self._connection.info.encoding, new_keys=destination is _NEW_KEYS)
        return error

    def _next_result(self) -> _Waits[pq.abc.PGresult | None]:
        pgconn = self._pgconn
        while pgconn.is_busy():
            yield False
            pgconn.consume_input()
        return pgconn.get_result()

    def _flush(self) -> _Waits[None]:
        pgconn = self._pgconn
        while pgconn.flush():
            # Read while waiting to write: a server blocked on sending results stops reading.
            yield True
            pgconn.consume_input()

    def _forget_new_statements(self) -> None:
        """Statements prepared in a failed pipeline may not exist: prepare them again next time."""
        for sql in self._new_statements:
            self._state.prepared.pop(sql, None)
        self._new_statements.clear()


_Waits = Generator[bool, None, T]
"""A part of a pipeline's work: it yields whenever it waits for the socket, ``True`` if
for it to be writable as well as readable, and returns its value."""


async def _readable(fileno: int, *, write: bool) -> None:
    """Until the socket is readable (or, with ``write``, writable), on the running event loop."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fileno, _wake, ready)
    if write:
        loop.add_writer(fileno, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fileno)
        if write:
            loop.remove_writer(fileno)


def _wait_here(fileno: int, *, write: bool, spin: bool = False) -> None:
    """Until the socket is readable (or, with ``write``, writable), blocking the calling
    thread; with ``spin``, polling it for up to :data:`_SPIN` first (see the module docstring)."""
    poller = select.poll()
    poller.register(fileno, select.POLLIN | select.POLLOUT if write else select.POLLIN)
    if spin:
        until = time.perf_counter() + _SPIN
        while time.perf_counter() < until:
            if poller.poll(0):
                return
            os.sched_yield()
    poller.poll()


class _CarryingError(Exception):
    """An exception carrying ``error``, the one the caller is to get."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _AbandonedError(_CarryingError):
    """The program is given up before its next statement: psycopg cannot send that statement's
    parameters, or the pipeline is stopping (``error``: a :class:`asyncio.CancelledError`)."""


class _RefusedError(_CarryingError):
    """The program did not run to its end: the server refused a statement, psycopg its
    parameters, or the pipeline was stopping (the pipeline has been cleaned up)."""


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _server_error(result: pq.abc.PGresult, encoding: str, *, new_keys: bool) -> psycopg.Error | AssumptionFailed:
    """psycopg's exception for a statement the server refused (:class:`AssumptionFailed` for an
    :class:`Expect`, and for an :class:`InsertNew` (``new_keys``) whose key was taken)."""
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
    message = result.error_message.decode(encoding, "replace").strip()
    if sqlstate == EXPECT_FAILED.encode() or (new_keys and sqlstate == _UNIQUE_VIOLATION):
        return AssumptionFailed(message)
    try:
        error_class = psycopg.errors.lookup(sqlstate.decode()) if sqlstate else psycopg.DatabaseError
    except KeyError:
        error_class = psycopg.DatabaseError
    return error_class(message)
