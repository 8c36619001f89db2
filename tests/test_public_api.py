"""The public API is what dtfx.__all__ says, nothing more, nothing less."""

from __future__ import annotations

import dtfx


def test_all_lists_every_public_name_sorted() -> None:
    public = sorted(name for name in vars(dtfx) if not name.startswith("_") and name not in {"annotations"})
    modules = {"backends", "client", "core", "worker"}
    assert sorted(set(public) - modules) == sorted(dtfx.__all__)
    assert list(dtfx.__all__) == sorted(dtfx.__all__, key=str)


def test_exported_names_resolve() -> None:
    for name in dtfx.__all__:
        assert getattr(dtfx, name) is not None
