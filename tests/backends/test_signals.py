"""Wake-up signals: a notification is kept until the next wait, with the hints it carried."""

from __future__ import annotations

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
