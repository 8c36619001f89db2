"""Durable tasks: what an orchestrator yields, and how they combine.

A task completes when the event that answers it is applied during replay: an
activity's ``TaskCompleted``, a ``TimerFired``, an ``EventRaised``. Composite tasks
(:func:`when_all`, :func:`when_any`) complete from their children.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from dtfx.core.errors import TaskCancelledError

T = TypeVar("T")


class Task(Generic[T]):
    """A unit of durable work an orchestrator can ``yield``."""

    def __init__(self) -> None:
        self._is_complete = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._parents: list[CompositeTask[Any]] = []

    @property
    def is_complete(self) -> bool:
        """True once the task has a result or an error."""
        return self._is_complete

    @property
    def is_failed(self) -> bool:
        """True if the task completed with an error."""
        return self._exception is not None

    def get_result(self) -> T:
        """The task's result; raises its error if it failed."""
        if not self._is_complete:
            raise ValueError("The task has not completed.")
        if self._exception is not None:
            raise self._exception
        result: T = self._result
        return result

    @property
    def result(self) -> T:
        """Alias of :meth:`get_result`."""
        return self.get_result()

    def get_exception(self) -> BaseException:
        """The error the task failed with."""
        if self._exception is None:
            raise ValueError("The task has not failed.")
        return self._exception

    def _finish(self, result: Any, error: BaseException | None) -> None:
        self._result = result
        self._exception = error
        self._is_complete = True
        parents, self._parents = self._parents, []
        for parent in parents:
            parent._on_child_completed(self)


class CompletableTask(Task[T]):
    """A task completed from outside: by an event applied during replay."""

    def __init__(self, result_type: Any = None) -> None:
        super().__init__()
        self.result_type = result_type

    def complete(self, result: T) -> None:
        """Complete the task with a result."""
        if self._is_complete:
            raise ValueError("The task has already completed.")
        self._finish(result, None)

    def fail(self, error: BaseException) -> None:
        """Complete the task with an error."""
        if self._is_complete:
            raise ValueError("The task has already completed.")
        self._finish(None, error)


class CancellableTask(CompletableTask[T]):
    """A task that may be cancelled: a timer or a wait for an external event."""

    def __init__(self, result_type: Any = None) -> None:
        super().__init__(result_type)
        self._is_cancelled = False
        self._on_cancel: Callable[[], None] | None = None

    @property
    def is_cancelled(self) -> bool:
        """True if :meth:`cancel` took effect."""
        return self._is_cancelled

    def cancel(self) -> bool:
        """Stop waiting; reading the result then raises ``TaskCancelledError``."""
        if self._is_complete:
            return False
        if self._on_cancel is not None:
            self._on_cancel()
        self._is_cancelled = True
        self._finish(None, TaskCancelledError("The task was cancelled."))
        return True


class TimerTask(CancellableTask[None]):
    """A durable timer; completes when its ``TimerFired`` event arrives."""


class CompositeTask(Task[T]):
    """A task made of other tasks."""

    def __init__(self, tasks: Sequence[Task[Any]]) -> None:
        super().__init__()
        self._tasks = list(tasks)
        not_task = next((task for task in self._tasks if not isinstance(task, Task)), None)
        if not_task is not None:
            raise TypeError(f"when_all and when_any take tasks, not {type(not_task).__name__}")
        self._completed = 0
        for task in self._tasks:
            if task.is_complete:
                self._on_child_completed(task)
            else:
                task._parents.append(self)

    def get_tasks(self) -> list[Task[Any]]:
        """The child tasks, in the order given."""
        return list(self._tasks)

    def _on_child_completed(self, task: Task[Any]) -> None:
        raise NotImplementedError


