"""Tokens that tell leases, executions and requests apart: unique, in this process and in its forks."""

from __future__ import annotations

import os
import re

import pytest

from dtfx.core.tokens import new_token


def test_tokens_are_32_hex_digits_and_do_not_repeat() -> None:
    tokens = [new_token() for _ in range(100_000)]
    assert all(re.fullmatch("[0-9a-f]{32}", token) for token in tokens)
    assert len(set(tokens)) == len(tokens)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_process_draws_other_tokens_than_its_parent() -> None:
    # Worker processes forked from one parent (a pre-forking server, say) share the parent's
    # memory, generator included: each must still draw tokens of its own.
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(writer, new_token().encode())
        os._exit(0)
    os.close(writer)
    try:
        child = os.read(reader, 64).decode()
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert re.fullmatch("[0-9a-f]{32}", child)
    assert child != new_token()
