"""Wake-up signals that cross threads and event loops.

A dispatcher waits for "work may be available"; a client waits for "this instance
changed". The notifying side may run in another thread or another event loop (a
sync ``Client`` runs its own loop; a PostgreSQL listener runs in its own task), so a
waiter's future is always resolved through its own loop's ``call_soon_threadsafe``.

A :class:`Waiter` is level-triggered: a notification that arrives while nobody waits
is kept until the next :meth:`Waiter.wait`, so "check, then wait" never misses one. A
notification may carry a *hint* of what changed (an instance's new status), which
spares a waiter that waits for something else a read, and a waiter that says which hints
it ignores is not even woken by them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from contextlib import suppress


class Waiter:
    """One subscriber's wake-up flag; ``ignores`` tells the hints of changes it does not wait for."""

    def __init__(
        self,
        on_close: Signal | KeyedSignal | None = None,
        key: Hashable = None,
        ignores: Callable[[object], bool] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._flag = False
        self._hints: list[object] | None = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._future: asyncio.Future[None] | None = None
        self._owner = on_close
        self._key = key
        self._ignores = ignores

    def set(self, hint: object = None) -> None:
        """Wake the waiter (from any thread), with a ``hint`` of what changed (``None``: unknown),
        unless it ignores that hint: then nothing happens (a wake-up of its loop saved)."""
        if hint is not None and self._ignores is not None and self._ignores(hint):
            return
        with self._lock:
            self._flag = True
            if hint is None:
                self._hints = None
            elif self._hints is not None:
                self._hints.append(hint)
            loop, future = self._loop, self._future
        if loop is not None and future is not None:
            with suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(_resolve, future)

    def clear(self) -> None:
        """Forget a pending notification."""
        with self._lock:
            self._flag = False

    def take_hints(self) -> list[object] | None:
        """The hints of the notifications since the last call (``None``: one of them had none)."""
        with self._lock:
            hints, self._hints = self._hints, []
        return hints

    async def wait(self, timeout: float | None) -> bool:
        """Wait until notified or ``timeout`` seconds pass; True if notified. Clears the flag."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._flag:
                self._flag = False
                return True
            if timeout is not None and timeout <= 0:
                return False
            future: asyncio.Future[None] = loop.create_future()
            self._loop, self._future = loop, future
        # The timeout resolves the future too (asyncio.wait_for would add a future of its own
        # and a loop iteration to every wake-up); the flag tells the two apart.
        timer = None if timeout is None else loop.call_later(timeout, _resolve, future)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._loop = self._future = None
                notified = self._flag
                self._flag = False
        return notified

    def close(self) -> None:
        """Stop receiving notifications."""
        if isinstance(self._owner, KeyedSignal):
            self._owner._remove(self._key, self)
        elif self._owner is not None:
            self._owner._remove(self)

    def __enter__(self) -> Waiter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Signal:
    """Wakes every subscribed :class:`Waiter`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[Waiter] = set()

    def subscribe(self) -> Waiter:
        """A new waiter; close it when done."""
        waiter = Waiter(self)
        with self._lock:
            self._waiters.add(waiter)
        return waiter

    def notify(self) -> None:
        """Wake all waiters (from any thread)."""
        with self._lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.set()

    def _remove(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.discard(waiter)


RECENT_HINT_SECONDS = 0.1
"""How long :meth:`KeyedSignal.recent` remembers a key's last hint."""


class KeyedSignal:
    """Wakes the waiters subscribed to one key (an instance id).

    It also remembers each key's last hint for :data:`RECENT_HINT_SECONDS`, waited for
    or not, so that a waiter that subscribes just after a change (a client that waits
    for the instance it has just created) knows it without a read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[Hashable, set[Waiter]] = {}
        self._recent: dict[Hashable, tuple[float, object]] = {}
        """Each key's last hint and when it came, oldest first."""

    def subscribe(self, key: Hashable, ignores: Callable[[object], bool] | None = None) -> Waiter:
        """A new waiter for ``key`` (see :class:`Waiter` for ``ignores``); close it when done."""
        waiter = Waiter(self, key, ignores)
        with self._lock:
            self._waiters.setdefault(key, set()).add(waiter)
        return waiter

    def notify(self, key: Hashable, hint: object = None) -> None:
        """Wake the waiters of ``key`` (from any thread), with a ``hint`` of what changed."""
        now = time.monotonic()
        with self._lock:
            waiters = list(self._waiters.get(key, ()))
            self._recent.pop(key, None)
            if hint is not None:
                self._recent[key] = (now, hint)
            while self._recent:  # forget the hints that have aged, oldest first
                oldest = next(iter(self._recent))
                if now - self._recent[oldest][0] < RECENT_HINT_SECONDS:
                    break
                del self._recent[oldest]
        for waiter in waiters:
            waiter.set(hint)

    def recent(self, key: Hashable) -> object | None:
        """The hint of ``key``'s last notification if it came in the last
        :data:`RECENT_HINT_SECONDS` (``None``: none came, or it had no hint)."""
        with self._lock:
            noted = self._recent.get(key)
        if noted is None or time.monotonic() - noted[0] >= RECENT_HINT_SECONDS:
            return None
        return noted[1]

    def subscribed_keys(self) -> list[Hashable]:
        """The keys that have waiters now."""
        with self._lock:
            return list(self._waiters)

    def notify_all(self) -> None:
        """Wake every waiter of every key."""
        with self._lock:
            waiters = [waiter for group in self._waiters.values() for waiter in group]
            self._recent.clear()
        for waiter in waiters:
            waiter.set()

    def _remove(self, key: Hashable, waiter: Waiter) -> None:
        with self._lock:
            group = self._waiters.get(key)
            if group is not None:
                group.discard(waiter)
                if not group:
                    del self._waiters[key]
