"""``dtfx run``: a worker for the orchestrators, activities and entities of a user's app."""

from __future__ import annotations

import enum
import importlib
import importlib.util
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from dtfx._tracing import flush as flush_traces
from dtfx.backends import default_url
from dtfx.backends.memory import MemoryBackend
from dtfx.cli.options import BackendUrl, Verbosity, non_empty
from dtfx.cli.root import CommandError, configure_logging, run_async, stderr
from dtfx.cli.serving import run_until_signalled
from dtfx.cli.session import shown, started_backend
from dtfx.worker.options import (
    ConcurrencyOptions,
    VersionFailureStrategy,
    VersioningOptions,
    VersionMatchStrategy,
    WorkerOptions,
)
from dtfx.worker.registry import Registry
from dtfx.worker.worker import Worker


class _Match(enum.Enum):
    ANY = "any"
    STRICT = "strict"
    CURRENT_OR_OLDER = "current-or-older"


class _OnMismatch(enum.Enum):
    REJECT = "reject"
    FAIL = "fail"


@run_async
async def run(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE[:APP]",
            show_default=False,
            help="Where the app is: a module (my_package.orders), a file (orders.py), "
            "and after a colon the dtfx.App's name if it is not `app`.",
            callback=non_empty,
        ),
    ],
    backend: BackendUrl = None,
    grace_period: Annotated[
        float,
        typer.Option(
            "--grace-period",
            min=0,
            metavar="SECONDS",
            help="How long work in flight may go on finishing after the first Ctrl-C or SIGTERM.",
        ),
    ] = WorkerOptions.shutdown_grace_period.total_seconds(),
    registered_only: Annotated[
        bool,
        typer.Option(
            "--registered-only",
            metavar="",
            help="Take only the orchestrations, activities and entities the app registers, and leave"
            " the rest to other workers (in a rolling deploy, say); by default a worker fails what it"
            " has no registration for.",
        ),
    ] = False,
    max_orchestrations: Annotated[
        int | None,
        typer.Option(
            "--max-orchestrations",
            metavar="N",
            min=1,
            show_default=False,
            help="Orchestration episodes in flight at once; by default 100 per core.",
        ),
    ] = None,
    max_activities: Annotated[
        int | None,
        typer.Option(
            "--max-activities",
            metavar="N",
            min=1,
            show_default=False,
            help="Activities running at once; by default 100 per core. Set it to --threads where"
            " several workers should share slow sync activities: a worker leases up to this many.",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            metavar="N",
            min=1,
            show_default=False,
            help="Threads for sync activities; by default Python's, min(32, cores + 4).",
        ),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            metavar="VERSION",
            show_default=False,
            help="The version of the orchestrations this worker runs; also the version of the"
            " sub-orchestrations they start without one.",
            callback=non_empty,
        ),
    ] = None,
    match: Annotated[
        _Match,
        typer.Option(
            "--match",
            case_sensitive=False,
            help="Which orchestration versions it runs: any, only its --version (strict), or its"
            " --version and older ones (current-or-older).",
        ),
    ] = _Match.ANY,
    on_mismatch: Annotated[
        _OnMismatch,
        typer.Option(
            "--on-mismatch",
            case_sensitive=False,
            help="What becomes of an orchestration of another version: left for another worker"
            " (reject), or failed (fail).",
        ),
    ] = _OnMismatch.REJECT,
    verbose: Verbosity = 0,
) -> None:
    """Run a worker for the orchestrators, activities and entities of a dtfx.App, until Ctrl-C or SIGTERM.

    On the first signal the worker stops taking work and lets what is in flight
    finish (for up to 30 seconds, --grace-period), then quits; a second one quits at
    once: the work left unfinished runs again, on any worker, once its lease expires.
    """
    configure_logging(verbose)
    if match is not _Match.ANY and version is None:
        raise typer.BadParameter("compares with the worker's --version: give one", param_hint="'--match'")
    if on_mismatch is not _OnMismatch.REJECT and match is _Match.ANY:
        raise typer.BadParameter("applies to the versions --match refuses: give it too", param_hint="'--on-mismatch'")
    app = load_app(target)
    url = backend or default_url()
    options = WorkerOptions(shutdown_grace_period=timedelta(seconds=grace_period), registered_only=registered_only)
    async with started_backend(url) as store:
        if isinstance(store, MemoryBackend):
            note = "Note: memory:// is a task hub inside this process: no client or other worker can reach it."
            stderr.print(note, soft_wrap=True)
        ready = (
            f"Worker running on {shown(url)}\n"
            f"  orchestrators: {', '.join(app.orchestrators) or '-'}\n"
            f"  activities: {', '.join(app.activities) or '-'}\n"
            f"  entities: {', '.join(app.entities) or '-'}"
        )
        concurrency = _concurrency(max_orchestrations, max_activities, threads)
        versioning = _versioning(version, match, on_mismatch)
        worker = Worker(store, app, concurrency=concurrency, options=options, versioning=versioning)
        await run_until_signalled(worker, lambda: ready)
    stderr.print("Worker stopped.")
    if worker.threads_busy:
        # Python would wait for them as it exits, however long they take.
        stderr.print(
            f"{worker.threads_busy} sync activity(ies) outlasted the grace period; quitting without them"
            " (their work items went back to the store)."
        )
        sys.stderr.flush()
        flush_traces()  # the exit hooks that would have are skipped (before logging's, which may say it failed)
        logging.shutdown()
        os._exit(0)


