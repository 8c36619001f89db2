"""Group commit: one transaction for what arrives together, and a failure only for the items at fault."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from dtfx.core.errors import BackendUnavailableError, UnstorableValueError
from dtfx.worker.commit import GroupCommitter


class Store:
    """Commits strings; refuses a batch holding a NUL, or everything while it is down."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.down = False

    async def commit_many(self, items: Sequence[str]) -> list[str]:
        self.calls.append(list(items))
        if self.down:
            raise BackendUnavailableError("the store is down")
        if any("\x00" in item for item in items):
            raise UnstorableValueError("text cannot hold NUL")
        return [f"stored {item}" for item in items]


async def commit_together(committer: GroupCommitter[str, str], items: list[str]) -> list[str | BaseException]:
    return await asyncio.gather(*(committer.commit(item) for item in items), return_exceptions=True)


async def test_what_arrives_together_is_one_call() -> None:
    store = Store()
    results = await commit_together(GroupCommitter(store.commit_many), ["a", "b", "c"])
    assert results == ["stored a", "stored b", "stored c"]
    assert store.calls == [["a", "b", "c"]]


async def test_an_item_the_store_refuses_fails_alone() -> None:
    store = Store()
    results = await commit_together(GroupCommitter(store.commit_many), ["a", "b\x00", "c"])
    assert results[0] == "stored a" and results[2] == "stored c"
    assert isinstance(results[1], UnstorableValueError)
    assert store.calls == [["a", "b\x00", "c"], ["a"], ["b\x00"], ["c"]]


async def test_an_unavailable_store_fails_the_batch_without_trying_each_item() -> None:
    store = Store()
    store.down = True
    results = await commit_together(GroupCommitter(store.commit_many), ["a", "b"])
    assert all(isinstance(result, BackendUnavailableError) for result in results)
    assert store.calls == [["a", "b"]]


async def test_a_lone_item_gets_its_error() -> None:
    with pytest.raises(UnstorableValueError):
        await GroupCommitter(Store().commit_many).commit("\x00")
