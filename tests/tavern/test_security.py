"""The Tavern's security policy: bind, Host, token, same-origin writes, headers, body size."""

from __future__ import annotations

import os
import socket

import pytest

from core.config import RealmConfig
from tavern.app import close_app, create_app
from tavern.security import (
    CONTENT_SECURITY_POLICY,
    TOKEN_COOKIE,
    TavernSecurityError,
    check_bind,
    is_loopback,
)
from tavern.server import make_tavern_server, run

TOKEN = "s3cret-token-with-enough-entropy"


def alive_daemon(realm):
    """A daemon kv as the real daemon writes it (this process's pid, so it counts as running)."""
    from core.ledger import Ledger

    ledger = Ledger(realm.ledger_path)
    ledger.set_value("daemon", {"state": "training", "pid": os.getpid(), "global_step": 0})
    ledger.close()


@pytest.fixture
def token_app(tavern_realm):
    config = RealmConfig.model_validate({"tavern": {"access_token": TOKEN, "host": "0.0.0.0"}})
    application = create_app(tavern_realm, config, testing=True)
    yield application
    close_app(application)


# bind ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(host)
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_non_loopback_bind_without_token_refuses_to_start(host, tavern_realm):
    assert not is_loopback(host)
    with pytest.raises(TavernSecurityError, match="access_token"):
        check_bind(host, None)
    with pytest.raises(TavernSecurityError):
        check_bind(host, "   ")
    check_bind(host, TOKEN)  # with a token it is allowed
    with pytest.raises(ValueError, match="tavern.access_token"):  # the CLI catches ValueError
        run(tavern_realm, RealmConfig(), host=host, port=0)


def test_refused_bind_never_listens(tavern_realm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TavernSecurityError):
        make_tavern_server(tavern_realm, RealmConfig(), host="0.0.0.0", port=port)
    with socket.socket() as probe:  # nothing listens on that port
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_config_host_is_checked_too(tavern_realm):
    config = RealmConfig.model_validate({"tavern": {"host": "0.0.0.0"}})
    with pytest.raises(TavernSecurityError):
        make_tavern_server(tavern_realm, config, port=0)


# same-origin writes ------------------------------------------------------------------------------
def test_cross_origin_post_is_refused(client, tavern_realm):
    alive_daemon(tavern_realm)
    r = client.post("/api/controls/pause", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.get_json()["error"]
    r = client.post("/api/controls/pause", headers={"Origin": "null"})
    assert r.status_code == 403
    r = client.post("/api/controls/pause", headers={"Origin": "https://localhost"})  # other scheme
    assert r.status_code == 403
    r = client.post("/api/controls/pause", headers={"Referer": "http://evil.example/page"})
    assert r.status_code == 403
    r = client.post("/api/controls/pause")  # no Origin, no Referer, no CSRF token
    assert r.status_code == 403 and "X-CSRF-Token" in r.get_json()["error"]
    assert client.application.extensions["tavern"].ledger.query("SELECT COUNT(*) AS n FROM commands")[0]["n"] == 0


def test_same_origin_post_and_csrf_token_are_accepted(client, app, tavern_realm):
    alive_daemon(tavern_realm)
    assert client.post("/api/controls/pause", headers={"Origin": "http://localhost"}).status_code == 202
    assert client.post("/api/controls/resume", headers={"Referer": "http://localhost/"}).status_code == 202
    csrf = app.config["TAVERN_CSRF_TOKEN"]
    assert client.post("/api/controls/pause", headers={"X-CSRF-Token": csrf}).status_code == 202
    assert client.post("/api/controls/pause", headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    # the token is in every page for the JS helper
    assert f'name="csrf-token" content="{csrf}"' in client.get("/").get_data(as_text=True)


def test_state_changing_routes_refuse_get(client):
    assert client.get("/api/controls/pause").status_code in (404, 405)


def test_dns_rebinding_host_is_refused_without_a_token(client):
    r = client.get("/api/status", headers={"Host": "attacker.example:8888"})
    assert r.status_code == 403
    assert client.get("/api/status", headers={"Host": "127.0.0.1:8888"}).status_code == 200


# token ---------------------------------------------------------------------------------------------
def test_token_required_on_every_request_when_configured(token_app):
    c = token_app.test_client()
    for path in ("/", "/api/status", "/system", "/static/js/tavern.js", "/api/history"):
        r = c.get(path, headers={"Host": "tavern.lan:8888"})
        assert r.status_code == 401, path
    assert c.get("/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # any Host is fine once a token guards the Tavern (bound beyond loopback)
    assert c.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}",
                                         "Host": "tavern.lan:8888"}).status_code == 200


def test_token_login_sets_a_cookie_and_strips_the_token(token_app):
    c = token_app.test_client()
    assert c.get("/system?token=nope").status_code == 401
    r = c.get(f"/system?token={TOKEN}&x=1")
    assert r.status_code == 302 and r.headers["Location"] == "/system?x=1"
    cookie = r.headers["Set-Cookie"]
    assert TOKEN_COOKIE in cookie and TOKEN not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/system").status_code == 200  # the cookie now authenticates
    assert c.get("/api/status").status_code == 200


