"""The API entity code programs against: :class:`EntityContext` and :class:`DurableEntity`.

An entity is a function ``fn(ctx: EntityContext, input)`` that looks at
``ctx.operation``, or a :class:`DurableEntity` subclass whose methods are its
operations. Names and signatures follow the official ``durabletask`` SDK.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, overload

from dtfx.core.context import function_name
from dtfx.core.entities import EntityAction, EntityInstanceId, SignalEntity, StartOrchestration, entity_id_text
from dtfx.core.history import TraceContext
from dtfx.core.instance_ids import check_orchestration_id
from dtfx.core.moments import as_utc
from dtfx.core.serialization import DataConverter

S = TypeVar("S")
"""The type of an entity's state."""


@dataclass
class EntityBatchState:
    """An entity's state and pending actions while a batch of operations runs."""

    state: str | None
    actions: list[EntityAction] = field(default_factory=list)


_PLAIN_TYPES = (str, int, float, bool, dict, list)
"""The types of JSON values, which a payload holds without being converted to them."""


class EntityContext:
    """What an entity operation receives as ``ctx``."""

    def __init__(
        self,
        entity_id: EntityInstanceId,
        operation: str,
        batch: EntityBatchState,
        converter: DataConverter,
        trace_context: TraceContext | None = None,
    ) -> None:
        self._entity_id = entity_id
        self._operation = operation
        self._batch = batch
        self._converter = converter
        self._trace_context = trace_context
        """The operation's span, which the signals and starts it asks for continue."""

    @property
    def entity_id(self) -> EntityInstanceId:
        """The id of this entity."""
        return self._entity_id

    @property
    def operation(self) -> str:
        """The name of the operation being run."""
        return self._operation

    @property
    def has_state(self) -> bool:
        """True if the entity has state (even a falsy one such as 0 or "")."""
        return self._batch.state is not None

    @overload
    def get_state(self, intended_type: type[S], default: S) -> S: ...

    @overload
    def get_state(self, intended_type: type[S], default: None = None) -> S | None: ...

    @overload
    def get_state(self, intended_type: Any = None, default: Any = None) -> Any: ...

    def get_state(self, intended_type: Any = None, default: Any = None) -> Any:
        """The entity's state (rebuilt as ``intended_type`` if given), or ``default`` if it has none.

        A state that is not of a plain ``intended_type`` (``int``, ``str``, ``dict``, ...) is
        passed to it, as the official SDK does (``int("5")``), and a ``TypeError`` raised if
        that fails: a state written by code that kept another type is not taken for this one.
        """
        if self._batch.state is None:
            return default
        state = self._converter.deserialize(self._batch.state, intended_type)
        if any(intended_type is plain for plain in _PLAIN_TYPES) and not isinstance(state, intended_type):
            try:
                return intended_type(state)
            except (TypeError, ValueError):
                raise TypeError(
                    f"Could not convert state of type '{type(state).__name__}' to '{intended_type.__name__}'"
                ) from None
        return state

    def set_state(self, new_state: Any) -> None:
        """Replace the entity's state (``None`` deletes it)."""
        self._batch.state = self._converter.serialize(new_state)

    def delete_state(self) -> None:
        """Delete the entity's state."""
        self._batch.state = None

    def signal_entity(
        self,
        entity_instance_id: EntityInstanceId,
        operation: str,
        input: Any = None,
        signal_time: datetime | None = None,
    ) -> None:
        """Signal another entity (or this one) once this operation succeeds."""
        scheduled = as_utc(signal_time) if signal_time is not None else None
        self._batch.actions.append(
            SignalEntity(
                entity_id_text(entity_instance_id),
                operation,
                self._converter.serialize(input),
                scheduled,
                self._trace_context,
            )
        )

    def schedule_new_orchestration(
        self, orchestrator: Callable[..., Any] | str, input: Any = None, instance_id: str | None = None
    ) -> str:
        """Start an orchestration (by function or by registered name) once this operation
        succeeds; returns its instance id.

        An id no orchestration can have raises :class:`~dtfx.InvalidInstanceIdError`, and a name
        with a NUL character, which no task hub stores, ``ValueError`` (the operation then
        fails, and its changes are rolled back).
        """
        orchestration_name = function_name(orchestrator)
        instance_id = uuid.uuid4().hex if instance_id is None else check_orchestration_id(instance_id)
        if "\x00" in orchestration_name:
            raise ValueError(f"An orchestrator's name cannot hold a NUL character ({orchestration_name!r}).")
        self._batch.actions.append(
            StartOrchestration(
                instance_id, orchestration_name, self._converter.serialize(input), trace_context=self._trace_context
            )
        )
        return instance_id


class DurableEntity:
    """Base class for class-based entities: each public method is an operation.

    A method takes the operation's input as its one argument (or none)::

        class Counter(dtfx.DurableEntity):
            def add(self, amount: int) -> int:
                total = self.get_state(int, 0) + amount
                self.set_state(total)
                return total
    """

    entity_context: EntityContext

    def _initialize_entity_context(self, context: EntityContext) -> None:
        self.entity_context = context

    @overload
    def get_state(self, intended_type: type[S], default: S) -> S: ...

    @overload
    def get_state(self, intended_type: type[S], default: None = None) -> S | None: ...

    @overload
    def get_state(self, intended_type: Any = None, default: Any = None) -> Any: ...

    def get_state(self, intended_type: Any = None, default: Any = None) -> Any:
        """See :meth:`EntityContext.get_state`."""
        return self.entity_context.get_state(intended_type, default)

    def set_state(self, state: Any) -> None:
        """See :meth:`EntityContext.set_state`."""
        self.entity_context.set_state(state)

    def delete_state(self) -> None:
        """See :meth:`EntityContext.delete_state`."""
        self.entity_context.delete_state()

    def signal_entity(
        self,
        entity_instance_id: EntityInstanceId,
        operation: str,
        input: Any = None,
        signal_time: datetime | None = None,
    ) -> None:
        """See :meth:`EntityContext.signal_entity`."""
        self.entity_context.signal_entity(entity_instance_id, operation, input, signal_time)

    def schedule_new_orchestration(
        self, orchestrator: Callable[..., Any] | str, input: Any = None, instance_id: str | None = None
    ) -> str:
        """See :meth:`EntityContext.schedule_new_orchestration`."""
        return self.entity_context.schedule_new_orchestration(orchestrator, input, instance_id)

    def delete(self, input: Any = None) -> None:
        """The built-in ``delete`` operation: remove the entity's state."""
        self.delete_state()
