"""Turning what goes wrong in a request into a gRPC status with a clear message.

Handlers raise :class:`RpcStatusError` for a status of their own choosing, or let
dtfx errors through; :func:`status_of` maps both. Anything else (a bug, or a store
failure that would happen again) is logged with its traceback and answered
``INTERNAL``, and the server keeps running.

Only a store that cannot be reached, stays busy or is closed
(:class:`~dtfx.BackendUnavailableError`) is answered ``UNAVAILABLE``: SDKs retry that
status, which helps only when the same request can succeed later. A request whose commit
is in doubt (:class:`~dtfx.CommitInDoubtError`) may have been carried out: it is answered
``UNKNOWN``, which no retry policy repeats (an event raised twice, say). A value the store
cannot hold (:class:`~dtfx.UnstorableValueError`) is the request's fault:
``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from dtfx.core.errors import (
    BackendUnavailableError,
    CommitInDoubtError,
    ConfigurationError,
    InvalidInstanceIdError,
    OrchestrationAlreadyExistsError,
    OrchestrationNotFoundError,
    OrchestrationStateError,
    OrchestrationTimeoutError,
    SerializationError,
    UnstorableValueError,
)
from dtfx.grpc.convert import InvalidMessageError
from dtfx.grpc.sizes import too_large

logger = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")

Context = grpc.aio.ServicerContext[Any, Any]
"""The context every handler receives."""


class RpcStatusError(Exception):
    """Answer the current request with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def invalid_argument(details: str) -> RpcStatusError:
    """The request is malformed."""
    return RpcStatusError(grpc.StatusCode.INVALID_ARGUMENT, details)


def not_found(details: str) -> RpcStatusError:
    """What the request names does not exist."""
    return RpcStatusError(grpc.StatusCode.NOT_FOUND, details)


def failed_precondition(details: str) -> RpcStatusError:
    """What the request names is not in a state that allows it."""
    return RpcStatusError(grpc.StatusCode.FAILED_PRECONDITION, details)


def unimplemented(details: str) -> RpcStatusError:
    """This server does not offer the operation."""
    return RpcStatusError(grpc.StatusCode.UNIMPLEMENTED, details)


_STATUS_OF_ERROR: list[tuple[type[Exception], grpc.StatusCode]] = [
    (OrchestrationNotFoundError, grpc.StatusCode.NOT_FOUND),
    (OrchestrationAlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (OrchestrationStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (OrchestrationTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InvalidMessageError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidInstanceIdError, grpc.StatusCode.INVALID_ARGUMENT),
    (SerializationError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigurationError, grpc.StatusCode.INVALID_ARGUMENT),  # a bad continuation token, say
    (CommitInDoubtError, grpc.StatusCode.UNKNOWN),  # done or not: look before doing it again
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),  # worth a retry
    (UnstorableValueError, grpc.StatusCode.INVALID_ARGUMENT),
    # Any other BackendError would fail again: it is answered INTERNAL and logged, as a bug is.
]


def status_of(error: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status and message that answer a request that raised ``error``."""
    if isinstance(error, RpcStatusError):
        return error.code, error.details
    for error_type, code in _STATUS_OF_ERROR:
        if isinstance(error, error_type):
            return code, str(error)
    logger.error("%s failed", method, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"{method} failed: {type(error).__name__}: {error}"


Handler = Callable[[Any, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]]
StreamHandler = Callable[[Any, Request, grpc.aio.ServicerContext[Request, Response]], AsyncGenerator[Response, None]]


def unary(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Answer errors a unary handler raises with their status (see :func:`status_of`), and
    refuse a request over the size limit (see :mod:`dtfx.grpc.sizes`) before it runs."""
    return _answering(handler, refuse_oversized=True)


def unary_any_size(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """:func:`unary`, for a handler that deals with a request over the size limit itself."""
    return _answering(handler, refuse_oversized=False)


def _answering(handler: Handler[Request, Response], *, refuse_oversized: bool) -> Handler[Request, Response]:
    @functools.wraps(handler)
    async def answer(self: Any, request: Request, context: grpc.aio.ServicerContext[Request, Response]) -> Response:
        try:
            if refuse_oversized:
                refuse_if_oversized(request, self._options.max_message_bytes)
            return await handler(self, request, context)
        except Exception as error:
            code, details = status_of(error, handler.__name__)
        await context.abort(code, details)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return answer


def refuse_if_oversized(request: Any, limit: int) -> None:
    """Raise ``RESOURCE_EXHAUSTED`` if ``request`` (a message) is larger than ``limit`` bytes."""
    size: int = request.ByteSize()
    if size > limit:
        raise RpcStatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large("The request", size, limit))


def streaming(handler: StreamHandler[Request, Response]) -> StreamHandler[Request, Response]:
    """Answer errors a server-streaming handler raises with their status (see :func:`status_of`),
    and refuse a request over the size limit."""

    @functools.wraps(handler)
    async def answer(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> AsyncGenerator[Response, None]:
        try:
            refuse_if_oversized(request, self._options.max_message_bytes)
        except RpcStatusError as error:
            await context.abort(error.code, error.details)
        stream = handler(self, request, context)
        try:
            async for response in stream:
                yield response
            return
        except Exception as error:
            code, details = status_of(error, handler.__name__)
        finally:
            # However the call ends (a cancelled call may leave this generator at a yield),
            # the handler's own clean-up runs now, not when the garbage collector gets to it.
            await stream.aclose()
        await context.abort(code, details)

    return answer
