"""The fault-injecting proxy that the connection-loss tests stand on."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.proxy import TcpProxy


@pytest.fixture
def listening_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))  # the kernel completes connections; none is read
    yield server.getsockname()[1]
    server.close()


def test_a_proxy_gone_down_refuses_the_next_connection_too(listening_port: int) -> None:
    # Its listener waits in accept() on another thread, which closing the socket does not end.
    proxy = TcpProxy(listening_port)
    try:
        time.sleep(0.05)  # let the listener's thread reach accept()
        proxy.go_down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        proxy.come_up()
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
    finally:
        proxy.close()
