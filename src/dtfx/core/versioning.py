"""Comparing orchestration versions, as the official Python SDK's worker compares them."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

VERSION_MISMATCH = "VersionMismatch"
"""The error type of an orchestration a worker's versioning rules fail, as the official SDKs name it."""


def compare_versions(left: str | None, right: str | None) -> int:
    """-1, 0 or 1 as ``left`` is older than, equal to or newer than ``right``.

    Two empty versions are equal and an empty version is older than any other. Versions
    compare by the rules of Python packages (``1.10`` after ``1.9``, ``1.0`` equal to
    ``1.0.0``, ``2.0rc1`` before ``2.0``, ``v10`` after ``v9``); if either is not such a
    version, both compare as text.
    """
    if not left and not right:
        return 0
    if not left:
        return -1
    if not right:
        return 1
    try:
        left_version, right_version = Version(left), Version(right)
    except InvalidVersion:
        return (left > right) - (left < right)
    return (left_version > right_version) - (left_version < right_version)
