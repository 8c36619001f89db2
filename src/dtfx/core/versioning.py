"""Comparing orchestration versions (DurableTask.Core's ``VersioningSettings.CompareVersions``)."""

from __future__ import annotations


def _numeric(version: str) -> tuple[int, ...] | None:
    parts = version.split(".")
    if not all(part.isdigit() for part in parts):
        return None
    return tuple(int(part) for part in parts)


def compare_versions(left: str | None, right: str | None) -> int:
    """-1, 0 or 1 as ``left`` is older than, equal to or newer than ``right``.

    Two empty versions are equal and an empty version is older than any other.
    Dotted numbers (``1.10.0``) compare numerically; anything else compares as
    case-insensitive text.
    """
    if not left and not right:
        return 0
    if not left:
        return -1
    if not right:
        return 1
    left_numbers, right_numbers = _numeric(left), _numeric(right)
    if left_numbers is not None and right_numbers is not None:
        # Pad so that 1.0 equals 1.0.0, as System.Version's missing parts do.
        width = max(len(left_numbers), len(right_numbers))
        left_numbers += (0,) * (width - len(left_numbers))
        right_numbers += (0,) * (width - len(right_numbers))
        return (left_numbers > right_numbers) - (left_numbers < right_numbers)
    left_text, right_text = left.casefold(), right.casefold()
    return (left_text > right_text) - (left_text < right_text)
