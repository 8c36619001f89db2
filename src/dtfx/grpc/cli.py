"""``dtfx serve``: the gRPC sidecar server, for workers and clients written with the official SDKs.

The command imports gRPC only when it runs, so the rest of the ``dtfx`` command
works without the ``grpc`` extra.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from dtfx.backends import default_url
from dtfx.backends.urls import redact
from dtfx.cli.options import BackendUrl, Verbosity
from dtfx.cli.root import configure_logging, run_async, stderr
from dtfx.cli.serving import run_until_signalled
from dtfx.cli.session import started_backend
from dtfx.grpc.options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PORT,
    MAX_HEALTH_PING_INTERVAL,
    SidecarOptions,
    TlsOptions,
)


@run_async
async def serve(
    backend: BackendUrl = None,
    grpc_port: Annotated[
        int,
        typer.Option(
            "--grpc-port", "-p", metavar="PORT", min=0, max=65535, help="The port to listen on (0: any free port)."
        ),
    ] = DEFAULT_PORT,
    host: Annotated[
        str,
        typer.Option(
            "--host", metavar="ADDRESS", help="The address to listen on; 0.0.0.0 or [::] for every interface."
        ),
    ] = "localhost",
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert", exists=True, dir_okay=False, metavar="PEM", help="Serve TLS with this certificate chain."
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", exists=True, dir_okay=False, metavar="PEM", help="The private key of --tls-cert."),
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-client-ca",
            exists=True,
            dir_okay=False,
            metavar="PEM",
            help="Require client certificates signed by this CA (mutual TLS).",
        ),
    ] = None,
    health_ping: Annotated[
        float,
        typer.Option(
            "--health-ping",
            min=0.1,
            max=MAX_HEALTH_PING_INTERVAL.total_seconds(),
            metavar="SECONDS",
            help="Ping quiet worker streams this often.",
        ),
    ] = SidecarOptions.health_ping_interval.total_seconds(),
    max_message_mib: Annotated[
        int,
        typer.Option(
            "--max-message-mib",
            min=1,
            metavar="MIB",
            help="The largest message taken, in MiB; raise the SDK workers' and clients' limit with it.",
        ),
    ] = DEFAULT_MAX_MESSAGE_BYTES >> 20,
    verbose: Verbosity = 0,
) -> None:
    """Serve the Durable Task sidecar protocol (gRPC) on the task hub, until Ctrl-C or SIGTERM.

    Workers and clients written with the official Durable Task SDKs connect as to their own
    sidecar (the Python SDK's default address is localhost:4001) and share the task hub with
    native dtfx workers.
    """
    configure_logging(verbose)
    from dtfx.grpc import SidecarServer  # needs the grpc extra; the error says so

    tls = _tls(tls_cert, tls_key, tls_client_ca)
    options = SidecarOptions(
        health_ping_interval=timedelta(seconds=health_ping), max_message_bytes=max_message_mib << 20
    )
    url = backend or default_url()
    async with started_backend(url) as store:
        server = SidecarServer(store, host=host, port=grpc_port, tls=tls, options=options)
        await run_until_signalled(
            server,
            lambda: f"Sidecar listening on {server.address} ({'TLS' if tls else 'plaintext'}) over {redact(url)}",
        )
    stderr.print("Sidecar stopped.")


def _tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsOptions | None:
    if cert is None and key is None:
        if client_ca is not None:
            raise typer.BadParameter("needs --tls-cert and --tls-key", param_hint="--tls-client-ca")
        return None
    if cert is None or key is None:
        raise typer.BadParameter("TLS needs both --tls-cert and --tls-key", param_hint="--tls-cert/--tls-key")
    return TlsOptions.from_files(cert, key, client_ca)
