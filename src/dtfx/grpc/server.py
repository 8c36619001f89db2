"""The sidecar server: ``TaskHubSidecarService`` on a port, over a dtfx backend."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

import grpc
from dtfx import _collector as collector
from dtfx._portal import BackgroundRunnable
from dtfx.backends import open_backend
from dtfx.backends.base import Backend
from dtfx.backends.sqlite import SqliteBackend
from dtfx.core.errors import ConfigurationError
from dtfx.grpc.dispatch import RemoteDispatchers
from dtfx.grpc.hub import WorkerHub
from dtfx.grpc.options import DEFAULT_PORT, SidecarOptions, TlsOptions
from dtfx.grpc.protos import pb_grpc
from dtfx.grpc.service import SidecarService
from dtfx.grpc.sizes import transport_limit

logger = logging.getLogger(__name__)

_MAX_PENDING_CALLS = 1_000_000
"""Calls that may wait for the server to take them up (see ``_SERVER_OPTIONS``)."""

_SERVER_OPTIONS: list[tuple[str, int]] = [
    # Without this, a second server on a taken port would share it silently.
    ("grpc.so_reuseport", 0),
    # Keepalive pings (paced by SidecarOptions) go out even while no data does.
    ("grpc.http2.max_pings_without_data", 0),
    # Accept the keepalive pings that SDK clients may be configured to send, however often and
    # with no call open, instead of closing their connections with "too many pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
    # Calls that arrive faster than the server's loop takes them up wait in gRPC's queue, which
    # by default starts refusing them (CANCELLED, at random) past 1,000 waiting and refuses all
    # past 3,000: a client that starts a few thousand instances at once would see some fail.
    # Each waits its turn instead, within the clients' deadlines and gRPC's own bound on how long
    # a call may wait to be taken up.
    ("grpc.server.max_pending_requests", _MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_CALLS),
]


def _server_options(options: SidecarOptions) -> list[tuple[str, int]]:
    """gRPC's settings: :data:`_SERVER_OPTIONS`, and from ``options`` the size limit (see
    :mod:`dtfx.grpc.sizes`) and the keepalive pings' pace."""
    timeout_ms = _milliseconds(options.keepalive_timeout)
    return [
        *_SERVER_OPTIONS,
        ("grpc.max_receive_message_length", transport_limit(options.max_message_bytes)),
        ("grpc.keepalive_time_ms", _milliseconds(options.keepalive_interval)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # What closes a connection whose pings go unanswered, in the gRPC releases tested
        # (1.85): their keepalive timeout is not enforced, and a ping waits this long, a
        # minute by default.
        ("grpc.http2.ping_timeout_ms", timeout_ms),
    ]


def _taken_address(host: str, port: int) -> str | None:
    """One of the addresses ``host`` resolves to (``localhost``: 127.0.0.1 and ::1) where
    something listens on ``port`` already, or ``None``."""
    if port == 0:
        return None
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return None  # gRPC's bind says why
    for family, kind, protocol, _, address in resolved:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's, so TIME_WAIT is no obstacle
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return f"{address[0]}:{port}"
    return None


def _milliseconds(duration: timedelta) -> int:
    return max(1, round(duration.total_seconds() * 1000))


class SidecarServer(BackgroundRunnable):
    """Serves the Durable Task sidecar protocol, so that workers and clients written with the
    official SDKs (Python, .NET, JavaScript, Java, ...) use a dtfx task hub as their sidecar.

    SDK workers share the hub with native :class:`~dtfx.Worker` s: work is locked for a
    connected SDK worker only when it has a free slot and its work-item filters accept it.

    Use it as a context manager (``with`` runs it on a background thread, ``async with``
    on the running event loop), or call :meth:`start` / :meth:`stop`::

        with SidecarServer("sqlite:///taskhub.db", port=4001):
            ...  # TaskHubGrpcWorker(host_address="localhost:4001") connects here

    Args:
        backend: A backend object, or a URL (as for :class:`~dtfx.Worker`); a backend
            given as a URL is closed with the server. A SQLite backend's transactions all
            run on its database thread from the start on
            (:attr:`~dtfx.backends.sqlite.SqliteBackend.callers_transact` is turned off).
        host: The address to listen on; ``localhost`` by default, ``0.0.0.0`` or ``[::]``
            for every interface.
        port: The port to listen on; 0 picks a free one (see :attr:`port`).
        tls: Serve over TLS (optionally mutual TLS) instead of plaintext.
        options: Server tuning.
    """

    _thread_name = "dtfx-sidecar"

    def __init__(
        self,
        backend: Backend | str | None = None,
        *,
        host: str = "localhost",
        port: int = DEFAULT_PORT,
        tls: TlsOptions | None = None,
        options: SidecarOptions | None = None,
    ) -> None:
        super().__init__()
        self._owns_backend = not isinstance(backend, Backend)
        self.backend: Backend = backend if isinstance(backend, Backend) else open_backend(backend)
        self.host = host
        self.port = port
        self.tls = tls
        self.options = options or SidecarOptions()
        self._server: grpc.aio.Server | None = None
        self._dispatchers: RemoteDispatchers | None = None
        self._hub: WorkerHub | None = None
        self._gc_pace = collector.Hold()

    @property
    def address(self) -> str:
        """``host:port`` as an SDK's ``host_address`` (the bound port once started)."""
        return f"{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        """True between start and stop."""
        return self._server is not None

    # -- async lifecycle ----------------------------------------------------------------------

    async def start_async(self) -> None:
        """Listen and start dispatching work to SDK workers, on the running event loop.

        If starting fails (a taken port, say), a backend the server owns is closed again
        before the error is raised: the server is left with nothing open.
        """
        await self._after_the_last_stop()
        if self._server is not None:
            raise RuntimeError("The sidecar server is already running.")
        if isinstance(self.backend, SqliteBackend):
            # The loop serves every peer: transactions that waited for the disk on it would hold
            # them all up, one commit at a time.
            self.backend.callers_transact = False
        try:
            await self.backend.start()
            hub = WorkerHub(default_concurrency=self.options.default_worker_concurrency)
            server = grpc.aio.server(options=_server_options(self.options))
            service = SidecarService(self.backend, hub, self.options)
            pb_grpc.add_TaskHubSidecarServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
            port = self._bind(server)
            await server.start()
        except BaseException:
            if self._owns_backend:
                await self.backend.close()
            raise
        self.port = port
        self._dispatchers = RemoteDispatchers(self.backend, hub, self.options)
        self._dispatchers.start()
        self._hub, self._server = hub, server
        if self.options.tune_gc:
            self._gc_pace.take()
        logger.info(
            "Sidecar listening on %s (%s) over %s",
            self.address,
            "TLS" if self.tls else "plaintext",
            type(self.backend).__name__,
        )

    def _bind(self, server: grpc.aio.Server) -> int:
        address = f"{self.host}:{self.port}"
        taken = _taken_address(self.host, self.port)
        if taken is not None:  # gRPC would listen on the host's other addresses only, and say so only in its log
            raise ConfigurationError(f"Cannot listen on {address}: {taken} is taken.")
        try:
            if self.tls is None:
                port = server.add_insecure_port(address)
            else:
                credentials = grpc.ssl_server_credentials(
                    [(self.tls.private_key, self.tls.certificate_chain)],
                    root_certificates=self.tls.client_ca,
                    require_client_auth=self.tls.client_ca is not None,
                )
                port = server.add_secure_port(address, credentials)
        except RuntimeError as error:  # grpc reports a failed bind this way
            raise ConfigurationError(f"Cannot listen on {address}: {error}") from None
        if port == 0:
            raise ConfigurationError(f"Cannot listen on {address}: the address is taken or invalid.")
        return port

    async def stop_async(self, grace_period: float | None = None) -> None:
        """Stop: work out with SDK workers gets the grace period to come back, then is given back.

        A stop once begun runs to its end: a caller cancelled meanwhile leaves it running, and
        a second caller waits for it.
        """
        await super().stop_async(grace_period)

    def _begin_stop(self, grace_period: float | None) -> Coroutine[Any, Any, None]:
        server, self._server = self._server, None
        assert server is not None and self._dispatchers is not None
        self._dispatchers.begin_stop()
        grace = self.options.shutdown_grace_period.total_seconds() if grace_period is None else grace_period
        return self._end_stop(server, grace)

    async def _end_stop(self, server: grpc.aio.Server, grace: float) -> None:
        assert self._dispatchers is not None and self._hub is not None
        await self._dispatchers.stop(grace)
        self._hub.close_all()
        await server.stop(grace)
        self._gc_pace.give_back()
        if self._owns_backend:
            await self.backend.close()
        logger.info("Sidecar stopped")
