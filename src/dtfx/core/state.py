"""What the outside world sees of an orchestration instance, and how to query it."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from dtfx.core.errors import OrchestrationFailedError
from dtfx.core.history import FailureDetails, OrchestrationStatus
from dtfx.core.moments import fields_as_utc
from dtfx.core.serialization import DEFAULT_CONVERTER, DataConverter

T = TypeVar("T")


@dataclass
class OrchestrationState:
    """A snapshot of one orchestration instance (the official SDK's shape, plus a few fields)."""

    instance_id: str
    name: str
    runtime_status: OrchestrationStatus
    created_at: datetime
    last_updated_at: datetime
    serialized_input: str | None = None
    serialized_output: str | None = None
    serialized_custom_status: str | None = None
    failure_details: FailureDetails | None = None
    version: str | None = None
    execution_id: str | None = None
    parent_instance_id: str | None = None
    scheduled_start_at: datetime | None = None
    completed_at: datetime | None = None
    tags: dict[str, str] | None = None
    converter: DataConverter = field(default=DEFAULT_CONVERTER, compare=False, repr=False)

    def get_input(self, expected_type: Any = None) -> Any:
        """The input, rebuilt as ``expected_type`` when given."""
        return self.converter.deserialize(self.serialized_input, expected_type)

    def get_output(self, expected_type: Any = None) -> Any:
        """The output, rebuilt as ``expected_type`` when given."""
        return self.converter.deserialize(self.serialized_output, expected_type)

    def get_custom_status(self, expected_type: Any = None) -> Any:
        """The custom status, rebuilt as ``expected_type`` when given."""
        return self.converter.deserialize(self.serialized_custom_status, expected_type)

    def raise_if_failed(self) -> None:
        """Raise :class:`~dtfx.OrchestrationFailedError` if the instance failed."""
        if self.failure_details is not None:
            raise OrchestrationFailedError(
                f"Orchestration '{self.instance_id}' failed: {self.failure_details.message}",
                self.failure_details,
            )


@dataclass(frozen=True, kw_only=True)
class OrchestrationQuery:
    """Which instances a query returns; every filter given must match."""

    runtime_status: Collection[OrchestrationStatus] | None = None
    """Only instances in one of these statuses."""
    created_time_from: datetime | None = None
    """Only instances created at or after this moment."""
    created_time_to: datetime | None = None
    """Only instances created at or before this moment."""
    instance_id_prefix: str | None = None
    """Only instances whose id starts with this."""
    completed_time_from: datetime | None = None
    """Only instances that ended at or after this moment."""
    completed_time_to: datetime | None = None
    """Only instances that ended at or before this moment."""
    last_updated_time_from: datetime | None = None
    """Only instances last updated at or after this moment."""
    last_updated_time_to: datetime | None = None
    """Only instances last updated at or before this moment."""
    max_instance_count: int = 100
    """The page size."""
    fetch_inputs_and_outputs: bool = False
    """Include inputs, outputs and custom status."""

    def __post_init__(self) -> None:
        if self.max_instance_count < 1:
            raise ValueError(f"max_instance_count must be at least 1 (got {self.max_instance_count})")
        fields_as_utc(self)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a paged result; pass ``continuation_token`` back for the next one."""

    items: list[T]
    continuation_token: str | None


@dataclass(frozen=True, kw_only=True)
class PurgeFilter:
    """Which terminal instances a purge removes."""

    created_time_from: datetime | None = None
    created_time_to: datetime | None = None
    runtime_status: Collection[OrchestrationStatus] | None = None

    def __post_init__(self) -> None:
        fields_as_utc(self)


@dataclass(frozen=True)
class PurgeResult:
    """How many instances a purge removed."""

    deleted_instance_count: int
    is_complete: bool | None = True


@dataclass(frozen=True)
class OrchestrationIdReusePolicy:
    """Which statuses of an existing instance a new one with the same id may replace."""

    replaceable_statuses: frozenset[OrchestrationStatus]

    @classmethod
    def of(cls, *statuses: OrchestrationStatus) -> OrchestrationIdReusePolicy:
        """A policy that replaces instances in any of ``statuses``."""
        return cls(frozenset(statuses))


TERMINAL_REUSE_POLICY = OrchestrationIdReusePolicy.of(
    OrchestrationStatus.COMPLETED,
    OrchestrationStatus.FAILED,
    OrchestrationStatus.TERMINATED,
    OrchestrationStatus.CANCELED,
)
"""Replace an instance that has ended; refuse one that is still pending or running."""
