"""A TCP proxy between a test's client and a real server, for faults on the way between them."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards connections made to :attr:`address` to ``port`` on this host, until told otherwise.

    :meth:`fall_silent`: a host that vanishes (nothing forwarded, nothing closed).
    :meth:`go_down` and :meth:`come_up`: a server that stops and starts again (its connections
    closed, new ones refused meanwhile, then taken again on the same port).
    """

    def __init__(self, port: int) -> None:
        self._port = port
        self._lock = threading.Lock()
        self._silent = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port: int = self._listen(socket.create_server(("127.0.0.1", 0)))
        self.address = f"127.0.0.1:{self.port}"

    def _listen(self, listener: socket.socket) -> int:
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        port: int = listener.getsockname()[1]
        return port

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                near, _ = listener.accept()
                try:
                    far = socket.create_connection(("127.0.0.1", self._port))
                except OSError:  # the server is away: the client's connection ends with it
                    near.close()
                    raise
                with self._lock:
                    if listener is not self._listener:  # went down while this one was being taken
                        near.close()
                        far.close()
                        return
                    self._sockets += [near, far]
                for source, sink in ((near, far), (far, near)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while (data := source.recv(65536)) and not self._silent.is_set():
                sink.sendall(data)
            if not self._silent.is_set():
                sink.shutdown(socket.SHUT_WR)  # pass the end on

    def fall_silent(self) -> None:
        """Forward nothing more, and close nothing."""
        self._silent.set()

    def go_down(self) -> None:
        """Close every connection and take no new one (a connection attempt is refused)."""
        with self._lock:
            listener, self._listener = self._listener, None
            opened, self._sockets = self._sockets, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() that close() alone would not
            listener.close()
        for connection in opened:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def come_up(self) -> None:
        """Take connections on the same port again."""
        self._listen(socket.create_server(("127.0.0.1", self.port)))

    def close(self) -> None:
        self.go_down()
