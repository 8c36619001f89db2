"""Text from the task hub made safe for a terminal.

Names, versions, failure messages and non-JSON payloads come from whoever starts an instance
or writes an activity: a control character in them (an ESC that clears the screen or sets
the window's title) is shown escaped, as JSON shows it, never sent to the terminal.
"""

from __future__ import annotations

import re

from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Control characters but tab and newline (C0, DEL and C1)."""


def printable(text: str) -> str:
    """``text`` with its control characters (but tab and newline) written as ``\\xNN``; a line
    that ends with CRLF (a .NET worker's stack trace) ends with its newline alone."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text.replace("\r\n", "\n"))


def cell(text: str) -> Text:
    """``text`` for a table: control characters escaped, and no Rich markup read in it."""
    return Text(printable(text))
