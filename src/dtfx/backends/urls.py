"""Backend URLs as messages show them."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """``url`` with its password, if any (``user:password@`` or a ``password=`` parameter), replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = f"{parts.username}:***@" if parts.username else ":***@"
        netloc = user + netloc.rpartition("@")[2]
    query = _PASSWORD_PARAMETER.sub(r"\1***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


_PASSWORD_PARAMETER = re.compile(r"((?:^|&)password=)[^&]*")
