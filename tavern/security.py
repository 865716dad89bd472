"""The Tavern's security policy, in one place.

- **Bind.** Loopback by default. :func:`check_bind` refuses any other address without ``tavern.access_token``.
- **Host header.** Without an access token only loopback ``Host`` names are served (``localhost``,
  ``127.x.x.x``, ``[::1]``), so a DNS-rebinding page cannot reach the Tavern through its own domain name.
- **Access token** (when configured, on *every* request, Socket.IO included): ``Authorization: Bearer
  <token>``, or the ``tavern_token`` cookie set after opening any page once with ``?token=<token>``
  (the token is then stripped from the address by a redirect). Compared in constant time, as bytes (a
  token may be any UTF-8 text; a header carrying other bytes is simply wrong: 401).
- **Cross-origin writes.** Every method but GET/HEAD/OPTIONS must come from our own origin: an ``Origin``
  (or, without one, ``Referer``) header naming this scheme and host, else a valid ``X-CSRF-Token`` header or
  ``csrf_token`` form field, else an ``Authorization`` header (API clients such as ``openai``; browsers never
  add one by themselves). Browsers send ``Origin`` on every POST (Fetch standard), so a cross-site form or
  ``fetch`` is refused with 403. Socket.IO connections are limited to the same origin by python-engineio
  (``cors_allowed_origins`` left at its same-origin default).
- **Plain API clients on loopback** (:func:`plain_api_client`). Without an access token, a request to the
  OpenAI-compatible API (``/v1/...``) that carries neither ``Origin`` nor ``Referer`` -- curl, scripts,
  SDKs, as llama.cpp, vLLM and Ollama serve them -- from a loopback address is served without the CSRF
  token. A browser always sends ``Origin`` with a POST, so a cross-origin page is still refused; the
  Tavern's own pages and ``/api`` keep the rule above.
- **Headers.** A Content-Security-Policy without ``'unsafe-inline'`` (all JS and CSS are files under
  ``/static``; page data comes from ``/api`` or ``data-*`` attributes), ``frame-ancestors 'none'``,
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin``; ``Cache-Control: no-store`` on
  ``/api`` answers.
- **Escaping.** Jinja autoescapes every template; page scripts write data with ``textContent`` (the
  ``Tavern.el`` helper), never ``innerHTML``. Paths from requests go through ``Realm.confine``.
- **Size.** ``MAX_CONTENT_LENGTH`` = ``tavern.max_upload_bytes`` (413 beyond it), set by ``create_app``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Iterable
from urllib.parse import urlencode, urlsplit

from flask import Flask, Response, jsonify, redirect, render_template, request
from markupsafe import escape

TOKEN_COOKIE = "tavern_token"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FORM_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SOCKETIO_PATH = "/socket.io"
OPENAI_API_PREFIX = "/v1/"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)


class TavernSecurityError(ValueError):
    """Raised when the Tavern is asked to start in an unsafe way (e.g. a public bind without a token)."""


# bind --------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1`` (brackets allowed). ``0.0.0.0`` is not."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, access_token: str | None) -> None:
    """Refuse to serve beyond loopback without an access token.

    Raises :class:`TavernSecurityError` naming the config key to set.
    """
    if not is_loopback(host) and not (access_token or "").strip():
        raise TavernSecurityError(
            f"refusing to bind the Tavern to {host!r} without an access token: anyone on the network could "
            "control training. Set tavern.access_token in config.json (a long random string), or bind "
            "127.0.0.1.")


# tokens ----------------------------------------------------------------------------------------
def cookie_value(access_token: str) -> str:
    """The cookie proving a past ``?token=`` login: SHA-256 of the token (the token itself is not stored)."""
    return hashlib.sha256(b"tavern-cookie:" + access_token.encode("utf-8")).hexdigest()


def csrf_token(secret_key: bytes | str) -> str:
    """The CSRF token of this app (HMAC-SHA256 of a fixed label under the app's secret key), hex."""
    key = secret_key.encode("utf-8") if isinstance(secret_key, str) else secret_key
    return hmac.new(key, b"tavern-csrf", hashlib.sha256).hexdigest()


def wire_bytes(value: str) -> bytes:
    """The bytes a client sent for a header or cookie value. WSGI hands them over as latin-1 code points
    (PEP 3333), so a UTF-8 token typed by curl arrives as mojibake that this turns back into its bytes;
    anything else (a decoded query string) is encoded as UTF-8."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def same_secret(given: bytes, expected: bytes) -> bool:
    """Constant-time comparison of two byte strings (``hmac.compare_digest`` refuses non-ASCII ``str``)."""
    return hmac.compare_digest(given, expected)


def _token_ok(access_token: str, headers, cookies, query_token: str | None = None) -> bool:
    expected = access_token.encode("utf-8", "surrogateescape")
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer " and same_secret(wire_bytes(auth[7:].strip()), expected):
        return True
    cookie = cookies.get(TOKEN_COOKIE, "")
    if cookie and same_secret(wire_bytes(cookie), cookie_value(access_token).encode("ascii")):
        return True
    return bool(query_token) and same_secret(query_token.encode("utf-8", "surrogateescape"), expected)


def host_allowed(host_header: str, access_token: str | None) -> bool:
    """Any Host when a token guards the Tavern; otherwise loopback names only (anti DNS rebinding)."""
    if access_token:
        return True
    hostname = urlsplit(f"//{host_header}").hostname or ""
    return is_loopback(hostname)


# origin ----------------------------------------------------------------------------------------
def same_origin_reason(method: str, headers, host: str, scheme: str, expected_csrf: str,
                       form_token: Callable[[], str | None] = lambda: None) -> str | None:
    """Why a request must be refused as cross-origin, or None when it may proceed.

    ``host`` is the request's Host (with port), ``scheme`` http/https; ``form_token`` is called (parsing
    the form) only when neither Origin nor Referer is present.
    """
    if method.upper() in SAFE_METHODS:
        return None
    origin = headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or parts.netloc.lower() != host.lower() or parts.scheme != scheme:
            return f"cross-origin request refused (Origin {origin!r} is not {scheme}://{host})"
        return None
    referer = headers.get("Referer")
    if referer:
        parts = urlsplit(referer)
        if parts.netloc.lower() != host.lower() or parts.scheme != scheme:
            return f"cross-origin request refused (Referer is not on {scheme}://{host})"
        return None
    given = headers.get(CSRF_HEADER) or form_token() or ""
    if given and same_secret(wire_bytes(given), expected_csrf.encode("ascii")):
        return None
    if headers.get("Authorization"):
        return None
    return (f"request refused: no Origin or Referer header; send the {CSRF_HEADER} header (see the "
            "csrf-token meta tag) or an Authorization header")


def plain_api_client(rule: str | None, headers, remote_addr: str | None, access_token: str | None) -> bool:
    """True for a non-browser client of the OpenAI-compatible API on loopback with no access token
    configured: the request matched a ``/v1/`` route (``rule``: the URL rule Flask matched, not the raw
    path), it has no ``Origin`` and no ``Referer`` header, and its peer address is loopback."""
    return (not access_token and (rule or "").startswith(OPENAI_API_PREFIX) and headers.get("Origin") is None
            and not headers.get("Referer") and is_loopback(remote_addr or ""))


# responses -------------------------------------------------------------------------------------
def wants_json() -> bool:
    p = request.path
    return p.startswith(("/api/", "/v1/")) or request.accept_mimetypes.best == "application/json"


def refuse(status: int, message: str) -> Response:
    """A JSON error for API paths (``{"error": message}``), a small HTML page otherwise."""
    if wants_json():
        resp = jsonify(error=message)
    else:
        try:
            html = render_template("error.html", status=status, message=message)
        except Exception:  # template folder missing in a broken install: still answer plainly
            html = f"<!doctype html><title>{status}</title><p>{escape(message)}</p>"
        resp = Response(html, mimetype="text/html")
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="tavern"'
    return resp


# installation ----------------------------------------------------------------------------------
def install(app: Flask, access_token: str | None) -> None:
    """Register the request checks and response headers on ``app``. ``app.secret_key`` must be set."""
    token = (access_token or "").strip() or None
    app.config["TAVERN_CSRF_TOKEN"] = csrf_token(app.secret_key)

    @app.before_request
    def _guard():
        if not host_allowed(request.host, token):
            return refuse(403, f"Host {request.host!r} refused: without tavern.access_token the Tavern "
                          "answers only to localhost / 127.0.0.1")
        if token:
            query_token = request.args.get("token")
            if not _token_ok(token, request.headers, request.cookies, query_token):
                return refuse(401, "access token required: send 'Authorization: Bearer <token>' or open "
                              "this page once with ?token=<token>")
            if query_token and request.method == "GET":
                args = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
                resp = redirect(request.path + (f"?{urlencode(args)}" if args else ""))
                resp.set_cookie(TOKEN_COOKIE, cookie_value(token), httponly=True, samesite="Strict",
                                secure=request.scheme == "https", path="/")
                return resp
        reason = same_origin_reason(request.method, request.headers, request.host, request.scheme,
                                    app.config["TAVERN_CSRF_TOKEN"], _form_token)
        rule = request.url_rule.rule if request.url_rule is not None else None
        if reason and not plain_api_client(rule, request.headers, request.remote_addr, token):
            return refuse(403, reason)
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        h = resp.headers
        h.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "same-origin")
        h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        if request.path.startswith(("/api/", "/v1/")):
            h.setdefault("Cache-Control", "no-store")
        return resp

    @app.context_processor
    def _inject():
        return {"csrf_token": app.config["TAVERN_CSRF_TOKEN"]}


def _form_token() -> str | None:
    if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return request.form.get(CSRF_FORM_FIELD)
    return None


class SocketGuard:
    """WSGI middleware in front of Socket.IO's path: the Host and token checks of :func:`install`, which
    Flask's ``before_request`` does not see (Flask-SocketIO answers ``/socket.io`` before Flask)."""

    def __init__(self, wsgi_app: Callable, access_token: str | None, path: str = SOCKETIO_PATH):
        self.wsgi_app = wsgi_app
        self.token = (access_token or "").strip() or None
        self.path = path

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith(self.path):
            from werkzeug.wrappers import Request

            req = Request(environ)
            if not host_allowed(req.host, self.token):
                return _plain(start_response, "403 Forbidden", b"Host refused")
            if self.token and not _token_ok(self.token, req.headers, req.cookies):
                return _plain(start_response, "401 Unauthorized", b"access token required")
        return self.wsgi_app(environ, start_response)


def _plain(start_response: Callable, status: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