def test_socketio_path_requires_the_token(token_app):
    c = token_app.test_client()
    r = c.get("/socket.io/?EIO=4&transport=polling")
    assert r.status_code == 401
    r = c.get("/socket.io/?EIO=4&transport=polling", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and b"sid" in r.data


def test_socketio_refuses_foreign_host_without_token(client):
    assert client.get("/socket.io/?EIO=4&transport=polling",
                      headers={"Host": "attacker.example"}).status_code == 403
    assert client.get("/socket.io/?EIO=4&transport=polling").status_code == 200


def test_socketio_refuses_cross_origin(client):
    r = client.get("/socket.io/?EIO=4&transport=polling", headers={"Origin": "http://evil.example"})
    assert r.status_code == 400  # python-engineio: not an accepted origin


# headers and size ----------------------------------------------------------------------------------
def test_security_headers(client):
    r = client.get("/")
    csp = r.headers["Content-Security-Policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    assert client.get("/api/status").headers["Cache-Control"] == "no-store"


def test_templates_have_no_inline_scripts_or_styles():
    import re
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[2] / "tavern" / "templates").glob("*.html"):
        html = path.read_text(encoding="utf-8")
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"inline <script> in {path.name}"
        assert not re.search(r"\sstyle=", html), f"style attribute in {path.name}"
        assert not re.search(r"\son[a-z]+=", html), f"inline event handler in {path.name}"


def test_page_scripts_never_write_html_from_data():
    """Every page script builds DOM with textContent / Tavern.el; HTML sinks are banned outright."""
    import re
    from pathlib import Path

    sinks = re.compile(r"\.(innerHTML|outerHTML)\s*\+?=|insertAdjacentHTML\s*\(|document\.write\s*\(|\beval\s*\(|"
                       r"new\s+Function\s*\(")
    scripts = list((Path(__file__).resolve().parents[2] / "tavern" / "static" / "js").glob("*.js"))
    assert scripts
    for path in scripts:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not sinks.search(line), f"{path.name}:{n}: {line.strip()}"


def test_body_over_the_limit_is_refused(tavern_realm):
    config = RealmConfig.model_validate({"tavern": {"max_upload_bytes": 1024}})
    application = create_app(tavern_realm, config, testing=True)
    try:
        assert application.config["MAX_CONTENT_LENGTH"] == 1024
        c = application.test_client()
        r = c.post("/api/controls/pause", data={"csrf_token": "x", "blob": "a" * 4096})
        assert r.status_code == 413 and "1024" in r.get_json()["error"]
    finally:
        close_app(application)


def test_error_pages_escape_what_they_echo(client):
    r = client.get("/<script>alert(1)</script>")
    assert r.status_code == 404
    assert "<script>alert(1)" not in r.get_data(as_text=True)


def test_port_in_use_is_a_clear_error(tavern_realm):
    from tavern.server import TavernStartError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(TavernStartError, match=f"cannot listen on 127.0.0.1:{port}"):
            make_tavern_server(tavern_realm, RealmConfig(), port=port)


# hostile token input (issue 8) -----------------------------------------------------------------------
UNICODE_TOKEN = "pässwort-ünicode"


def _raw_get(url: str, path: str, headers: dict[str, bytes]) -> int:
    """GET with header values sent as the given raw bytes (what curl sends for UTF-8 text); the status."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("GET", path)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("configured", [TOKEN, UNICODE_TOKEN])
def test_non_ascii_token_input_is_a_401_never_a_500(tavern_realm, configured):
    from tests.tavern.conftest import running_tavern

    config = RealmConfig.model_validate({"tavern": {"access_token": configured}})
    with running_tavern(tavern_realm, config) as live:
        for path, headers in [
            ("/api/status", {"Authorization": "Bearer é".encode()}),
            ("/api/status", {"Authorization": b"Bearer \xe9\xff"}),
            ("/api/status?token=%C3%A9", {}),
            ("/api/status?token=%FF", {}),
            ("/api/status", {"Cookie": b"tavern_token=\xe9"}),
            ("/api/status", {"Cookie": "tavern_token=é".encode()}),
            ("/socket.io/?EIO=4&transport=polling", {"Authorization": "Bearer é".encode()}),
            ("/socket.io/?EIO=4&transport=polling", {"Cookie": b"tavern_token=\xe9"}),
        ]:
            assert _raw_get(live.url, path, headers) == 401, (path, headers)
        # the right token, sent as UTF-8 bytes, opens every door
        right = f"Bearer {configured}".encode()
        assert _raw_get(live.url, "/api/status", {"Authorization": right}) == 200
        assert _raw_get(live.url, "/socket.io/?EIO=4&transport=polling", {"Authorization": right}) == 200
        from urllib.parse import quote

        assert _raw_get(live.url, f"/system?token={quote(configured)}", {}) == 302


def test_non_ascii_csrf_header_is_a_403_never_a_500(client):
    r = client.post("/api/controls/pause", headers={"X-CSRF-Token": "é"})
    assert r.status_code == 403


def test_unicode_token_login_cookie_then_authenticates(tavern_realm):
    from urllib.parse import quote

    config = RealmConfig.model_validate({"tavern": {"access_token": UNICODE_TOKEN}})
    application = create_app(tavern_realm, config, testing=True)
    try:
        c = application.test_client()
        assert c.get(f"/system?token={quote(UNICODE_TOKEN)}").status_code == 302
        assert c.get("/api/status").status_code == 200  # the cookie set by that login
    finally:
        close_app(application)


def test_referer_with_another_scheme_is_cross_origin(client, tavern_realm):
    alive_daemon(tavern_realm)
    for referer in ("https://localhost/", "https://localhost/quests", "ftp://localhost/"):
        r = client.post("/api/controls/pause", headers={"Referer": referer})
        assert r.status_code == 403 and "cross-origin" in r.get_json()["error"], referer
    for origin in ("https://localhost", "ws://localhost"):
        assert client.post("/api/controls/pause", headers={"Origin": origin}).status_code == 403
    assert client.post("/api/controls/pause", headers={"Referer": "http://localhost/quests"}).status_code == 202