class WhenAllTask(CompositeTask[list[T]]):
    """Completes when every child has; fails with the first failure once all are done."""

    def __init__(self, tasks: Sequence[Task[T]]) -> None:
        self._first_error: BaseException | None = None
        super().__init__(tasks)
        if not self._tasks:
            self._finish([], None)

    @property
    def pending_tasks(self) -> int:
        """How many children have not completed yet."""
        return len(self._tasks) - self._completed

    def _on_child_completed(self, task: Task[Any]) -> None:
        if self._is_complete:
            return
        self._completed += 1
        if task._exception is not None and self._first_error is None:
            self._first_error = task._exception
        if self._completed == len(self._tasks):
            if self._first_error is not None:
                self._finish(None, self._first_error)
            else:
                self._finish([child._result for child in self._tasks], None)


class WhenAnyTask(CompositeTask[Task[T]]):
    """Completes with the first child to complete (its result is that child task)."""

    def __init__(self, tasks: Sequence[Task[T]]) -> None:
        super().__init__(tasks)
        if not self._tasks:  # it would never complete
            raise ValueError("when_any needs at least one task")

    def _on_child_completed(self, task: Task[Any]) -> None:
        if not self._is_complete:
            self._finish(task, None)
            for child in self._tasks:  # the others' news is no longer wanted: a loop over what is
                if child is not task and self in child._parents:  # left would keep n² of them
                    child._parents.remove(self)


def when_all(tasks: Sequence[Task[T]]) -> WhenAllTask[T]:
    """A task that completes with the list of all results, in order."""
    return WhenAllTask(tasks)


def when_any(tasks: Sequence[Task[T]]) -> WhenAnyTask[T]:
    """A task that completes with whichever of ``tasks`` completes first."""
    return WhenAnyTask(tasks)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How failed activities and sub-orchestrations are retried; the waits are durable timers."""

    first_retry_interval: timedelta
    """The wait before the second attempt."""
    max_number_of_attempts: int
    """Attempts in all, the first included."""
    backoff_coefficient: float | None = 1.0
    """Each wait is the previous one times this."""
    max_retry_interval: timedelta | None = None
    """No wait is longer than this."""
    retry_timeout: timedelta | None = None
    """No retry is scheduled for a failure that comes this long or longer after the first
    attempt started (one scheduled before may start later, after its wait), as in the
    Durable Task Framework and the official SDKs."""

    def __post_init__(self) -> None:
        if self.first_retry_interval < timedelta(0):
            raise ValueError("first_retry_interval must be >= 0")
        if self.max_number_of_attempts < 1:
            raise ValueError("max_number_of_attempts must be >= 1")
        if self.backoff_coefficient is not None and not 1 <= self.backoff_coefficient < math.inf:
            raise ValueError("backoff_coefficient must be >= 1 and finite")
        if self.max_retry_interval is not None and self.max_retry_interval < timedelta(0):
            raise ValueError("max_retry_interval must be >= 0")
        if self.retry_timeout is not None and self.retry_timeout < timedelta(0):
            raise ValueError("retry_timeout must be >= 0")

    def next_delay(self, attempts_made: int, elapsed: timedelta) -> timedelta | None:
        """The wait before the next attempt, or ``None`` when no attempt is left.

        ``attempts_made`` counts the attempts so far; ``elapsed`` is the orchestration
        time since the first one started. A wait that grows past what a ``timedelta`` holds
        (about 2.7 million years: no ``max_retry_interval`` to cap it) leaves no attempt.
        """
        if attempts_made >= self.max_number_of_attempts:
            return None
        if self.retry_timeout is not None and elapsed >= self.retry_timeout:
            return None
        first = self.first_retry_interval.total_seconds()
        try:
            delay = first * (self.backoff_coefficient or 1.0) ** (attempts_made - 1) if first else 0.0
        except OverflowError:  # the coefficient's power is past a float's range
            delay = math.inf
        if self.max_retry_interval is not None:
            delay = min(delay, self.max_retry_interval.total_seconds())
        if delay >= timedelta.max.total_seconds():
            return None
        return timedelta(seconds=delay)


class RetryableTask(CompletableTask[T]):
    """The task a caller sees for a call with a retry policy; attempts run underneath it."""

    def __init__(self, policy: RetryPolicy, result_type: Any, started: datetime) -> None:
        super().__init__(result_type)
        self.policy = policy
        self.attempts = 1
        self.started = started
