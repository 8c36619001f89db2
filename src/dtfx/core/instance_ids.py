"""Which instance ids an orchestration or an entity can have: one rule for every way an instance is started.

Clients refuse a bad id at once (:class:`~dtfx.InvalidInstanceIdError`); the engine fails
a sub-orchestration started under one instead of letting the id reach the store, where
it would fail the commit of a whole batch (PostgreSQL text cannot hold NUL, say).
"""

from __future__ import annotations

from dtfx.core.arguments import text
from dtfx.core.errors import InvalidInstanceIdError

MAX_INSTANCE_ID_LENGTH = 1024
"""The longest instance id, in characters. (PostgreSQL's index of ids holds at most 2,704 bytes
of one: it refuses a longer one, of about 900 characters of three bytes each in UTF-8, with
:class:`~dtfx.UnstorableValueError`.)"""


def is_entity_id(instance_id: str) -> bool:
    """Entity instances have ids of the form ``@name@key``."""
    return instance_id.startswith("@") and instance_id.find("@", 1) > 0


def orchestration_id_error(instance_id: str) -> InvalidInstanceIdError | None:
    """Why an orchestration cannot have ``instance_id``, or ``None`` if it can."""
    error = instance_id_error(instance_id)
    if error is None and is_entity_id(instance_id):
        return InvalidInstanceIdError(
            instance_id, "ids of the form '@name@key' belong to entities (use signal_entity to reach one)."
        )
    return error


def instance_id_error(instance_id: str) -> InvalidInstanceIdError | None:
    """Why no instance, orchestration or entity, can have ``instance_id``, or ``None``."""
    if not instance_id:
        return InvalidInstanceIdError(instance_id, "it is empty.")
    if len(instance_id) > MAX_INSTANCE_ID_LENGTH:
        return InvalidInstanceIdError(
            instance_id, f"it has {len(instance_id)} characters; instance ids have at most {MAX_INSTANCE_ID_LENGTH}."
        )
    if not instance_id.isascii():
        try:
            instance_id.encode("utf-8")
        except UnicodeEncodeError as error:
            return InvalidInstanceIdError(
                instance_id,
                f"it contains the lone surrogate {instance_id[error.start]!r} at position {error.start},"
                " which no task hub stores.",
            )
    control = next((position for position, char in enumerate(instance_id) if char < " "), None)
    if control is not None:
        return InvalidInstanceIdError(
            instance_id, f"it contains the control character {instance_id[control]!r} at position {control}."
        )
    return None


def check_orchestration_id(instance_id: str) -> str:
    """``instance_id``, if an orchestration can have it; raises :class:`~dtfx.InvalidInstanceIdError` if not
    (``TypeError`` if it is no ``str``)."""
    error = orchestration_id_error(text("instance_id", instance_id))
    if error is not None:
        raise error
    return instance_id
