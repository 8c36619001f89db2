"""Registries of orchestrators, activities and entities, and the decorator-based :class:`App`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol, TypeVar, overload

from dtfx.core import arguments
from dtfx.core.context import function_name

F = TypeVar("F", bound=Callable[..., Any])


class _Decorator(Protocol):
    def __call__(self, fn: F, /) -> F: ...


def _name_function(fn: Callable[..., Any], name: str | None, kind: str) -> str:
    registered = _checked_name(fn, name, kind)
    if name is not None:
        with suppress(AttributeError, TypeError):  # lets ctx.call_activity(fn) find the name
            fn.__dtfx_name__ = name  # type: ignore[attr-defined]
    return registered


def _checked_name(fn: Callable[..., Any], name: str | None, kind: str) -> str:
    """The name ``fn`` is registered under (``name``, or its own), once both are found fit."""
    if not callable(fn):
        raise TypeError(f"The {kind} to register must be callable, not {type(fn).__name__}")
    if name is not None and not arguments.text("name", name).strip():
        raise ValueError(f"The name of the {kind} is empty; leave it out to register it under its function's name")
    registered = name or function_name(fn)
    if "\x00" in registered:
        raise ValueError(f"The name of the {kind} has a NUL character, which no task hub stores: {registered!r}")
    return registered


def _is_async(fn: Any) -> bool:
    """Whether calling ``fn`` makes a coroutine or an async generator (an object's ``__call__`` too)."""
    calls = (fn,) if inspect.isroutine(fn) or isinstance(fn, type) else (fn, type(fn).__call__)
    return any(inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call) for call in calls)


class Registry:
    """Named orchestrators, activities and entities."""

    def __init__(self) -> None:
        self.orchestrators: dict[str, Callable[..., Any]] = {}
        self.activities: dict[str, Callable[..., Any]] = {}
        self.entities: dict[str, Any] = {}

    def add_orchestrator(self, fn: Callable[..., Any], name: str | None = None) -> str:
        """Register an orchestrator ``fn(ctx, input)``; returns the name it is registered under."""
        if _is_async(fn):
            raise TypeError(
                f"The orchestrator {_checked_name(fn, name, 'orchestrator')!r} is an async function: orchestrators"
                " are generator functions, which yield the tasks they wait for"
                " (`result = yield ctx.call_activity(...)`)."
            )
        registered = _name_function(fn, name, "orchestrator")
        self._check_free(self.orchestrators, "orchestrator", registered, fn)
        self.orchestrators[registered] = fn
        return registered

    def add_activity(self, fn: Callable[..., Any], name: str | None = None) -> str:
        """Register an activity ``fn(ctx, input)`` (sync or async); returns its name."""
        registered = _name_function(fn, name, "activity")
        self._check_free(self.activities, "activity", registered, fn)
        self.activities[registered] = fn
        return registered

    def add_entity(self, entity: Callable[..., Any] | type[Any], name: str | None = None) -> str:
        """Register an entity: a function ``fn(ctx, input)`` or a :class:`~dtfx.DurableEntity`
        subclass. Entity names are case-insensitive; returns the (lower-case) name."""
        registered = _checked_name(entity, name, "entity").lower()
        if "@" in registered:
            raise ValueError(f"An entity name cannot contain '@': {registered!r}")
        self._check_free(self.entities, "entity", registered, entity)
        self.entities[registered] = entity
        return registered

    def update(self, other: Registry) -> None:
        """Add every registration of ``other``."""
        for name, fn in other.orchestrators.items():
            self.add_orchestrator(fn, name)
        for name, fn in other.activities.items():
            self.add_activity(fn, name)
        for name, entity in other.entities.items():
            self.add_entity(entity, name)

    @staticmethod
    def _check_free(table: dict[str, Any], kind: str, name: str, fn: Any) -> None:
        existing = table.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"An {kind} named '{name}' is already registered.")


class App(Registry):
    """Register orchestrators, activities and entities with decorators, then hand the app to a worker.

    Example::

        app = dtfx.App()

        @app.activity
        def say_hello(ctx, city: str) -> str:
            return f"Hello, {city}!"

        @app.orchestrator(name="hello_cities")
        def hello(ctx, _):
            greetings = []
            for city in ("Tokyo", "London"):
                greetings.append((yield ctx.call_activity(say_hello, input=city)))
            return greetings
    """

    @staticmethod
    def _decorate(add: Callable[[Any, str | None], str], fn: Callable[..., Any] | None, name: str | None) -> Any:
        def register(target: Callable[..., Any]) -> Callable[..., Any]:
            add(target, name)
            return target

        return register(fn) if fn is not None else register

    @overload
    def orchestrator(self, fn: F, /) -> F: ...

    @overload
    def orchestrator(self, /, *, name: str | None = None) -> _Decorator: ...

    def orchestrator(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:
        """Register an orchestrator (usable bare or with ``name=``)."""
        return self._decorate(self.add_orchestrator, fn, name)

    @overload
    def entity(self, fn: F, /) -> F: ...

    @overload
    def entity(self, /, *, name: str | None = None) -> _Decorator: ...

    def entity(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:
        """Register an entity function or :class:`~dtfx.DurableEntity` class (bare or with ``name=``)."""
        return self._decorate(self.add_entity, fn, name)

    @overload
    def activity(self, fn: F, /) -> F: ...

    @overload
    def activity(self, /, *, name: str | None = None) -> _Decorator: ...

    def activity(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:
        """Register an activity (usable bare or with ``name=``)."""
        return self._decorate(self.add_activity, fn, name)
