"""Programs: transactional logic written once, driven by each SQL backend.

A program is a generator that yields :data:`Step` values and receives their results:
the rows of a :class:`Fetch`, a list of row lists for a :class:`FetchEach`, ``None``
for the others (an :class:`Expect` that fails, or an :class:`InsertNew` whose key is
taken, ends the transaction). The backend runs one program as one transaction, sync
(SQLite) or async (PostgreSQL), and may run it again from the start after a retryable
error (a program only reads its arguments, never changes them).

SQL in programs uses ``?`` placeholders; a :class:`Dialect` supplies the fragments that
differ between databases, and the statements that write many rows at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, ClassVar, Generic, TypeVar

from dtfx.backends.base import WorkKind
from dtfx.backends.clock import utc_now
from dtfx.core.history import OrchestrationStatus
from dtfx.core.state import OrchestrationState

T = TypeVar("T")

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Fetch:
    """Run a statement and return all its rows."""

    sql: str
    params: Sequence[Any] = ()
    last: bool = False
    """The program runs no statement after this one, so a driver may send the commit with
    it (one round trip less); the rows then come back once the transaction has committed."""


@dataclass(frozen=True, slots=True)
class FetchEach:
    """Run several statements and return the rows of each, in order.

    The statements do not depend on each other's rows, so a driver may send them
    together (one round trip); each still runs after the one before it has finished.
    """

    fetches: Sequence[Fetch]


@dataclass(frozen=True, slots=True)
class Expect:
    """Run a query that must return a row: what the program assumed of the store (a row it
    wrote before, unchanged since) still holds. If it returns none, the driver rolls the
    transaction back and raises :class:`AssumptionFailed`; the caller runs the program
    again without the assumption."""

    sql: str
    params: Sequence[Any] = ()


class AssumptionFailed(Exception):  # noqa: N818 - a signal to run again, not an error
    """An :class:`Expect` found the store changed, or an :class:`InsertNew` found a key taken:
    nothing was written."""


@dataclass(frozen=True, slots=True)
class Execute:
    """Run a statement for its effect."""

    sql: str
    params: Sequence[Any] = ()


@dataclass(frozen=True, slots=True)
class ExecuteMany:
    """Run a statement once per parameter row."""

    sql: str
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True, slots=True)
class Notify:
    """After the commit, wake the waiters of these work kinds and instances (in every process)."""

    kinds: frozenset[WorkKind] = frozenset()
    instances: Mapping[str, OrchestrationStatus] = field(default_factory=dict)
    """The instances whose status changed, with the status they now have."""
    ended: Mapping[str, OrchestrationState] = field(default_factory=dict)
    """Of those, the ones that ended, with their whole row (payloads too) as written."""
    delayed: Collection[tuple[WorkKind, datetime]] = field(default_factory=tuple)
    """Work this transaction wrote for later: (kind, visible-at time), for this process's timers."""


@dataclass(frozen=True, slots=True)
class InsertNew:
    """Run ``insert``, whose rows the program assumed to be new (it did not read them): if a
    row's key is taken, the driver rolls the transaction back and raises
    :class:`AssumptionFailed`, as for an :class:`Expect`. The insert is the check: it costs
    no statement of its own."""

    insert: Execute | ExecuteMany


Statement = Fetch | FetchEach | Expect | InsertNew | Execute | ExecuteMany
Step = Statement | Notify
Program = Generator[Step, Any, T]
"""A generator yielding steps, receiving rows (for :class:`Fetch` and :class:`FetchEach`) and returning a ``T``."""


class Dialect(ABC):
    """The SQL fragments that differ between databases, and their clocks."""

    for_update: ClassVar[str]
    """Appended to a select that reads rows the transaction will change."""
    skip_locked: ClassVar[str]
    """Appended to the select that picks work items to lease."""
    serial_key: ClassVar[str]
    """The column type of an auto-incremented integer primary key whose values are never reused."""
    bigint: ClassVar[str]
    """The type of a 64-bit integer column."""
    writes_in_with: ClassVar[bool] = False
    """Whether a ``WITH`` clause may change rows (``WITH changed AS (UPDATE ... RETURNING ...)``)."""

    def now(self) -> datetime:
        """The moment a program runs at, off the task hub's clock (see :mod:`dtfx.backends.clock`):
        this machine's, unless the database is shared by machines."""
        return utc_now()

    @abstractmethod
    def in_list(self, column: str) -> str:
        """A condition: ``column`` is one of the values of one :meth:`list_param` parameter."""

    @abstractmethod
    def list_param(self, values: Sequence[Any]) -> Any:
        """The parameter value for :meth:`in_list`."""

    @abstractmethod
    def is_same(self, column: str) -> str:
        """A condition: ``column`` equals the one parameter, NULL equalling NULL."""

    @abstractmethod
    def in_select(self, column: str, select: str) -> str:
        """A condition: ``column`` is one of the values ``select`` returns, found through
        ``column``'s index whatever the plan thinks of ``select``'s size."""

    def notify(self, notify: Notify) -> Sequence[Step]:
        """The steps that wake the waiters ``notify`` names: ``notify`` itself (this process),
        after whatever tells other processes inside the transaction (default: nothing)."""
        return (notify,)

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> Execute | ExecuteMany:
        """The statement that inserts ``rows`` (each the values of ``columns``, in order) into ``table``.

        Default: the one-row ``INSERT`` run once per row, which costs little where the
        driver loops in C (SQLite's ``executemany``). Rows are inserted in order (an
        identity column numbers them in that order).
        """
        return ExecuteMany(insert_sql(table, columns), rows)

    def update_rows(
        self, table: str, columns: tuple[str, ...], key: str, rows: Sequence[Sequence[Any]]
    ) -> Execute | ExecuteMany:
        """The statement that sets ``columns`` of rows of ``table``: each of ``rows`` holds the
        values of ``columns``, then the value of ``key`` that picks the row to change (one row
        each; keys unique).

        The transaction must hold the rows' locks already (it read them ``FOR UPDATE``):
        one statement may change them in any order, so it must not be the one to lock them.
        Default: the one-row ``UPDATE`` run once per row.
        """
        return ExecuteMany(update_sql(table, columns, key), rows)


@cache
def insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT`` of one row of ``columns`` into ``table``: the values are the parameters."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


@cache
def update_sql(table: str, columns: tuple[str, ...], key: str) -> str:
    """``UPDATE`` of ``columns`` of the row of ``table`` with a given ``key``: the parameters
    are the values of ``columns``, then the key's."""
    return f"UPDATE {table} SET {', '.join(f'{column} = ?' for column in columns)} WHERE {key} = ?"


class Stepper(Generic[T]):
    """Walks a driver through a program: the statements to run, then the result.

    ``statement = stepper.advance(value)`` gives the next statement (``value`` is the
    previous one's rows, or ``None``) until it returns ``None``; then :attr:`result` is
    the program's value and :attr:`notifications` its notifications.
    """

    def __init__(self, program: Program[T]) -> None:
        self._program = program
        self.notifications: list[Notify] = []
        self.result: T

    def advance(self, value: Any = None) -> Statement | None:
        """The next statement to run, or ``None`` when the program has returned."""
        while True:
            try:
                step = self._program.send(value)
            except StopIteration as stop:
                self.result = stop.value
                return None
            if not isinstance(step, Notify):
                return step
            self.notifications.append(step)
            value = None
