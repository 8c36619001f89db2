"""The clock of a task hub that several machines share.

Every time a task hub stores and compares is read off one clock: when a message becomes
visible, when a lease ends, when a durable timer fires, the moment an episode runs at. On
one machine that is the machine's own clock. Machines whose clocks disagree would each
read those times their own way: a worker whose clock is behind a client's would see each
new orchestration and event only once its clock caught up, one ahead would take over the
leases of live workers and fire timers early. A backend whose store is shared by machines
(PostgreSQL) therefore reads the server's clock now and then and keeps the hub's times by it
(:class:`ReferenceClock`): the machines' clocks may then disagree by any amount.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

logger = logging.getLogger("dtfx.backends")

TOLERANCE = timedelta(milliseconds=1)
"""Differences between the clocks this small are left alone: they are within what reading
the other clock over a network can tell, and within what NTP keeps machines to."""

_WORTH_A_WARNING = timedelta(seconds=1)


def utc_now() -> datetime:
    """This machine's clock, in UTC."""
    return datetime.now(UTC)


ticks: Callable[[], float] = (
    partial(time.clock_gettime, time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic
)
"""Seconds on a clock of this machine that no setting of its wall clock moves, and that counts
a suspension (Linux's ``CLOCK_BOOTTIME``; elsewhere, :func:`time.monotonic`)."""


class ReferenceClock:
    """The reference clock's time (a database server's), read now and then (:meth:`set_by`)
    and kept between readings by this machine's :func:`ticks`: a step of this machine's wall
    clock (NTP's, an operator's, a virtual machine's resume) does not move it."""

    def __init__(self, reference: str) -> None:
        self._reference = reference
        self._anchor = (utc_now(), ticks())
        """The reference clock's time at a moment of :func:`ticks`, set as one (threads read it)."""
        self._offset = timedelta(0)

    @property
    def offset(self) -> timedelta:
        """How far the reference clock was ahead of this machine's wall clock (negative: behind)
        when it was last found to differ from the time kept."""
        return self._offset

    def now(self) -> datetime:
        """The reference clock's time now."""
        at, since = self._anchor
        return at + timedelta(seconds=ticks() - since)

    def set_by(self, reading: datetime, sent: float, received: float) -> None:
        """Take the time from ``reading``, the reference clock's, asked for at ``sent`` and
        received at ``received`` (:func:`ticks`): it was read in between, taken to be halfway.
        A reading within that uncertainty (plus :data:`TOLERANCE`) of the time kept is not a
        change, so that times do not jitter from one reading to the next."""
        uncertainty = timedelta(seconds=(received - sent) / 2)
        midway = sent + uncertainty.total_seconds()
        at, since = self._anchor
        if abs(reading - (at + timedelta(seconds=midway - since))) <= uncertainty + TOLERANCE:
            return
        self._anchor = (reading, midway)
        offset = reading - (utc_now() - timedelta(seconds=ticks() - midway))  # against the wall clock
        if abs(offset) <= TOLERANCE:
            if self._offset:
                logger.info("This machine's clock agrees with %s's again", self._reference)
            self._offset = timedelta(0)
            return
        logger.log(
            logging.WARNING if abs(offset) >= _WORTH_A_WARNING else logging.INFO,
            "This machine's clock is %.3f s %s %s's; the task hub's times are kept by the latter",
            abs(offset.total_seconds()),
            "behind" if offset > timedelta(0) else "ahead of",
            self._reference,
        )
        self._offset = offset
