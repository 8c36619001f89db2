"""A bounded memory of the latest keys: what a worker notes per work item or instance
(a failing item's back-off, an instance left to other workers), without growing for ever."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember_latest(entries: dict[K, V], key: K, value: V, limit: int) -> None:
    """Put ``key`` last in ``entries`` with ``value``, forgetting the oldest beyond ``limit``."""
    entries.pop(key, None)
    entries[key] = value
    while len(entries) > limit:
        del entries[next(iter(entries))]
