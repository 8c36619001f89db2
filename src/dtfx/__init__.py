"""dtfx: the Durable Task Framework for Python.

Durable orchestrations written as plain Python generators, replayed from an event
history so that they survive crashes, restarts and month-long waits.
"""

from dtfx.backends import Backend, MemoryBackend, open_backend
from dtfx.client import AsyncClient, Client
from dtfx.core.activity import ActivityContext
from dtfx.core.context import EntityLock, OrchestrationContext, ReplaySafeLogger
from dtfx.core.entities import CleanEntityStorageResult, EntityInstanceId, EntityMetadata, EntityQuery
from dtfx.core.entity_context import DurableEntity, EntityContext
from dtfx.core.errors import (
    BackendError,
    BackendUnavailableError,
    CommitInDoubtError,
    ConfigurationError,
    DtfxError,
    EntityOperationFailedError,
    InvalidInstanceIdError,
    LeaseLostError,
    LockingRulesViolationError,
    MessageTooLargeError,
    NonDeterminismError,
    NonRetriableError,
    NotRegisteredError,
    OrchestrationAlreadyExistsError,
    OrchestrationFailedError,
    OrchestrationNotFoundError,
    OrchestrationStateError,
    OrchestrationTimeoutError,
    SerializationError,
    TaskCancelledError,
    TaskFailedError,
    UnstorableValueError,
    VersionMismatchError,
)
from dtfx.core.history import FailureDetails, OrchestrationStatus, TraceContext
from dtfx.core.serialization import DataConverter, JsonDataConverter
from dtfx.core.state import (
    OrchestrationIdReusePolicy,
    OrchestrationQuery,
    OrchestrationState,
    Page,
    PurgeResult,
)
from dtfx.core.tasks import CompletableTask, RetryPolicy, Task, when_all, when_any
from dtfx.worker.options import (
    ConcurrencyOptions,
    VersionFailureStrategy,
    VersioningOptions,
    VersionMatchStrategy,
    WorkerOptions,
)
from dtfx.worker.registry import App
from dtfx.worker.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "ActivityContext",
    "App",
    "AsyncClient",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "CleanEntityStorageResult",
    "Client",
    "CommitInDoubtError",
    "CompletableTask",
    "ConcurrencyOptions",
    "ConfigurationError",
    "DataConverter",
    "DtfxError",
    "DurableEntity",
    "EntityContext",
    "EntityInstanceId",
    "EntityLock",
    "EntityMetadata",
    "EntityOperationFailedError",
    "EntityQuery",
    "FailureDetails",
    "InvalidInstanceIdError",
    "JsonDataConverter",
    "LeaseLostError",
    "LockingRulesViolationError",
    "MemoryBackend",
    "MessageTooLargeError",
    "NonDeterminismError",
    "NonRetriableError",
    "NotRegisteredError",
    "OrchestrationAlreadyExistsError",
    "OrchestrationContext",
    "OrchestrationFailedError",
    "OrchestrationIdReusePolicy",
    "OrchestrationNotFoundError",
    "OrchestrationQuery",
    "OrchestrationState",
    "OrchestrationStateError",
    "OrchestrationStatus",
    "OrchestrationTimeoutError",
    "Page",
    "PurgeResult",
    "ReplaySafeLogger",
    "RetryPolicy",
    "SerializationError",
    "Task",
    "TaskCancelledError",
    "TaskFailedError",
    "TraceContext",
    "UnstorableValueError",
    "VersionFailureStrategy",
    "VersionMatchStrategy",
    "VersionMismatchError",
    "VersioningOptions",
    "Worker",
    "WorkerOptions",
    "open_backend",
    "when_all",
    "when_any",
]
