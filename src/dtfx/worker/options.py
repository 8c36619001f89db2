"""Worker configuration: concurrency, versioning and dispatcher tuning."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from datetime import timedelta

from dtfx.core import arguments


def _default_concurrency() -> int:
    return 100 * (os.cpu_count() or 1)


@dataclass(kw_only=True)
class ConcurrencyOptions:
    """How much work a worker takes on at once (names as in the official SDK)."""

    maximum_concurrent_orchestration_work_items: int = field(default_factory=_default_concurrency)
    """Orchestration episodes in flight at once."""
    maximum_concurrent_activity_work_items: int = field(default_factory=_default_concurrency)
    """Activities running at once."""
    maximum_concurrent_entity_work_items: int = field(default_factory=_default_concurrency)
    """Entity batches in flight at once."""
    maximum_thread_pool_workers: int | None = None
    """Threads for sync activities (``None``: Python's default for a thread pool)."""
    orchestration_dispatcher_count: int = 1
    """Fetch loops for orchestration work items."""
    activity_dispatcher_count: int = 1
    """Fetch loops for activity work items."""

    def __post_init__(self) -> None:
        for name in (
            "maximum_concurrent_orchestration_work_items",
            "maximum_concurrent_activity_work_items",
            "maximum_concurrent_entity_work_items",
            "orchestration_dispatcher_count",
            "activity_dispatcher_count",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.maximum_thread_pool_workers is not None and self.maximum_thread_pool_workers < 1:
            raise ValueError("maximum_thread_pool_workers must be at least 1 (or None, for Python's default)")


class VersionMatchStrategy(enum.Enum):
    """Which orchestration versions a worker runs."""

    NONE = 1
    """Any version."""
    STRICT = 2
    """Only its own version."""
    CURRENT_OR_OLDER = 3
    """Its own version and older ones."""


class VersionFailureStrategy(enum.Enum):
    """What a worker does with an orchestration whose version it does not run."""

    REJECT = 1
    """Leave it for another worker (the work item is abandoned)."""
    FAIL = 2
    """Fail the instance with a ``VersionMismatch`` error."""


@dataclass(kw_only=True)
class VersioningOptions:
    """Orchestration versioning, as in the official SDK and DurableTask.Core."""

    version: str | None = None
    """The version of the orchestrations this worker runs."""
    default_version: str | None = None
    """The version sub-orchestrations get when the call does not give one."""
    match_strategy: VersionMatchStrategy = VersionMatchStrategy.NONE
    """Which orchestration versions this worker runs."""
    failure_strategy: VersionFailureStrategy = VersionFailureStrategy.REJECT
    """What happens to the others."""

    def __post_init__(self) -> None:
        arguments.optional_text("version", self.version)
        arguments.optional_text("default_version", self.default_version)
        if not isinstance(self.match_strategy, VersionMatchStrategy):
            raise TypeError(f"match_strategy must be a VersionMatchStrategy, not {type(self.match_strategy).__name__}")
        if not isinstance(self.failure_strategy, VersionFailureStrategy):
            raise TypeError(
                f"failure_strategy must be a VersionFailureStrategy, not {type(self.failure_strategy).__name__}"
            )


@dataclass(kw_only=True)
class WorkerOptions:
    """Dispatcher tuning; the defaults suit most uses."""

    lease_duration: timedelta = timedelta(seconds=60)
    """How long a work item stays locked; long activities have their lease renewed."""
    fetch_batch_size: int = 100
    """Most work items locked in one backend call."""
    cached_instances: int = 10_000
    """Live orchestrations kept in memory between episodes, so they need no replay."""
    eager_activities: bool = True
    """Run an activity at once in this worker when an orchestration waits for just that
    one (see :mod:`dtfx.worker.eager`): a step of a sequence then costs one transaction."""
    eager_activity_window: timedelta = timedelta(seconds=1)
    """How long an eager activity may hold its orchestration's lease (at most a third of
    :attr:`lease_duration`): one still running then goes on as ordinary work, and
    messages for the orchestration (a termination, an event) wait at most this long."""
    shutdown_grace_period: timedelta = timedelta(seconds=30)
    """How long :meth:`Worker.stop` lets in-flight work finish."""
    registered_only: bool = False
    """Lock only the orchestrations, activities and entities registered with this worker,
    and leave the hub's other work to other workers (official SDK workers connected to a
    :class:`~dtfx.grpc.SidecarServer` on the same hub, say). By default a worker takes
    all work, and fails what it has no registration for."""
    reject_retry_delay: timedelta = timedelta(seconds=1)
    """How long a rejected (version mismatch) work item waits before it is offered again."""
    backoff_initial: timedelta = timedelta(milliseconds=100)
    """First wait after a failed fetch or a failed work item."""
    backoff_max: timedelta = timedelta(seconds=10)
    """Longest such wait; the wait doubles on each further failure."""
    tune_gc: bool = True
    """While the worker runs, let Python's garbage collector look at young objects every
    10,000 allocations instead of every 700, unless the process has set thresholds of its
    own (see :mod:`dtfx._collector`): with orchestrations in flight the default pace cost
    14% of the time with 1,000 in flight and 29% with 20,000."""

    def __post_init__(self) -> None:
        zero = timedelta(0)
        positive = {"lease_duration": self.lease_duration, "backoff_initial": self.backoff_initial}
        for name, value in positive.items():
            if value <= zero:
                raise ValueError(f"{name} must be longer than zero (got {value})")
        not_negative = {
            "eager_activity_window": self.eager_activity_window,
            "shutdown_grace_period": self.shutdown_grace_period,
            "reject_retry_delay": self.reject_retry_delay,
        }
        for name, value in not_negative.items():
            if value < zero:
                raise ValueError(f"{name} must not be negative (got {value})")
        if self.backoff_max < self.backoff_initial:
            raise ValueError(f"backoff_max ({self.backoff_max}) must not be shorter than backoff_initial")
        if self.fetch_batch_size < 1:
            raise ValueError(f"fetch_batch_size must be at least 1 (got {self.fetch_batch_size})")
        if self.cached_instances < 0:
            raise ValueError(f"cached_instances must not be negative (got {self.cached_instances})")
