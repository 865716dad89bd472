"""Post a quest by URL on the Tavern: the download runs in the background against a real local HTTP server,
its progress and result are rows of the real ledger, a failure is shown, only remote schemes are accepted,
and the page's form works in a real browser."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from core.ledger import Ledger
from tests.conftest import wait_for
from tests.local_http import cut_half_way, send_bytes, serve

DATA = b"".join(json.dumps({"text": f"tale {i}: the brave mouse"}).encode() + b"\n" for i in range(500))


def inbox_files(realm):
    return sorted(p for p in realm.inbox.rglob("*") if p.is_file())


@pytest.fixture
def csrf(app):
    return {"X-CSRF-Token": app.config["TAVERN_CSRF_TOKEN"]}


RELEASE = threading.Event()  # lets the /slow.jsonl route send the rest of its body


@pytest.fixture
def server():
    RELEASE.clear()
    release = RELEASE

    def slow(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()
        h.wfile.write(DATA[:100])
        h.wfile.flush()
        release.wait(20)
        h.wfile.write(DATA[100:])

    with serve({"/tales.jsonl": send_bytes(DATA), "/cut.jsonl": cut_half_way(DATA), "/slow.jsonl": slow}) as url:
        yield url
        release.set()


def downloads(client) -> list[dict]:
    resp = client.get("/api/quests/downloads")
    assert resp.status_code == 200
    return resp.get_json()["downloads"]


def test_a_url_is_downloaded_in_the_background_into_the_inbox(client, csrf, tavern_realm, server):
    resp = client.post("/api/quests/fetch", json={"url": f"{server}/tales.jsonl", "priority": "low"}, headers=csrf)
    assert resp.status_code == 202, resp.get_json()
    started = resp.get_json()["download"]
    assert started["url"] == f"{server}/tales.jsonl" and started["priority"] == "low"
    done = wait_for(lambda: [d for d in downloads(client) if d["id"] == started["id"] and d["state"] == "done"],
                    timeout=30, what="download done")[0]
    assert done["sha256"] == hashlib.sha256(DATA).hexdigest() and done["bytes_done"] == len(DATA)
    assert done["name"] == "tales.jsonl" and inbox_files(tavern_realm) == [tavern_realm.inbox / "low" / "tales.jsonl"]
    listed = client.get("/api/quests").get_json()["inbox"]
    assert [(f["name"], f["priority"]) for f in listed] == [("tales.jsonl", "low")]


def test_a_failed_download_is_shown_and_leaves_nothing(client, csrf, tavern_realm, server):
    resp = client.post("/api/quests/fetch", json={"url": f"{server}/cut.jsonl"}, headers=csrf)
    assert resp.status_code == 202
    failed = wait_for(lambda: [d for d in downloads(client) if d["state"] == "failed"], timeout=30,
                      what="download failed")[0]
    assert "ended after" in failed["error"] and "nothing was kept" in failed["error"]
    assert inbox_files(tavern_realm) == []


@pytest.mark.parametrize("body,words", [
    ({"url": "file:///etc/passwd"}, "upload a local file"),
    ({"url": "FILE:/etc/passwd"}, "upload a local file"),
    ({"url": "ftp://example.org/a.jsonl"}, "not a supported address"),
    ({"url": "/etc/passwd"}, "not a supported address"),
    ({"url": ""}, "url:"),
    ({"url": 7}, "url:"),
    ({"url": "https://example.org/" + "a" * 5000}, "longer than"),
    ({"url": "https://example.org/a.jsonl", "priority": "urgent"}, "priority must be one of"),
])
def test_only_remote_addresses_are_accepted(client, csrf, tavern_realm, body, words):
    resp = client.post("/api/quests/fetch", json=body, headers=csrf)
    assert resp.status_code == 400 and words in resp.get_json()["error"]
    assert downloads(client) == [] and inbox_files(tavern_realm) == []


def test_cross_origin_fetch_requests_are_refused(client, tavern_realm, server):
    resp = client.post("/api/quests/fetch", json={"url": f"{server}/tales.jsonl"},
                       headers={"Origin": "http://evil.example"})
    assert resp.status_code == 403
    assert client.post("/api/quests/fetch", json={"url": f"{server}/tales.jsonl"}).status_code == 403  # no CSRF
    assert client.get("/api/quests/fetch").status_code == 405
    assert downloads(client) == []


def test_too_many_downloads_at_once_are_refused_and_close_stops_them(app, client, csrf, tavern_realm, server,
                                                                      monkeypatch):
    import tavern.pages.downloads as module

    monkeypatch.setattr(module, "MAX_ACTIVE", 1)
    assert client.post("/api/quests/fetch", json={"url": f"{server}/slow.jsonl"}, headers=csrf).status_code == 202
    wait_for(lambda: any(d["bytes_done"] for d in downloads(client)) or app.extensions[module.EXTENSION_KEY].active(),
             timeout=10, what="slow download running")
    busy = client.post("/api/quests/fetch", json={"url": f"{server}/tales.jsonl"}, headers=csrf)
    assert busy.status_code == 429 and "running already" in busy.get_json()["error"]
    app.extensions[module.EXTENSION_KEY].stop_event.set()  # what close_app does (stop_downloads)...
    RELEASE.set()  # ...and the next chunk arrives: the download sees the stop, removes its part and ends
    module.stop_downloads(app)
    ledger = Ledger(tavern_realm.ledger_path)
    try:
        wait_for(lambda: ledger.list_downloads()[0]["state"] == "failed", timeout=30, what="download stopped")
        assert "stopped after" in ledger.list_downloads()[0]["error"]
    finally:
        ledger.close()
    assert inbox_files(tavern_realm) == []


@pytest.mark.slow
def test_the_quests_page_posts_a_quest_by_url(page, live_tavern, server):
    page.goto(f"{live_tavern.url}/quests")
    page.fill("#fetch-url", f"{server}/tales.jsonl")
    page.select_option("#fetch-priority", "high")
    page.click("#fetch-button")
    page.wait_for_selector("#download-list li[data-state=done]", timeout=30_000)
    assert "tales.jsonl" in page.inner_text("#download-list")
    page.fill("#fetch-url", f"{server}/cut.jsonl")
    page.click("#fetch-button")
    page.wait_for_selector("#download-list li[data-state=failed]", timeout=30_000)
    assert "ended after" in page.inner_text("#download-list li[data-state=failed]")
    path = live_tavern.realm.inbox / "high" / "tales.jsonl"
    assert path.read_bytes() == DATA
    from core.quest_queue import QuestQueue

    quest_id = QuestQueue(live_tavern.realm, live_tavern.ledger).admit(path, "high")  # as the daemon does
    page.wait_for_selector(f"tr[data-quest-id='{quest_id}'] button.qname", timeout=15_000).click()
    page.wait_for_selector("#detail-source")
    source = page.inner_text("#detail-source")
    assert f"{server}/tales.jsonl" in source and hashlib.sha256(DATA).hexdigest() in source
    assert "null" not in page.inner_text("#detail-body").split()
    assert not page.console_errors, page.console_errors
