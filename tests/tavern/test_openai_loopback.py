"""The OpenAI-compatible API answers plain clients on loopback (curl, scripts, SDKs: no Origin, no token
configured), while browsers from another origin are still refused and the Tavern's own pages keep their
CSRF rules. Real curl and the real oracle worker on stories260K; a real Chromium for the cross-origin form."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request

import pytest

from core.config import RealmConfig
from core.realm import init_realm
from tavern.app import close_app, create_app
from tests.conftest import STORIES260K, claim_threads, needs_shared
from tests.local_http import serve

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
BAD_BODY = {"model": "hero", "messages": "not a list"}  # answered 400 by the API itself, no model needed


def test_a_post_without_origin_reaches_the_openai_api_on_loopback(client):
    resp = client.post("/v1/chat/completions", json=BAD_BODY)  # what curl sends: no Origin, Referer, token
    assert resp.status_code == 400 and "messages" in resp.get_json()["error"]["message"]


def test_browsers_and_other_routes_keep_the_same_origin_rule(client, app):
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Referer": "http://evil.example/page"}):
        resp = client.post("/v1/chat/completions", json=BAD_BODY, headers=headers)
        assert resp.status_code == 403 and "cross-origin" in resp.get_json()["error"], headers
    # the same origin still passes (the Oracle page's own requests)
    assert client.post("/v1/chat/completions", json=BAD_BODY, headers={"Origin": "http://localhost"}).status_code == 400
    # the Tavern's own routes: no Origin and no CSRF token is still refused
    for path in ("/api/controls/pause", "/api/quests/fetch", "/api/oracle/ratings", "/v1/../api/controls/pause"):
        resp = client.post(path, json={})
        assert resp.status_code in (403, 404), (path, resp.status_code)
        if resp.status_code == 403:
            assert "X-CSRF-Token" in resp.get_json()["error"]
    assert client.post("/api/controls/pause", json={}).status_code == 403
    assert client.post("/api/controls/pause", headers={"X-CSRF-Token": app.config["TAVERN_CSRF_TOKEN"]}
                       ).status_code in (202, 409)
    # GET rules unchanged: pages and the models list answer, a foreign Host does not
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"Host": "attacker.example"}).status_code == 403


def test_a_non_loopback_peer_gets_no_exemption(client):
    resp = client.post("/v1/chat/completions", json=BAD_BODY, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert resp.status_code == 403


def test_with_an_access_token_plain_clients_need_it(tavern_realm):
    config = RealmConfig.model_validate({"tavern": {"access_token": "tok-with-enough-entropy-1234"}})
    application = create_app(tavern_realm, config, testing=True)
    try:
        c = application.test_client()
        assert c.post("/v1/chat/completions", json=BAD_BODY).status_code == 401
        ok = c.post("/v1/chat/completions", json=BAD_BODY,
                    headers={"Authorization": "Bearer tok-with-enough-entropy-1234"})
        assert ok.status_code == 400
    finally:
        close_app(application)


# a real server, a real model, real curl and a real browser ------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory, request):
    if not (STORIES260K / "model.safetensors").exists():
        pytest.skip(f"{STORIES260K} is absent")
    from tavern.server import make_tavern_server

    realm = init_realm(tmp_path_factory.mktemp("loopback-realm"), base_model=str(STORIES260K))
    server, application = make_tavern_server(realm, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    claim_threads(request, lambda t: t.name in ("oracle-dispatch", "QueueFeederThread"),
                  "the module's tests share one Tavern: its oracle worker (with its dispatch thread and queue "
                  "feeder) starts at the first chat request, in whichever test comes first; close_app ends them")
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)
    close_app(application)  # stops the oracle worker too


@needs_shared(STORIES260K / "model.safetensors")
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_an_answer(live):
    body = json.dumps({"model": "base", "messages": MESSAGES, "max_tokens": 8, "temperature": 0})
    out = subprocess.run(["curl", "-s", "-S", "--max-time", "120", f"{live}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["object"] == "chat.completion", answer
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["usage"]["completion_tokens"] >= 1


@needs_shared(STORIES260K / "model.safetensors")
def test_a_script_streams_without_any_header(live):
    body = json.dumps({"model": "base", "messages": MESSAGES, "max_tokens": 4, "stream": True}).encode()
    req = urllib.request.Request(f"{live}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        lines = [ln.decode().strip() for ln in resp if ln.strip()]
    assert lines[-1] == "data: [DONE]" and lines[0].startswith("data: {")


@needs_shared(STORIES260K / "model.safetensors")
@pytest.mark.slow
def test_a_cross_origin_browser_form_is_refused(live, page):
    evil_page = (f'<!doctype html><form method="post" action="{live}/v1/chat/completions" enctype="text/plain">'
                 '<input name=\'{"model": "base", "messages": [{"role": "user", "content": "hi"}], "x": "\' '
                 'value=\'"}\'><button id="go">go</button></form>').encode()

    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/html")
        h.send_header("Content-Length", str(len(evil_page)))
        h.end_headers()
        h.wfile.write(evil_page)

    with serve({"/evil": route}) as evil:
        page.goto(f"{evil}/evil")
        with page.expect_navigation():
            page.click("#go")
        text = page.inner_text("body")
    assert "cross-origin request refused" in text and "chat.completion" not in text
