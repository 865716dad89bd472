"""The Tavern's HTTP server under a connection flood (issue 8: 400 half-open connections held 400 threads
forever): connections are capped, a request must arrive within a header timeout, and Socket.IO websockets
are exempt from the I/O timeout (engine.io's own pings end dead ones)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from tests.conftest import wait_for

HALF_OPEN = 400


def _serve(realm, **limits):
    from tavern.server import make_tavern_server

    server, app = make_tavern_server(realm, host="127.0.0.1", port=0, **limits)
    thread = threading.Thread(target=server.serve_forever, name="tavern-test-server", daemon=True)
    thread.start()
    return server, app, thread


def _close(server, app, thread):
    from tavern.app import close_app

    server.shutdown()
    server.server_close()
    thread.join(5)
    close_app(app)


def _handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("Thread-") and "process_request" in t.name)


def test_half_open_connections_are_capped_and_timed_out(tavern_realm):
    server, app, thread = _serve(tavern_realm, max_connections=64, header_timeout_seconds=5.0)
    url = f"http://127.0.0.1:{server.server_port}"
    socks = []
    try:
        for i in range(HALF_OPEN):
            s = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
            s.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else b"")  # never finished
            socks.append(s)
        time.sleep(0.3)
        assert _handler_threads() <= 64  # not one thread per connection
        # the connections beyond the cap were answered 503 at once and closed, not left hanging
        socks[-1].settimeout(5)
        assert socks[-1].recv(200).startswith(b"HTTP/1.1 503")
        # within the header timeout every half-open connection is dropped, and the Tavern answers again
        wait_for(lambda: _handler_threads() == 0, timeout=15, what="half-open connections dropped")
        with urllib.request.urlopen(url + "/api/status", timeout=10) as resp:
            assert resp.status == 200 and "daemon" in json.loads(resp.read())
    finally:
        for s in socks:
            s.close()
        _close(server, app, thread)


def test_a_slow_but_live_request_is_served(tavern_realm):
    server, app, thread = _serve(tavern_realm, header_timeout_seconds=1.0, io_timeout_seconds=2.0)
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
            for piece in (b"GET /api/status HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"Connection: close\r\n\r\n"):
                s.sendall(piece)
                time.sleep(0.5)  # each piece within the header timeout
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
    finally:
        _close(server, app, thread)


def test_a_socketio_websocket_outlives_the_io_timeout(tavern_realm):
    """A real websocket (RFC 6455, Engine.IO 4 framing) idle for 3x the I/O timeout still gets pushes."""
    simple_websocket = pytest.importorskip("simple_websocket")
    from tavern.extensions import socketio

    server, app, thread = _serve(tavern_realm, header_timeout_seconds=0.5, io_timeout_seconds=0.5)
    ws = simple_websocket.Client.connect(f"ws://127.0.0.1:{server.server_port}/socket.io/?EIO=4&transport=websocket")
    try:
        assert ws.receive(timeout=10).startswith("0{")  # engine.io open
        ws.send("40")  # socket.io connect, default namespace
        assert ws.receive(timeout=10).startswith("40")
        time.sleep(1.5)  # idle three times the I/O timeout
        with app.app_context():
            socketio.emit("probe", {"n": 1})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = ws.receive(timeout=10)
            if msg and msg.startswith('42["probe"'):
                break
        else:
            raise AssertionError("no push after the idle time")
    finally:
        ws.close()
        _close(server, app, thread)
