"""Fixtures of the SQL backends' own tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.postgres import postgres_url


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh task hub of each SQL backend."""
    return f"sqlite:///{tmp_path}/hub.db" if request.param == "sqlite" else postgres_url()
