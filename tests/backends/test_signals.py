"""Wake-up signals: a notification is kept until the next wait, with the hints it carried."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from dtfx.backends import signals
from dtfx.backends.signals import KeyedSignal


async def test_a_waiter_is_told_what_changed_unless_a_notification_did_not_say() -> None:
    signal = KeyedSignal()
    with signal.subscribe("a") as waiter, signal.subscribe("b") as other:
        signal.notify("a", "RUNNING")
        signal.notify("a", "COMPLETED")
        assert await waiter.wait(1) is True
        assert waiter.take_hints() == ["RUNNING", "COMPLETED"]
        assert waiter.take_hints() == []  # taken

        signal.notify("a", "RUNNING")
        signal.notify("a")  # someone else's change: what it is, nobody knows
        signal.notify("a", "COMPLETED")
        assert await waiter.wait(1) is True
        assert waiter.take_hints() is None

        assert await other.wait(0) is False  # another key's waiter heard nothing
        assert other.take_hints() == []


async def test_a_waiter_is_not_woken_by_the_hints_it_ignores() -> None:
    signal = KeyedSignal()
    with signal.subscribe("a", ignores=lambda hint: hint == "RUNNING") as waiter:
        signal.notify("a", "RUNNING")
        assert await waiter.wait(0) is False  # nothing kept for the next wait either
        assert waiter.take_hints() == []
        assert signal.recent("a") == "RUNNING"  # the key's memory does not depend on its waiters

        waiting = asyncio.create_task(waiter.wait(5))
        await asyncio.sleep(0.01)
        signal.notify("a", "RUNNING")
        await asyncio.sleep(0.01)
        assert not waiting.done()
        signal.notify("a", "COMPLETED")
        assert await waiting is True
        assert waiter.take_hints() == ["COMPLETED"]

        signal.notify("a")  # what changed is unknown: it may be what the waiter waits for
        assert await waiter.wait(0) is True
        assert waiter.take_hints() is None


def test_a_keys_last_hint_is_remembered_for_a_moment_whether_anyone_waits_or_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(signals, "time", SimpleNamespace(monotonic=lambda: now[0]))
    signal = KeyedSignal()
    signal.notify("a", "PENDING")
    signal.notify("a", "RUNNING")
    signal.notify("b", "RUNNING")
    assert (signal.recent("a"), signal.recent("b"), signal.recent("c")) == ("RUNNING", "RUNNING", None)
    signal.notify("b")  # someone else's change: what it left is unknown
    assert signal.recent("b") is None

    now[0] += signals.RECENT_HINT_SECONDS
    assert signal.recent("a") is None  # aged
    signal.notify("c", "COMPLETED")  # and forgotten when the next notification comes
    assert list(signal._recent) == ["c"]
    signal.notify_all()  # a lost connection: nothing is known any more
    assert signal.recent("c") is None
