"""Datetimes as the hub reads them: naive ones are UTC."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone, tzinfo

import pytest

from dtfx.core.moments import as_utc


class NoOffset(tzinfo):
    """A zone that does not know its offset: such a datetime is naive, as Python defines it."""

    def utcoffset(self, moment: datetime | None) -> timedelta | None:
        return None

    def dst(self, moment: datetime | None) -> timedelta | None:
        return None


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's local time zone nine hours ahead of UTC (where naive is read as local, it shows)."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_naive_datetimes_are_utc_whatever_the_local_zone(far_from_utc: None) -> None:
    wall = datetime(2026, 12, 7, 12, 0)
    assert as_utc(wall) == datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert as_utc(wall.replace(tzinfo=NoOffset())) == datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    plus_five = timezone(timedelta(hours=5))
    assert as_utc(wall.replace(tzinfo=plus_five)) == datetime(2026, 12, 7, 7, 0, tzinfo=UTC)
    assert as_utc(wall.replace(tzinfo=plus_five)).tzinfo is UTC


def test_a_moment_beyond_the_range_of_datetime_in_utc_is_a_value_error() -> None:
    """Not an ``OverflowError`` from deep inside a query: the year 10000 in UTC, say."""
    with pytest.raises(ValueError, match="out of the range"):
        as_utc(datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-14))))
