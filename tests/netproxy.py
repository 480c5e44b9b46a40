"""A TCP proxy a test can cut and heal, to break a link between two node processes
without touching either (a real network partition on loopback)."""

from __future__ import annotations

import selectors
import socket
import threading


class CuttableProxy:
    """Forwards 127.0.0.1:listen_port to 127.0.0.1:target_port on a thread.
    `cut()` drops every connection and refuses new ones until `heal()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ, None)
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._cut = False
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for sock in list(self._pairs):
                self._drop(sock)

    def heal(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._server.close()

    def _drop(self, sock: socket.socket) -> None:
        other = self._pairs.pop(sock, None)
        for s in (sock, other):
            if s is None:
                continue
            self._pairs.pop(s, None)
            try:
                self._selector.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select(timeout=0.05):
                with self._lock:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._server:
                        client, _ = self._server.accept()
                        if self._cut:
                            client.close()
                            continue
                        try:
                            upstream = socket.create_connection(("127.0.0.1", self.target_port))
                        except OSError:
                            client.close()
                            continue
                        self._pairs[client] = upstream
                        self._pairs[upstream] = client
                        for s in (client, upstream):
                            self._selector.register(s, selectors.EVENT_READ, None)
                        continue
                    if sock not in self._pairs:
                        continue
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(sock)
                        continue
                    try:
                        self._pairs[sock].sendall(data)
                    except OSError:
                        self._drop(sock)
