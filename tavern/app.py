"""The Tavern's Flask application factory.

``create_app(realm, config)`` builds the app: state (ledger, queue), security policy, one blueprint per
page (``home``, ``quests``, ``guild``, ``vault``, ``oracle``, ``system``, plus ``controls``, ``api``, ``downloads``
(post a quest by URL) and ``metrics`` (Prometheus)), Socket.IO and the ledger push poller. Serve it with
:func:`tavern.server.run`; never import the training loop here.
"""

from __future__ import annotations

import importlib
import logging
import os

from flask import Flask, current_app, url_for
from werkzeug.exceptions import HTTPException

from core.config import RealmConfig
from core.realm import Realm, RealmError
from tavern import params, push, security
from tavern.context import init_state, tavern_state
from tavern.extensions import socketio

log = logging.getLogger(__name__)
SOCKETIO_SERVER_KEY = "tavern.socketio_server"  # app.extensions: this app's own python-socketio Server

NAV_ITEMS = (  # label, endpoint, path used when that blueprint is not installed
    ("Home", "home.index", "/"),
    ("Quests", "quests.index", "/quests"),
    ("Guild", "guild.index", "/guild"),
    ("Schools", "schools.index", "/schools"),
    ("Vault", "vault.index", "/vault"),
    ("Oracle", "oracle.index", "/oracle"),
    ("System", "system.index", "/system"),
)
# Blueprints owned by other modules: (module, attribute). Registered when the module exists.
OPTIONAL_BLUEPRINTS = (("tavern.pages.quests", "bp"), ("tavern.pages.vault", "bp"), ("tavern.oracle", "bp"))


def create_app(realm: Realm, config: RealmConfig | None = None, *, testing: bool = False) -> Flask:
    """Build the Tavern for ``realm``. ``config`` defaults to the realm's ``config.json``.

    Raises :class:`core.config.ConfigError` for an invalid config. The app owns one ledger connection;
    :func:`close_app` stops its push poller and closes it.
    """
    config = config or realm.load_config()
    realm.ensure_layout()
    app = Flask(__name__)
    app.secret_key = os.urandom(32)
    app.config.update(
        TESTING=testing,
        MAX_CONTENT_LENGTH=config.tavern.max_upload_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
    )
    params.install(app)  # bounded <int:...> ids and JSON nesting; before any blueprint's rules
    init_state(app, realm, config)
    security.install(app, config.tavern.access_token)

    from tavern import api
    from tavern.pages import controls, downloads, guild, home, metrics, schools, system

    for bp in (home.bp, system.bp, controls.bp, api.bp, downloads.bp, metrics.bp, guild.bp, schools.bp):
        app.register_blueprint(bp)
    downloads.init_downloads(app)
    for module_name, attr in OPTIONAL_BLUEPRINTS:
        module = _optional_import(module_name)
        if module is not None:
            app.register_blueprint(getattr(module, attr))

    _register_template_helpers(app)
    _register_error_handlers(app)

    socketio.init_app(app, async_mode="threading", cors_allowed_origins=None, logger=False,
                      engineio_logger=False)
    # the SocketIO object is shared by every app of the process; its .server is the latest app's
    app.extensions[SOCKETIO_SERVER_KEY] = socketio.server
    push.init_push(app, socketio)
    oracle = _optional_import("tavern.oracle")
    if oracle is not None and hasattr(oracle, "init_oracle"):
        oracle.init_oracle(app, socketio)
    app.wsgi_app = security.SocketGuard(app.wsgi_app, config.tavern.access_token)  # type: ignore[method-assign]
    return app


def close_app(app: Flask) -> None:
    """Stop the app's push poller and oracle worker, disconnect its Socket.IO clients (browsers then reconnect
    and resync), stop Socket.IO's service thread and close its ledger (shutdown, tests)."""
    push.stop_push(app)
    exports = app.extensions.get("exports")  # tavern.pages.vault's background export jobs
    if exports is not None:
        exports.close()
    oracle = _optional_import("tavern.oracle")
    if oracle is not None and hasattr(oracle, "close_oracle"):
        oracle.close_oracle(app)  # its worker process and the threads that talk to it
    from tavern.pages.downloads import stop_downloads

    stop_downloads(app)  # background downloads into the inbox end, removing their .part files
    server = app.extensions.get(SOCKETIO_SERVER_KEY)
    eio = getattr(server, "eio", None)
    for client in list(getattr(eio, "sockets", {}).values()):
        try:  # wait=False: a polling client that never polls again must not block the shutdown
            client.close(wait=False, reason=eio.reason.SERVER_DISCONNECT)
        except Exception:
            log.exception("closing a Socket.IO client failed")
    if eio is not None:
        eio.sockets = {}
        server.shutdown()  # ends engineio's client-timeout service thread (it would run forever)
    tavern_state(app).ledger.close()


def _optional_import(module_name: str):
    """Import a teammate's module if it exists; errors *inside* an existing module propagate."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            log.info("%s is not installed; its page is skipped", module_name)
            return None
        raise


def _register_template_helpers(app: Flask) -> None:
    def nav_url(endpoint: str, fallback: str) -> str:
        return url_for(endpoint) if endpoint in current_app.view_functions else fallback

    @app.context_processor
    def _nav():
        return {"nav_items": NAV_ITEMS, "nav_url": nav_url}


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            return security.refuse(413, f"request body over the limit of {limit} bytes "
                                   "(tavern.max_upload_bytes)")
        return security.refuse(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(RealmError)
    def _realm(exc: RealmError):
        return security.refuse(403, "path refused: it resolves outside the realm")
