"""Moments in time as dtfx keeps them: timezone-aware, in UTC."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime


def as_utc(moment: datetime) -> datetime:
    """Naive datetimes are taken to be UTC (those whose ``tzinfo`` gives no offset are naive too)."""
    if not isinstance(moment, datetime):
        raise TypeError(f"a moment must be a datetime, not {type(moment).__name__}")
    if moment.utcoffset() is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59-01:00, say, is in the year 10000 in UTC
        raise ValueError(f"{moment.isoformat()} is out of the range of datetime in UTC") from None


def fields_as_utc(options: object) -> None:
    """Give a (frozen) dataclass's datetime fields in UTC, naive ones taken to be UTC already."""
    for field in fields(options):  # type: ignore[arg-type]
        value = getattr(options, field.name)
        if isinstance(value, datetime):
            object.__setattr__(options, field.name, as_utc(value))
