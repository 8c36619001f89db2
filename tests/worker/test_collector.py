"""The garbage collector's pace while workers and sidecar servers run (:mod:`dtfx._collector`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

import dtfx
from dtfx._collector import PYTHON_DEFAULT, WHILE_RUNNING
from dtfx.grpc import SidecarOptions, SidecarServer


@pytest.fixture(autouse=True)
def python_defaults() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(*PYTHON_DEFAULT)
    yield
    gc.set_threshold(*before)


async def test_a_running_worker_has_the_collector_look_at_young_objects_less_often() -> None:
    async with dtfx.Worker(dtfx.MemoryBackend()):
        assert gc.get_threshold() == WHILE_RUNNING == (10_000, 10, 10)
    assert gc.get_threshold() == PYTHON_DEFAULT


async def test_python_s_defaults_come_back_when_the_last_running_worker_stops() -> None:
    first, second = dtfx.Worker(dtfx.MemoryBackend()), dtfx.Worker(dtfx.MemoryBackend())
    await first.start_async()
    await second.start_async()
    await first.stop_async()
    assert gc.get_threshold() == WHILE_RUNNING
    await second.stop_async()
    assert gc.get_threshold() == PYTHON_DEFAULT
    await second.stop_async()  # stopping again changes nothing
    assert gc.get_threshold() == PYTHON_DEFAULT


async def test_thresholds_the_process_set_itself_are_kept() -> None:
    gc.set_threshold(2000, 20, 20)
    async with dtfx.Worker(dtfx.MemoryBackend()):
        assert gc.get_threshold() == (2000, 20, 20)
    assert gc.get_threshold() == (2000, 20, 20)
    gc.set_threshold(*PYTHON_DEFAULT)
    async with dtfx.Worker(dtfx.MemoryBackend()):
        assert gc.get_threshold() == WHILE_RUNNING
        gc.set_threshold(5000, 10, 10)  # changed while a worker runs: kept when it stops
    assert gc.get_threshold() == (5000, 10, 10)


async def test_a_worker_told_not_to_leaves_the_collector_alone() -> None:
    async with dtfx.Worker(dtfx.MemoryBackend(), options=dtfx.WorkerOptions(tune_gc=False)):
        assert gc.get_threshold() == PYTHON_DEFAULT


async def test_a_running_sidecar_server_holds_the_pace_as_a_worker_does() -> None:
    async with SidecarServer(dtfx.MemoryBackend(), port=0):
        assert gc.get_threshold() == WHILE_RUNNING
        async with dtfx.Worker(dtfx.MemoryBackend()):
            assert gc.get_threshold() == WHILE_RUNNING
        assert gc.get_threshold() == WHILE_RUNNING  # the server still runs
    assert gc.get_threshold() == PYTHON_DEFAULT
    async with SidecarServer(dtfx.MemoryBackend(), port=0, options=SidecarOptions(tune_gc=False)):
        assert gc.get_threshold() == PYTHON_DEFAULT