def _concurrency(orchestrations: int | None, activities: int | None, threads: int | None) -> ConcurrencyOptions:
    given = {
        "maximum_concurrent_orchestration_work_items": orchestrations,
        "maximum_concurrent_activity_work_items": activities,
        "maximum_thread_pool_workers": threads,
    }
    return ConcurrencyOptions(**{name: value for name, value in given.items() if value is not None})


def _versioning(version: str | None, match: _Match, on_mismatch: _OnMismatch) -> VersioningOptions | None:
    if version is None:
        return None
    return VersioningOptions(
        version=version,
        default_version=version,
        match_strategy=VersionMatchStrategy.NONE if match is _Match.ANY else VersionMatchStrategy[match.name],
        failure_strategy=VersionFailureStrategy[on_mismatch.name],
    )


def load_app(target: str) -> Registry:
    """The :class:`~dtfx.App` that ``MODULE[:APP]`` names (``app``, or the module's only app)."""
    module_name, _, attribute = target.partition(":")
    module = _import(module_name)
    apps = {name: value for name, value in vars(module).items() if isinstance(value, Registry)}
    distinct = list({id(value): value for value in apps.values()}.values())
    if attribute:
        app = getattr(module, attribute, None)
        if not isinstance(app, Registry):
            found = f" (it has: {', '.join(apps)})" if apps else ""
            raise CommandError(f"{module.__name__}.{attribute} is not a dtfx.App{found}.")
    elif "app" in apps:
        app = apps["app"]
    elif len(distinct) == 1:
        app = distinct[0]
    elif distinct:
        raise CommandError(
            f"{module.__name__} has several apps; name one, as in: dtfx run {module_name}:{next(iter(apps))}"
        )
    else:
        raise CommandError(f"{module.__name__} has no dtfx.App; create one (app = dtfx.App()) and register with it.")
    if not (app.orchestrators or app.activities or app.entities):
        raise CommandError(f"The app {target} registers no orchestrator, no activity and no entity.")
    return app


def _found_elsewhere(module_name: str, path: Path) -> str | None:
    """Where the module ``module_name`` comes from, if not from the file ``path`` (a standard
    module's name, say, which the file would shadow, or lose to if that module is loaded)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    origin = spec.origin or "built in"
    if spec.origin is not None and Path(spec.origin).resolve() == path.resolve():
        return None
    return origin


def _import(module_name: str) -> ModuleType:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise CommandError(f"No such file: {module_name}")
        directory, module_name = str(path.resolve().parent), path.stem
    else:
        # Like `python -m`, find modules in the current directory (console scripts do not).
        directory = os.getcwd()
        where = Path(*module_name.split("."))
        package = where / "__init__.py"
        path = package if package.is_file() else where.with_suffix(".py")  # a package comes first, as for import
    if directory not in sys.path:
        sys.path.insert(0, directory)
    # A file of the directory loses to a module of its name already imported (the standard
    # library's json, say) or built in: the import would not be of the file.
    elsewhere = _found_elsewhere(module_name, path) if path.is_file() else None
    if elsewhere is not None:
        renamed = "the package" if path.name == "__init__.py" else "the file"
        raise CommandError(
            f"{path} would be imported as {module_name!r}, the name of another module ({elsewhere}); rename {renamed}."
        )
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name + ".").startswith(error.name + "."):
            raise CommandError(
                f"No module named {module_name!r} (looked in {directory} and the installed packages)."
            ) from error
        raise CommandError(f"Importing {module_name} failed: {error}") from error
    except Exception as error:
        raise CommandError(f"Importing {module_name} failed: {type(error).__name__}: {error}") from error
