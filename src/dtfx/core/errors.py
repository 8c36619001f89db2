"""The dtfx error tree.

::

    DtfxError
    ├── OrchestrationAlreadyExistsError   schedule with an id that is taken
    ├── OrchestrationNotFoundError        no instance with that id
    ├── OrchestrationStateError           the operation does not fit the instance's status
    ├── OrchestrationFailedError          raise_if_failed() on a failed instance
    ├── OrchestrationTimeoutError         a client wait ran out (also a TimeoutError)
    ├── InvalidInstanceIdError            an instance id an orchestration cannot have (also a ValueError)
    ├── TaskFailedError                   an awaited activity / sub-orchestration failed
    │   └── EntityOperationFailedError    an awaited entity operation failed
    ├── TaskCancelledError                the result of a cancelled task was read
    ├── NonDeterminismError               replay does not match the recorded history
    ├── NonRetriableError                 raise it to fail a task without retries
    ├── LockingRulesViolationError        an orchestration broke the rules of entity critical sections
    ├── NotRegisteredError                an orchestrator / activity / entity name is unknown
    ├── VersionMismatchError              the worker's versioning rules refuse an instance
    ├── SerializationError                a payload cannot be encoded or decoded
    ├── MessageTooLargeError              a sidecar message to or from an SDK worker is over the size limit
    ├── ConfigurationError                a bad backend URL, a missing extra, a bad option
    └── BackendError                      the store failed
        ├── BackendUnavailableError       the store cannot be reached, is busy or is closed: try again later
        ├── UnstorableValueError          the store cannot hold a value of the request (also a ValueError)
        └── LeaseLostError                a work item's lease was taken by another worker
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dtfx.core.history import FailureDetails, OrchestrationStatus


class DtfxError(Exception):
    """Base class of every error dtfx raises."""


class OrchestrationAlreadyExistsError(DtfxError):
    """An instance with this id exists and the reuse policy does not allow replacing it."""

    def __init__(self, instance_id: str, status: OrchestrationStatus) -> None:
        super().__init__(f"An orchestration with instance id '{instance_id}' already exists (status {status.name}).")
        self.instance_id = instance_id
        self.status = status


class OrchestrationNotFoundError(DtfxError):
    """No orchestration instance has this id."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"No orchestration instance with id '{instance_id}'.")
        self.instance_id = instance_id


class OrchestrationStateError(DtfxError):
    """The requested operation does not fit the instance's current status."""

    def __init__(self, instance_id: str, status: OrchestrationStatus, message: str) -> None:
        super().__init__(f"Instance '{instance_id}' is {status.name}: {message}")
        self.instance_id = instance_id
        self.status = status


class OrchestrationFailedError(DtfxError):
    """An orchestration failed; raised by ``OrchestrationState.raise_if_failed()``."""

    def __init__(self, message: str, failure_details: FailureDetails) -> None:
        super().__init__(message)
        self.failure_details = failure_details


class OrchestrationTimeoutError(DtfxError, TimeoutError):
    """A client wait for an instance ran out of time."""

    def __init__(self, instance_id: str, what: str, timeout: float) -> None:
        super().__init__(f"Timed out after {timeout:g}s waiting for instance '{instance_id}' to {what}.")
        self.instance_id = instance_id


class InvalidInstanceIdError(DtfxError, ValueError):
    """An orchestration cannot have this instance id: empty, too long, with control characters, or an entity's."""

    def __init__(self, instance_id: str, reason: str) -> None:
        shown = instance_id if len(instance_id) <= 80 else instance_id[:80] + "..."
        super().__init__(f"Instance id {shown!r} cannot be used: {reason}")
        self.instance_id = instance_id


class TaskFailedError(DtfxError):
    """An activity or sub-orchestration an orchestrator awaited has failed."""

    def __init__(self, message: str, details: FailureDetails) -> None:
        super().__init__(message)
        self.details = details

    @property
    def failure_details(self) -> FailureDetails:
        """Alias of :attr:`details`; an unhandled error keeps it as its inner failure."""
        return self.details


class EntityOperationFailedError(TaskFailedError):
    """An entity operation an orchestrator called has failed."""

    def __init__(self, entity_id: str, operation: str, details: FailureDetails) -> None:
        super().__init__(f"Operation '{operation}' of entity '{entity_id}' failed: {details.message}", details)
        self.entity_id = entity_id
        self.operation = operation


class LockingRulesViolationError(DtfxError):
    """An orchestration used entities in a way critical sections do not allow.

    Inside ``ctx.lock_entities(...)``: no nested critical sections, no calls before the
    lock is granted, calls only to locked entities and one at a time per entity, no
    signals to locked entities, and no sub-orchestrations.
    """


class TaskCancelledError(DtfxError):
    """The result of a cancelled task was read."""


class NonDeterminismError(DtfxError):
    """The orchestrator's code no longer matches the history it is replayed from."""


class NonRetriableError(DtfxError):
    """Raise it (or a subclass) from an activity or orchestrator to fail without retries."""

    is_non_retriable = True


class NotRegisteredError(DtfxError):
    """No orchestrator, activity or entity is registered under this name."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"No {kind} named '{name}' is registered with this worker.")
        self.kind = kind
        self.name = name


class VersionMismatchError(DtfxError):
    """The worker's versioning options do not allow it to run this instance."""


class SerializationError(DtfxError):
    """A payload could not be serialized to JSON or deserialized from it."""


class MessageTooLargeError(DtfxError):
    """A message between the sidecar and an SDK worker (a work item, or the worker's result)
    is larger than the sidecar's ``max_message_bytes``: the work it carries fails with it."""


class ConfigurationError(DtfxError):
    """Invalid configuration: an unknown backend URL, a missing optional dependency, a bad option."""


class BackendError(DtfxError):
    """The storage backend failed to carry out an operation."""


class BackendUnavailableError(BackendError):
    """The store cannot be reached, stayed busy or is closed; the same operation may succeed later."""


class CommitInDoubtError(BackendUnavailableError):
    """The connection dropped after the transaction's commit had gone out: it may or may not
    have committed. Look before doing it again (an event raised, say). A creation finds out
    by itself once the store answers, and raises it only if the store cannot tell yet."""


class UnstorableValueError(BackendError, ValueError):
    """The store cannot hold a value the operation carries (PostgreSQL text cannot contain NUL, say)."""


class LeaseLostError(BackendError):
    """The lease on a work item expired and another worker may hold it now."""
