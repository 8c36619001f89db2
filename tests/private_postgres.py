"""A PostgreSQL server of a test's own, which the test may crash, stop and start again.

The shared test server (:mod:`tests.postgres`) serves every other test, so it cannot be
restarted under one. This one is a cluster made with ``initdb`` in a temporary directory,
from the programs of the installed server, listening on a free port of 127.0.0.1. As root
(CI), its commands run as the ``postgres`` user, since the server refuses to run as root.
Without those programs the test is skipped, except in CI, where it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


class PrivateServer:
    """A running cluster in ``directory``, on ``port``."""

    def __init__(self, binaries: Path, directory: Path, port: int) -> None:
        self._binaries = binaries
        self._directory = directory
        self.port = port

    def url(self, schema: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?schema={schema}"

    def stop(self, mode: str) -> None:
        """Stop the server: ``immediate`` is a crash (no checkpoint, recovery at the next
        start), ``fast`` a clean shutdown (each session ended with an error)."""
        self._ctl("stop", "--mode", mode, "--wait")

    def start(self) -> None:
        options = f"-p {self.port} -k {self._directory} -c listen_addresses=127.0.0.1"
        self._ctl("start", "--wait", "--options", options, "--log", str(self._directory / "server.log"))

    def _ctl(self, *arguments: str) -> None:
        _run(self._binaries / "pg_ctl", "--pgdata", str(self._directory / "data"), *arguments)


@contextlib.contextmanager
def private_server() -> Iterator[PrivateServer]:
    """A fresh cluster, started; stopped and removed afterwards."""
    binaries = _binaries()
    directory = Path(tempfile.mkdtemp(prefix="dtfx-private-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
    try:
        _run(
            binaries / "initdb", "--pgdata", str(directory / "data"), "--auth=trust", "--username=postgres", "--no-sync"
        )
        server = PrivateServer(binaries, directory, _free_port())
        server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(RuntimeError):  # a test may leave it stopped
                server.stop("immediate")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _binaries() -> Path:
    """Where the server's programs are (``pg_config --bindir``, or else where ``PATH`` finds
    ``initdb``); skips the test (fails it in CI) when they are not installed."""
    places: list[Path] = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        places.append(Path(found.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb is not None:
        places.append(Path(initdb).parent)
    for place in places:
        if (place / "initdb").exists() and (place / "pg_ctl").exists():
            return place
    reason = "PostgreSQL's server programs (initdb, pg_ctl) are not installed: neither pg_config nor PATH finds them"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _run(program: Path, *arguments: str) -> None:
    command = [str(program), *arguments]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {completed.stderr or completed.stdout}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
