"""Serving the Tavern: ``run(realm, config, host=None, port=None)``.

Werkzeug's threaded server with Flask-SocketIO in ``threading`` mode (WebSocket via simple-websocket):
enough for one user's dashboard on localhost with a few tabs; no eventlet/gevent monkey-patching.
A flood cannot pin its threads (:class:`TavernWSGIServer`): at most :data:`MAX_CONNECTIONS` connections
are served at once (one more is answered 503 and closed), a request line and headers must arrive with
no pause over :data:`HEADER_TIMEOUT_SECONDS` (an idle keep-alive connection is closed after as long), and
any later read or write may stall at most :data:`IO_TIMEOUT_SECONDS`. Socket.IO websockets are exempt
from that last timeout: engine.io pings them and drops one that stops answering.
:func:`check_bind` runs *before* anything listens: a non-loopback host without ``tavern.access_token``
raises :class:`tavern.security.TavernSecurityError` (a ``ValueError``) with the fix in its message.
"""

from __future__ import annotations

import logging
import signal
import threading

from flask import Flask
from werkzeug.serving import BaseWSGIServer, ThreadedWSGIServer, WSGIRequestHandler

from core.config import RealmConfig
from core.realm import Realm
from tavern.app import close_app, create_app
from tavern.security import check_bind

log = logging.getLogger(__name__)


MAX_CONNECTIONS = 128  # served at once (a browser tab holds one or two; threads are the cost)
HEADER_TIMEOUT_SECONDS = 10.0
IO_TIMEOUT_SECONDS = 60.0
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 34\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\nthe Tavern has too many connections")


class TavernStartError(ValueError):
    """Raised when the Tavern cannot listen (address in use, no permission, unknown host)."""


class TavernRequestHandler(WSGIRequestHandler):
    """Werkzeug's handler with the server's timeouts (see the module doc)."""

    server: TavernWSGIServer

    def handle_one_request(self) -> None:
        self.connection.settimeout(self.server.header_timeout_seconds)  # the request line and headers
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:  # headers in; a websocket then lives as long as engine.io's pings say
            websocket = self.headers.get("Upgrade", "").lower() == "websocket"
            self.connection.settimeout(None if websocket else self.server.io_timeout_seconds)
        return ok

    def log_error(self, format: str, *args) -> None:
        if format.startswith("Request timed out"):
            return  # a half-open or idle keep-alive connection dropped: routine, not an error
        super().log_error(format, *args)


class TavernWSGIServer(ThreadedWSGIServer):
    """One thread per connection, at most ``max_connections`` at once; timeouts in seconds."""

    def __init__(self, host: str, port: int, app, *, max_connections: int = MAX_CONNECTIONS,
                 header_timeout_seconds: float = HEADER_TIMEOUT_SECONDS,
                 io_timeout_seconds: float = IO_TIMEOUT_SECONDS):
        self.header_timeout_seconds, self.io_timeout_seconds = header_timeout_seconds, io_timeout_seconds
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(host, port, app, handler=TavernRequestHandler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:  # full: say so at once rather than queue behind connections that may never speak
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_tavern_server(realm: Realm, config: RealmConfig | None = None, host: str | None = None,
                       port: int | None = None, **limits) -> tuple[BaseWSGIServer, Flask]:
    """Check the bind policy, build the app and bind the socket (port 0 picks a free port; the bound one is
    ``server.server_port``). ``limits``: :class:`TavernWSGIServer`'s ``max_connections``,
    ``header_timeout_seconds``, ``io_timeout_seconds`` (the module's constants by default).

    Raises ``TavernSecurityError``, or :class:`TavernStartError` when the address cannot be bound (both are
    ``ValueError``: the CLI prints them and exits with its config code)."""
    config = config or realm.load_config()
    host = host or config.tavern.host
    port = config.tavern.port if port is None else port
    check_bind(host, config.tavern.access_token)
    app = create_app(realm, config)
    try:
        server = TavernWSGIServer(host, port, app, **limits)
    except (OSError, SystemExit) as exc:  # Werkzeug turns "address in use" into sys.exit(1)
        close_app(app)
        reason = exc.strerror if isinstance(exc, OSError) else "address in use or not available"
        raise TavernStartError(f"cannot listen on {host}:{port}: {reason} (another Tavern on this port? "
                               "set tavern.port in config.json or pass --port)") from exc
    except BaseException:
        close_app(app)
        raise
    return server, app


def run(realm: Realm, config: RealmConfig | None = None, host: str | None = None,
        port: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT (then close cleanly). Blocks."""
    server, app = make_tavern_server(realm, config, host, port)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per API poll
    url_host = f"[{server.host}]" if ":" in server.host else server.host
    log.info("Tavern on http://%s:%d/ (realm %s)", url_host, server.server_port, realm.root)
    print(f"Tavern on http://{url_host}:{server.server_port}/", flush=True)
    if threading.current_thread() is threading.main_thread():
        def _stop(signum, frame):
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        close_app(app)
