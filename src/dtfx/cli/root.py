"""The root of the ``dtfx`` command: the Typer application, error reporting and logging.

:mod:`dtfx.cli` adds the commands to :data:`cli` from its command table. No error
reaches the user as a traceback: :class:`ErrorReportingGroup` prints each as one
line on stderr and exits with 1 (a failure), 2 (a usage error) or 130 (Ctrl-C);
``-v`` logs the traceback as well.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console, ConsoleRenderable
from rich.logging import RichHandler
from rich.text import Text
from typer.core import TyperGroup

from dtfx import _loops as loops
from dtfx.cli.printable import printable
from dtfx.core.errors import DtfxError

P = ParamSpec("P")
T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command that Ctrl-C ended

logger = logging.getLogger("dtfx.cli")

# Without markup: what the consoles print is mostly stored data (ids, payloads, failure
# messages), in which "[/path]" or "[done]" must show as written. Styles go through
# Text and style= instead.
stdout = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 1000)
"""Results: tables and messages (JSON is written as plain text). Piped, it is not
wrapped at 80 columns, so that ids stay whole for grep and cut."""
stderr = Console(stderr=True, highlight=False, markup=False)
"""Diagnostics: errors, progress, logs."""


class CommandError(Exception):
    """A command could not do what it was asked; the message is all the user sees."""


class _InterruptedError(Exception):
    """Ctrl-C, carried past Typer, which turns KeyboardInterrupt into a silent exit
    (status 130 or 1, depending on its version)."""


class ErrorReportingGroup(TyperGroup):
    """Runs a command and turns whatever it raises into one line on stderr and an exit status."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,  # ignored: this method always exits, as in standalone mode
        **extra: Any,
    ) -> NoReturn:
        try:
            status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        # typer.Abort: older Typer versions turn Ctrl-C into click's Abort (which typer.Abort is there).
        except (_InterruptedError, KeyboardInterrupt, typer.Abort):
            print_error("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as error:
            sys.exit(report(error))
        sys.exit(status if isinstance(status, int) else 0)

    def invoke(self, ctx: Any) -> Any:  # a click.Context, or typer._click's, depending on Typer's version
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _InterruptedError from None


def report(error: Exception) -> int:
    """Print ``error`` as one line on stderr; return the exit status it calls for."""
    # Typer's usage and parameter errors (its own or click's, depending on the version)
    # carry ``exit_code`` and ``format_message``.
    format_message = getattr(error, "format_message", None)
    exit_code = getattr(error, "exit_code", None)
    if callable(format_message) and isinstance(exit_code, int):
        message = str(format_message())
        context = getattr(error, "ctx", None)
        if exit_code == EXIT_USAGE and context is not None:
            message += f" (see '{context.command_path} --help')"
        print_error(message)
        return exit_code
    print_error(describe(error))
    logger.info("Details of the error above:", exc_info=error)
    return EXIT_FAILURE


def describe(error: BaseException) -> str:
    """dtfx's own errors speak for themselves; anything else gets its type name in front."""
    message = str(error).strip()
    if isinstance(error, DtfxError | CommandError) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def print_error(message: str) -> None:
    """``error: message`` on stderr, on one line whatever the terminal's width."""
    stderr.print(Text.assemble(("error: ", "bold red"), printable(message).replace("\n", " ")), soft_wrap=True)


def configure_logging(verbosity: int, *, quiet: int = logging.WARNING) -> None:
    """Log at ``quiet`` by default, info with ``-v`` (error tracebacks too), debug with ``-vv``."""
    level = quiet if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if isinstance(handler, _CliLogHandler)]:
        root.removeHandler(handler)
    # The handler's level too: some libraries set their loggers' own levels (psycopg: WARNING).
    root.addHandler(_CliLogHandler(level, console=stderr, show_path=False))
    root.setLevel(level)


class _CliLogHandler(RichHandler):
    """Marks the handler this module installed, so that running a command twice in one
    process (as tests do) replaces it instead of adding a second one. Messages name what
    the hub holds (an orchestration's name, a failure's message): their control characters
    are shown escaped."""

    def render_message(self, record: logging.LogRecord, message: str) -> ConsoleRenderable:
        return super().render_message(record, printable(message))


def run_async(function: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Make an ``async def`` command callable by Typer, which calls commands synchronously."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return loops.run(function(*args, **kwargs))

    return run


cli = typer.Typer(
    name="dtfx",
    cls=ErrorReportingGroup,
    help="Run and manage durable orchestrations. The task hub is the SQLite file ./.dtfx/taskhub.db "
    "unless --backend or DTFX_BACKEND names another.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
"""The ``dtfx`` application; :mod:`dtfx.cli` adds the commands."""


def _print_version(requested: bool) -> None:
    if requested:
        from dtfx import __version__

        typer.echo(f"dtfx {__version__}")
        raise typer.Exit()


@cli.callback(invoke_without_command=True)
def _root(
    context: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", metavar="", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    if context.invoked_subcommand is None:
        typer.echo(context.get_help())
