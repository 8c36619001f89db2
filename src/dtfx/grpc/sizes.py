"""Messages larger than the sidecar takes, and the work they carry.

``SidecarOptions.max_message_bytes`` bounds what the server takes, and what it sends to
an SDK worker, whose channel refuses larger messages by default (4 MiB). gRPC itself
refuses a message over its limit before any handler sees it: a worker's result refused
so would leave its work item out with the worker, unanswered, for as long as it stays
connected; a work item the worker's channel refuses breaks its stream, and the work item
is sent again on the next one, so that the worker runs nothing else.

So the server lets gRPC read :data:`READ_BEYOND` bytes past the limit, and fails the work
that a message over it carries with a :class:`~dtfx.MessageTooLargeError`: an
orchestration whose history or response is too large fails; an activity whose input or
result is too large fails as a task, for its orchestration to handle; an entity batch too
large to send goes in parts, and an operation too large on its own fails; an entity
batch's result too large fails each of its operations, and the entity keeps the state it
had; an orchestrator's response sent in parts that add up to more than
``SidecarOptions.max_response_bytes`` (or ``max_message_bytes``, if larger) fails its
orchestration. Any other request over the limit is refused with ``RESOURCE_EXHAUSTED``,
as gRPC would. A result larger still is refused by gRPC as it arrives, and its work item
stays with the worker until it disconnects.
"""

from __future__ import annotations

from typing import Any

from dtfx.core.errors import MessageTooLargeError
from dtfx.core.history import FailureDetails, qualified_name

READ_BEYOND = 16 << 20
"""How far past ``max_message_bytes`` the server still reads a message, to say which work it
was for. A larger one is refused by gRPC as it arrives."""

_GRPC_MAX = (1 << 31) - 1
"""The largest size gRPC's channel arguments take."""

ENVELOPE = 64
"""At most the bytes a work item adds to the request it carries: its own tag and length, and
the completion token."""

_ADVICE = (
    "Keep large payloads out of the messages (the SDKs' payload store), or raise the limit on both sides:"
    " the server's max_message_bytes (dtfx serve --max-message-mib) and the SDK channel's"
    " max_receive_message_length."
)


def transport_limit(max_message_bytes: int) -> int:
    """The size up to which gRPC reads a message for the server."""
    return min(max_message_bytes + READ_BEYOND, _GRPC_MAX)


def oversized_work_item(request: Any, limit: int, *, more: int = 0) -> int | None:
    """The size of a work item carrying ``request`` (and ``more`` bytes besides, sent with it),
    if it is over ``limit``; ``None`` if it fits."""
    size: int = request.ByteSize() + more + ENVELOPE
    return size if size > limit else None


def too_large(what: str, size: int, limit: int) -> str:
    """Why ``what``, of ``size`` bytes, cannot go between the server and an SDK worker."""
    return f"{what} is {size:,} bytes, more than the {limit:,} a message between the sidecar and its workers may carry."


def too_large_in_parts(what: str, size: int, limit: int, option: str) -> FailureDetails:
    """The failure of an orchestration whose response, sent in parts, adds up to over ``limit``,
    the value of the sidecar's ``option``."""
    return FailureDetails(
        error_type=qualified_name(MessageTooLargeError),
        message=f"{what} adds up to {size:,} bytes in its parts, more than the {limit:,} the sidecar takes"
        f" (SidecarOptions.{option}). Fan out in several episodes, or keep large payloads out of the"
        " messages (the SDKs' payload store).",
    )


def too_large_failure(what: str, size: int, limit: int, *, history: bool = False) -> FailureDetails:
    """The failure of the work that ``what`` carries."""
    advice = "Continue as new to keep a history short. " + _ADVICE if history else _ADVICE
    return FailureDetails(
        error_type=qualified_name(MessageTooLargeError),
        message=f"{too_large(what, size, limit)} {advice}",
    )
