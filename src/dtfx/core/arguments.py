"""Checks of the types of the arguments that become stored fields (names, ids, versions, tags):
a wrong one is refused at the call, with a ``TypeError`` that names it, before it is written
where every worker would fail to read it back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def text(name: str, value: Any) -> str:
    """``value``, if it is a ``str``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value


def optional_text(name: str, value: Any) -> str | None:
    """``value``, if it is a ``str`` or ``None``."""
    return None if value is None else text(name, value)


def flag(name: str, value: Any) -> bool:
    """``value``, if it is a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def tags(value: Any) -> dict[str, str] | None:
    """A copy of ``value``, if it maps texts to texts (or is ``None``)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"tags must be a dict of str to str, not {type(value).__name__}")
    for key, tag in value.items():
        if not isinstance(key, str) or not isinstance(tag, str):
            raise TypeError(f"tags must be a dict of str to str: {key!r}: {tag!r} is not")
    return dict(value)
