"""Arguments and options that several commands share, and the parsing of their values."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any, NoReturn

import typer

from dtfx.backends import DEFAULT_URL
from dtfx.core.history import OrchestrationStatus
from dtfx.core.moments import as_utc

STATUS_NAMES = ", ".join(status.name.lower() for status in OrchestrationStatus)


def json_value(text: str) -> Any:
    """Parse an option given as JSON text (``--input``, ``--data``, ``--output``)."""
    try:
        return json.loads(text, parse_constant=not_json, parse_float=_finite)
    except ValueError as error:
        raise typer.BadParameter(
            f"{text!r} is not valid JSON ({error}); a JSON string needs double quotes, as in '\"Tokyo\"'"
        ) from None
    except RecursionError:
        raise typer.BadParameter("the JSON is nested too deeply to read") from None


def not_json(constant: str) -> NoReturn:
    """Refuse ``NaN`` or ``Infinity`` (``json.loads``'s ``parse_constant``): Python's json takes them, JSON has none."""
    raise ValueError(f"{constant} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is beyond the range of a number")  # 1e999, say: JSON has no infinity
    return number


def status_value(text: str) -> OrchestrationStatus:
    """Parse a runtime status name, in any case (``running``, ``FAILED``, ...)."""
    try:
        return OrchestrationStatus[text.strip().upper()]
    except KeyError:
        raise typer.BadParameter(f"{text!r} is not a status; use one of: {STATUS_NAMES}") from None


def moment_value(text: str) -> datetime:
    """Parse an ISO 8601 date or moment (``2026-12-07``, ``2026-12-07T09:30``, ``...+01:00``); UTC unless it says."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date or moment; use ISO 8601, as in 2026-12-07T09:30Z") from None
    try:
        return as_utc(moment)
    except ValueError as error:  # the year 10000 in UTC, say
        raise typer.BadParameter(str(error)) from None


BackendUrl = Annotated[
    str | None,
    typer.Option(
        "--backend",
        "-b",
        envvar="DTFX_BACKEND",
        metavar="URL",
        show_default=DEFAULT_URL,
        help="The task hub: sqlite:///path/to/file.db, postgresql://user@host/db or memory://.",
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", metavar="", help="Print JSON instead of tables.")]
Verbosity = Annotated[
    int, typer.Option("--verbose", "-v", count=True, metavar="", help="Log more: -v for info, -vv for debug.")
]


def non_empty(value: str | None) -> str | None:
    """Refuse an empty value of a name or an id as a usage error."""
    if value is not None and not value.strip():
        raise typer.BadParameter("cannot be empty")
    return value


InstanceId = Annotated[
    str,
    typer.Argument(metavar="ID", help="The orchestration instance id.", show_default=False, callback=non_empty),
]
Timeout = Annotated[
    float, typer.Option("--timeout", min=0, metavar="SECONDS", help="How long --wait waits before giving up.")
]
