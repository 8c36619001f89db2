"""The hub's clock: this machine's, set by the database server's (see dtfx.backends.clock)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest

from dtfx.backends.clock import ReferenceClock, utc_now
from dtfx.backends.postgres import PostgresBackend
from tests.postgres import postgres_url

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RTT = timedelta(microseconds=200)


def test_a_clock_that_agrees_within_the_tolerance_is_left_alone() -> None:
    clock = ReferenceClock("the server")
    clock.set_by(T0 + timedelta(microseconds=900), T0, T0 + RTT)
    assert clock.offset == timedelta(0)


def test_the_offset_follows_the_reference_clock_but_not_the_noise_of_its_readings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ReferenceClock("the server")
    with caplog.at_level(logging.INFO, logger="dtfx.backends"):
        clock.set_by(T0 + timedelta(seconds=5, microseconds=100), T0, T0 + RTT)  # read halfway
        assert clock.offset == timedelta(seconds=5)
        assert caplog.records[-1].levelno == logging.WARNING
        assert "5.000 s behind the server's" in caplog.records[-1].getMessage()

        # Within the reading's uncertainty (half its 1 ms round trip) and the tolerance: no change.
        clock.set_by(T0 + timedelta(seconds=5, microseconds=1900), T0, T0 + timedelta(milliseconds=1))
        assert clock.offset == timedelta(seconds=5)
        assert len(caplog.records) == 1

        clock.set_by(T0 - timedelta(seconds=2), T0 - RTT, T0 + RTT)  # this machine's clock was set ahead
        assert clock.offset == timedelta(seconds=-2)
        assert "2.000 s ahead of the server's" in caplog.records[-1].getMessage()

        clock.set_by(T0 + timedelta(milliseconds=30), T0, T0)  # more than the tolerance: kept, but worth no warning
        assert clock.offset == timedelta(milliseconds=30)
        assert caplog.records[-1].levelno == logging.INFO

        clock.set_by(T0, T0 - RTT, T0 + RTT)
        assert clock.offset == timedelta(0)
        assert "agrees with the server's again" in caplog.records[-1].getMessage()


def test_now_is_the_reference_clocks_time() -> None:
    clock = ReferenceClock("the server")
    sent = utc_now()
    clock.set_by(sent + timedelta(hours=1), sent, sent)
    assert abs(clock.now() - (utc_now() + timedelta(hours=1))) < timedelta(seconds=1)


async def test_a_postgres_backend_reads_the_servers_clock_again_and_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PostgresBackend, "listeners_interval", 0.2)
    backend = PostgresBackend(postgres_url())
    await backend.start()
    try:
        # The server runs on this machine: the backend's first reading found the clocks agreeing.
        assert backend._postgres_dialect.clock.offset == timedelta(0)
        # As if the server's clock had been an hour ahead of this machine's until now.
        backend._postgres_dialect.clock.set_by(utc_now() + timedelta(hours=1), utc_now(), utc_now())
        assert backend.now() - utc_now() > timedelta(minutes=59)
        for _ in range(100):  # the next reading, within about a second
            if backend._postgres_dialect.clock.offset == timedelta(0):
                break
            await asyncio.sleep(0.05)
        assert backend._postgres_dialect.clock.offset == timedelta(0)
        assert abs(backend.now() - utc_now()) < timedelta(seconds=1)
    finally:
        await backend.close()
