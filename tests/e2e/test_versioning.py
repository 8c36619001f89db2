"""Versioning: versions travel with instances, and workers choose which versions they run."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import pytest

import dtfx
from dtfx import OrchestrationStatus as Status
from dtfx import VersionFailureStrategy, VersioningOptions, VersionMatchStrategy
from tests.e2e.conftest import Hub


def _version_app(app: dtfx.App) -> None:
    @app.orchestrator
    def report(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return ctx.version


async def test_version_travels_to_the_context_and_sub_orchestrations(hub: Hub, app: dtfx.App) -> None:
    _version_app(app)

    @app.orchestrator
    def parent(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        explicit = yield ctx.call_sub_orchestrator("report", version="3.1")
        default = yield ctx.call_sub_orchestrator("report")
        return [ctx.version, explicit, default]

    versioning = VersioningOptions(version="2.0", default_version="2.5")
    async with hub.worker(app, versioning=versioning):
        state = await hub.run(parent, version="2.0")
    assert state.version == "2.0"
    assert state.get_output() == ["2.0", "3.1", "2.5"]


async def test_continue_as_new_may_set_a_new_version(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def upgrade(ctx: dtfx.OrchestrationContext, seen: list[str | None]) -> Any:
        seen = [*seen, ctx.version]
        if len(seen) == 1:
            ctx.continue_as_new(seen, new_version="2.0")
            return None
        return seen

    async with hub.worker(app):
        state = await hub.run(upgrade, [], version="1.0")
    assert state.get_output() == ["1.0", "2.0"]
    assert state.version == "2.0"


async def test_strict_matching_with_fail_fails_other_versions(hub: Hub, app: dtfx.App) -> None:
    _version_app(app)
    versioning = VersioningOptions(
        version="2.0", match_strategy=VersionMatchStrategy.STRICT, failure_strategy=VersionFailureStrategy.FAIL
    )
    async with hub.worker(app, versioning=versioning):
        matching = await hub.run("report", version="2.0")
        older = await hub.run("report", version="1.0")
        unversioned = await hub.run("report")
    assert matching.get_output() == "2.0"
    assert older.runtime_status == Status.FAILED
    assert older.failure_details is not None
    assert older.failure_details.error_type == "VersionMismatch"
    assert older.failure_details.is_non_retriable
    assert "'1.0' does not match the worker version '2.0'" in older.failure_details.message
    assert unversioned.failure_details is not None
    assert "which has no version, does not match the worker version '2.0'" in unversioned.failure_details.message


async def test_current_or_older_with_reject_leaves_newer_versions_to_another_worker(
    hub: Hub, app: dtfx.App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dtfx.worker.orchestrations")
    _version_app(app)
    old_worker = VersioningOptions(
        version="1.5",
        match_strategy=VersionMatchStrategy.CURRENT_OR_OLDER,
        failure_strategy=VersionFailureStrategy.REJECT,
    )
    new_worker = VersioningOptions(version="3.0", match_strategy=VersionMatchStrategy.CURRENT_OR_OLDER)
    options = dtfx.WorkerOptions(reject_retry_delay=timedelta(milliseconds=50))
    async with hub.worker(app, versioning=old_worker, options=options):
        older = await hub.run("report", version="1.0")
        same = await hub.run("report", version="1.5")
        newer_id = await hub.client.schedule_new_orchestration("report", version="2.0")
        await asyncio.sleep(0.4)
        waiting = await hub.client.get_orchestration_state(newer_id)
        assert waiting is not None and waiting.runtime_status == Status.PENDING
        async with hub.worker(app, versioning=new_worker):
            newer = await hub.client.wait_for_orchestration_completion(newer_id, timeout=10)
    assert older.get_output() == "1.0" and same.get_output() == "1.5"
    assert newer is not None and newer.get_output() == "2.0"
    left = [record.levelno for record in caplog.records if "Leaving it to another worker" in record.getMessage()]
    assert left.count(logging.WARNING) == 1 and left.count(logging.DEBUG) >= 2  # said once, offered again and again


async def test_an_instance_no_worker_takes_for_its_version_can_be_terminated(hub: Hub, app: dtfx.App) -> None:
    _version_app(app)
    strict = VersioningOptions(
        version="1.0", match_strategy=VersionMatchStrategy.STRICT, failure_strategy=VersionFailureStrategy.REJECT
    )
    options = dtfx.WorkerOptions(reject_retry_delay=timedelta(milliseconds=50))
    async with hub.worker(app, versioning=strict, options=options):
        instance_id = await hub.client.schedule_new_orchestration("report", version="2.0")
        await asyncio.sleep(0.2)
        await hub.client.terminate_orchestration(instance_id, output="retired")
        state = await hub.client.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None
    assert (state.runtime_status, state.get_output()) == (Status.TERMINATED, "retired")


def test_versions_compare_as_the_sdk_compares_them() -> None:
    from dtfx.core.versioning import compare_versions

    assert compare_versions(None, None) == 0
    assert compare_versions("", "1.0") == -1
    assert compare_versions("1.0", None) == 1
    assert compare_versions("1.10", "1.9") == 1
    assert compare_versions("1.0", "1.0.0") == 0
    assert compare_versions("2.0", "10.0") == -1
    assert compare_versions("v10", "v9") == 1
    assert compare_versions("2.0rc1", "2.0") == -1
    assert compare_versions("V1", "v1") == 0  # both the version 1
    # Not versions of Python packages: as text, both of them.
    assert compare_versions("beta", "alpha") == 1
    assert compare_versions("beta", "Alpha") == 1
    assert compare_versions("1.\u00b2", "2.0") == -1  # a superscript two is no digit of a version
    assert compare_versions("1.\u00b2", "1.3") == 1  # as text, "\u00b2" comes after "3"


def test_versioning_options_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(TypeError, match="version must be a str, not int"):
        VersioningOptions(version=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="match_strategy must be a VersionMatchStrategy, not str"):
        VersioningOptions(version="2", match_strategy="strict")  # type: ignore[arg-type]


async def test_an_instance_whose_version_is_no_version_of_a_package_runs_by_the_text(hub: Hub, app: dtfx.App) -> None:
    @app.orchestrator
    def report(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
        return ctx.version

    older = VersioningOptions(
        version="2.0",
        match_strategy=VersionMatchStrategy.CURRENT_OR_OLDER,
        failure_strategy=VersionFailureStrategy.FAIL,
    )
    async with hub.worker(app, versioning=older):
        runs = await hub.client.schedule_new_orchestration("report", version="1.\u00b2")
        fails = await hub.client.schedule_new_orchestration("report", version="3.\u2460")
        ran = await hub.client.wait_for_orchestration_completion(runs, timeout=10)
        failed = await hub.client.wait_for_orchestration_completion(fails, timeout=10)
    assert ran is not None and (ran.runtime_status, ran.get_output()) == (Status.COMPLETED, "1.\u00b2")
    assert failed is not None and failed.runtime_status == Status.FAILED
    assert failed.failure_details is not None and failed.failure_details.error_type == "VersionMismatch"
