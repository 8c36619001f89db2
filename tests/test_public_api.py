"""The public API is what dtfx.__all__ says, nothing more, nothing less."""

from __future__ import annotations

import types

import dtfx


def test_all_lists_every_public_name_sorted() -> None:
    # Subpackages (dtfx.cli, ...) become attributes once imported; they are not exported names.
    public = sorted(
        name
        for name, value in vars(dtfx).items()
        if not name.startswith("_") and name != "annotations" and not isinstance(value, types.ModuleType)
    )
    assert public == sorted(dtfx.__all__)
    assert list(dtfx.__all__) == sorted(dtfx.__all__, key=str)


def test_exported_names_resolve() -> None:
    for name in dtfx.__all__:
        assert getattr(dtfx, name) is not None
