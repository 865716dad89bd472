"""A real HTTP server on 127.0.0.1 for the download and webhook tests (standard library only).

``serve(routes)`` runs a ``ThreadingHTTPServer`` in a thread; ``routes`` maps a path to a function
``handler(request_handler)`` that writes the whole answer (status, headers, body, or a cut connection).
``Receiver`` records every POST it gets (headers and raw body) and can be started late on a reserved port.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[[BaseHTTPRequestHandler], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Route] = {}
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server's naming)
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            body = b"not here"
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        route(self)

    def do_POST(self):  # noqa: N802
        route = self.routes.get("POST " + self.path.split("?", 1)[0]) or self.routes.get("POST *")
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        route(self)


@contextmanager
def serve(routes: dict[str, Route], port: int = 0):
    """Yield the base URL (``http://127.0.0.1:PORT``) of a server answering ``routes``."""
    handler = type("Handler", (_Handler,), {"routes": routes})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def send_bytes(data: bytes, content_type: str = "application/octet-stream", headers: dict | None = None) -> Route:
    """A route answering 200 with ``data`` and its Content-Length."""
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    return route


def cut_half_way(data: bytes) -> Route:
    """A route announcing ``len(data)`` bytes, sending half of them, then closing the connection."""
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[: len(data) // 2])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)
    return route


def announce_length(length: int, send: bytes = b"") -> Route:
    """A route announcing ``length`` bytes in Content-Length (and sending only ``send``)."""
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        h.wfile.write(send)
        h.close_connection = True
    return route


def stream_without_length(chunk: bytes, times: int) -> Route:
    """A route with no Content-Length (the body ends when the connection closes) sending ``chunk`` x
    ``times``."""
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            for _ in range(times):
                h.wfile.write(chunk)
        except OSError:  # the client hung up (it stopped at its size limit)
            pass
        h.close_connection = True
    return route


def redirect(location: str) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


class Receiver:
    """A webhook receiver: records each POST (``headers`` dict, raw ``body``) and answers ``status``.
    ``start()`` may be called late, on the port reserved at construction (a receiver that was down)."""

    def __init__(self, port: int | None = None, status: int = 204):
        self.port = port or free_port()
        self.status = status
        self.received: list[dict] = []
        self._lock = threading.Lock()
        self._cm = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _route(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            self.received.append({"headers": {k.lower(): v for k, v in h.headers.items()}, "body": body})
        h.send_response(self.status)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def start(self) -> Receiver:
        self._cm = serve({"POST /hook": self._route}, port=self.port)
        self._cm.__enter__()
        return self

    def stop(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.received)
