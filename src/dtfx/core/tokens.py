"""Tokens that only have to be unique: lock tokens, execution ids, request ids.

They come from :mod:`random`'s generator, which is seeded from the system's entropy at start
and seeded again in a forked child, rather than from :func:`os.urandom`: each call of that is
a system call during which the thread lets go of the GIL, and under load the thread then waits
for another one to give the GIL back (up to the interpreter's switch interval) before it goes
on. 128 random bits make two equal tokens as unlikely as two equal ``uuid4`` s, but they can be
predicted from enough earlier ones: instance ids, which users see and may hand around, and the
sidecar's completion tokens, which remote workers present, still come from :func:`uuid.uuid4`.
"""

from __future__ import annotations

import random


def new_token() -> str:
    """A random token of 32 hexadecimal digits."""
    return f"{random.getrandbits(128):032x}"
