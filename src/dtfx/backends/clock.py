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
from datetime import UTC, datetime, timedelta

logger = logging.getLogger("dtfx.backends")

TOLERANCE = timedelta(milliseconds=1)
"""Differences between the clocks this small are left alone: they are within what reading
the other clock over a network can tell, and within what NTP keeps machines to."""

_WORTH_A_WARNING = timedelta(seconds=1)


def utc_now() -> datetime:
    """This machine's clock, in UTC."""
    return datetime.now(UTC)


class ReferenceClock:
    """This machine's clock, set by a reference clock (a database server's) that it reads
    now and then (:meth:`set_by`)."""

    def __init__(self, reference: str) -> None:
        self._reference = reference
        self._offset = timedelta(0)

    @property
    def offset(self) -> timedelta:
        """How far the reference clock is ahead of this machine's (negative: behind)."""
        return self._offset

    def now(self) -> datetime:
        """The reference clock's time now."""
        return datetime.now(UTC) + self._offset

    def set_by(self, reading: datetime, sent: datetime, received: datetime) -> None:
        """Take the offset from ``reading``, the reference clock's time, asked for at ``sent``
        and received at ``received`` (this machine's clock): it was read in between, taken to
        be halfway. A new offset within that uncertainty (plus :data:`TOLERANCE`) of the one
        kept is not a change, so that times do not jitter from one reading to the next."""
        uncertainty = (received - sent) / 2
        offset = reading - (sent + uncertainty)
        if abs(offset - self._offset) <= uncertainty + TOLERANCE:
            return
        if abs(offset) <= TOLERANCE:
            offset = timedelta(0)
            logger.info("This machine's clock agrees with %s's again", self._reference)
        else:
            logger.log(
                logging.WARNING if abs(offset) >= _WORTH_A_WARNING else logging.INFO,
                "This machine's clock is %.3f s %s %s's; the task hub's times are kept by the latter",
                abs(offset.total_seconds()),
                "behind" if offset > timedelta(0) else "ahead of",
                self._reference,
            )
        self._offset = offset
