"""The hub's clock: this machine's, set by the database server's (see dtfx.backends.clock)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

import pytest

from dtfx.backends.clock import ReferenceClock, ticks, utc_now
from dtfx.backends.postgres import PostgresBackend
from tests.postgres import postgres_url

RTT = 0.0002
"""A reading's round trip, in seconds."""


def _read(clock: ReferenceClock, ahead: timedelta, rtt: float = RTT) -> None:
    """Set ``clock`` by a reading of a reference clock ``ahead`` of this machine's, just taken."""
    received = ticks()
    clock.set_by(utc_now() - timedelta(seconds=rtt / 2) + ahead, received - rtt, received)


def test_a_clock_that_agrees_within_the_tolerance_is_left_alone() -> None:
    clock = ReferenceClock("the server")
    _read(clock, timedelta(microseconds=900))
    assert clock.offset == timedelta(0)
    assert abs(clock.now() - utc_now()) < timedelta(milliseconds=50)


def test_the_time_follows_the_reference_clock_but_not_the_noise_of_its_readings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ReferenceClock("the server")
    with caplog.at_level(logging.INFO, logger="dtfx.backends"):
        _read(clock, timedelta(seconds=5))
        assert abs(clock.offset - timedelta(seconds=5)) < timedelta(milliseconds=50)
        assert abs(clock.now() - utc_now() - timedelta(seconds=5)) < timedelta(milliseconds=50)
        assert caplog.records[-1].levelno == logging.WARNING
        assert "5.000 s behind the server's" in caplog.records[-1].getMessage()

        # Within the reading's uncertainty (half its 10 ms round trip) and the tolerance: no change.
        received, kept = ticks(), clock.now()
        clock.set_by(kept - timedelta(milliseconds=2), received - 0.01, received)  # 3 ms off the time kept midway
        assert len(caplog.records) == 1 and abs(clock.now() - kept) < timedelta(milliseconds=50)

        _read(clock, timedelta(seconds=-2))  # this machine's clock was set ahead
        assert "2.000 s ahead of the server's" in caplog.records[-1].getMessage()

        _read(clock, timedelta(milliseconds=30))  # more than the tolerance: kept, but worth no warning
        assert caplog.records[-1].levelno == logging.INFO

        _read(clock, timedelta(0))
        assert clock.offset == timedelta(0)
        assert "agrees with the server's again" in caplog.records[-1].getMessage()


def test_a_step_of_this_machines_wall_clock_does_not_move_the_time_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """An NTP step, or a virtual machine's resume, between two readings: leases would end and
    timers fire early by the step, had the time been kept by the wall clock."""
    clock = ReferenceClock("the server")
    _read(clock, timedelta(0))
    before = clock.now()
    stepped = utc_now() + timedelta(minutes=10)
    monkeypatch.setattr("dtfx.backends.clock.utc_now", lambda: stepped)
    monkeypatch.setattr("dtfx.backends.clock.datetime", _Stepped)
    assert timedelta(0) <= clock.now() - before < timedelta(seconds=1)


class _Stepped(datetime):
    """A wall clock ten minutes ahead."""

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.now(tz) + timedelta(minutes=10)


async def test_a_postgres_backend_reads_the_servers_clock_again_and_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PostgresBackend, "listeners_interval", 0.2)
    backend = PostgresBackend(postgres_url())
    await backend.start()
    try:
        # The server runs on this machine: the backend's first reading found the clocks agreeing.
        assert backend._postgres_dialect.clock.offset == timedelta(0)
        # As if the server's clock had been an hour ahead of this machine's until now.
        _read(backend._postgres_dialect.clock, timedelta(hours=1))
        assert backend.now() - utc_now() > timedelta(minutes=59)
        for _ in range(100):  # the next reading, within about a second
            if backend._postgres_dialect.clock.offset == timedelta(0):
                break
            await asyncio.sleep(0.05)
        assert backend._postgres_dialect.clock.offset == timedelta(0)
        assert abs(backend.now() - utc_now()) < timedelta(seconds=1)
    finally:
        await backend.close()
