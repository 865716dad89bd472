"""Serving the Tavern: ``run(realm, config, host=None, port=None)``.

Werkzeug's threaded server with Flask-SocketIO in ``threading`` mode (WebSocket via simple-websocket):
enough for one user's dashboard on localhost with a few tabs; no eventlet/gevent monkey-patching.
:func:`check_bind` runs *before* anything listens: a non-loopback host without ``tavern.access_token``
raises :class:`tavern.security.TavernSecurityError` (a ``ValueError``) with the fix in its message.
"""

from __future__ import annotations

import logging
import signal
import threading

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from core.config import RealmConfig
from core.realm import Realm
from tavern.app import close_app, create_app
from tavern.security import check_bind

log = logging.getLogger(__name__)


class TavernStartError(ValueError):
    """Raised when the Tavern cannot listen (address in use, no permission, unknown host)."""


def make_tavern_server(realm: Realm, config: RealmConfig | None = None, host: str | None = None,
                       port: int | None = None) -> tuple[BaseWSGIServer, Flask]:
    """Check the bind policy, build the app and bind the socket (port 0 picks a free port; the bound one is
    ``server.server_port``). Raises ``TavernSecurityError``, or :class:`TavernStartError` when the address
    cannot be bound (both are ``ValueError``: the CLI prints them and exits with its config code)."""
    config = config or realm.load_config()
    host = host or config.tavern.host
    port = config.tavern.port if port is None else port
    check_bind(host, config.tavern.access_token)
    app = create_app(realm, config)
    try:
        server = make_server(host, port, app, threaded=True)
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
