"""Real headless Chromium (Playwright) against the real Tavern server: live updates without reload,
rebuilt state after reload, escaped user strings, working controls, no CSP violations; screenshots."""

from __future__ import annotations

import re
import threading
import time

from tests.tavern.conftest import LedgerWriter, running_tavern, save_screenshot

XSS_NAME = "<img src=x onerror=alert(1)>.jsonl"


def add_processing_quest(live, name="gsm8k_train.jsonl", examples_total=400) -> int:
    from core.ledger import QuestState
    from core.quest_queue import QuestQueue

    path = live.realm.inbox / name
    path.write_text('{"text": "hello"}\n', encoding="utf-8")
    queue = QuestQueue(live.realm, live.ledger)
    qid = queue.admit(path)
    queue.transition(qid, QuestState.QUEUED, format="text", examples_total=examples_total, records=1)
    queue.transition(qid, QuestState.PROCESSING)
    return qid


def step_shown(page) -> int:
    return int(re.sub(r"\D", "", page.text_content("#global-step") or "") or 0)


def wait_until(predicate, timeout_seconds: float = 10.0, what: str = "condition"):
    """Poll from Python (page.wait_for_function evaluates strings, which our CSP rightly forbids)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")
        time.sleep(0.05)


def test_home_shows_the_hero_and_the_step_advances_without_reload(live_tavern, page):
    qid = add_processing_quest(live_tavern)
    live_tavern.ledger.event("quest_started", f"quest {XSS_NAME} started", level="warning")
    with LedgerWriter(live_tavern.ledger, quest_id=qid, step_interval_seconds=0.15) as writer:
        page.goto(live_tavern.url + "/")
        wait_until(lambda: page.get_attribute("#conn", "data-state") == "live", what="socket connected")
        wait_until(lambda: step_shown(page) > 0, what="a step on screen")
        first = step_shown(page)
        wait_until(lambda: step_shown(page) >= first + 3, what="the step to advance without reload")
        assert step_shown(page) >= first + 3
        assert page.text_content("#hero-name") == "hero"
        assert page.text_content("#hero-level").startswith("Lv ")
        assert page.text_content("#quest-name") == "gsm8k_train.jsonl"
        assert page.locator("#loss-chart canvas").count() >= 1
        # the user-supplied string in the battle log is text, not markup
        log_text = page.text_content("#battle-log")
        assert XSS_NAME in log_text
        assert page.locator("#battle-log img").count() == 0
        time.sleep(1.0)  # let the chart gather a few live points
        save_screenshot(page, "home")

        # after a reload the page rebuilds its state from the server
        before = writer.global_step
        page.reload()
        wait_until(lambda: step_shown(page) >= before, what="the step after reload")
        assert page.text_content("#quest-name") == "gsm8k_train.jsonl"
    assert not [e for e in page.console_errors if "Content Security Policy" in e or "Refused" in e], \
        page.console_errors


def test_pause_button_reaches_the_daemon_and_shows_its_answer(live_tavern, page):
    qid = add_processing_quest(live_tavern)
    with LedgerWriter(live_tavern.ledger, quest_id=qid, step_interval_seconds=0.15):
        page.goto(live_tavern.url + "/")
        page.click("#controls [data-command=pause]")  # Playwright waits until it is enabled
        wait_until(lambda: "done" in (page.text_content("#command-result") or ""), what="the daemon's answer")
        assert "pause done by the test writer" in page.text_content("#command-result")
        row = live_tavern.ledger.query("SELECT * FROM commands ORDER BY id DESC LIMIT 1")[0]
        assert row["command"] == "pause" and row["state"] == "done"


def test_system_page_says_plainly_when_there_is_no_gpu(live_tavern, page):
    page.goto(live_tavern.url + "/system")
    wait_until(lambda: page.text_content("#disk-free") != "—", what="system figures")
    import pynvml

    try:
        pynvml.nvmlInit()
        has_gpu = pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        assert page.locator("#gpu-table tbody tr").count() >= 1
    else:
        assert "No NVIDIA GPU found" in page.text_content("#no-gpu")
    assert page.locator("#proc-table tbody tr").count() >= 1
    assert page.text_content("#tm-total").endswith("B") and "full fine-tuning" in page.text_content("#tm-mode")
    assert "training memory estimate" in page.text_content("#tm-lines")
    save_screenshot(page, "system")
    assert not page.console_errors, page.console_errors


def test_token_login_in_the_browser_then_live_updates(tavern_realm, page):
    from core.config import RealmConfig

    config = RealmConfig.model_validate({"tavern": {"access_token": "browser-token-123"}})
    with running_tavern(tavern_realm, config) as live, LedgerWriter(live.ledger, step_interval_seconds=0.15):
        response = page.goto(live.url + "/")
        assert response.status == 401
        assert "access token required" in page.text_content("main")
        page.fill("input[name=token]", "browser-token-123")
        page.click("form button[type=submit]")
        wait_until(lambda: page.url == live.url + "/", what="redirect without the token in the address")
        wait_until(lambda: page.get_attribute("#conn", "data-state") == "live", what="Socket.IO with the cookie")
        first = step_shown(page)
        wait_until(lambda: step_shown(page) > first, what="a live step")


def test_loss_chart_zooms_into_server_side_detail(live_tavern, page):
    with live_tavern.ledger.transaction() as c:
        c.executemany("INSERT INTO steps(global_step, quest_id, time, loss, learning_rate, grad_norm, tokens, "
                      "tokens_per_second) VALUES (?,?,?,?,?,?,?,?)",
                      [(s, None, 1.0e9 + s, 3.0 / (1 + s / 500), 1e-3, 0.5, 10, 100.0) for s in range(1, 6001)])
    page.goto(live_tavern.url + "/")
    wait_until(lambda: "steps per point" in (page.text_content("#chart-note") or ""), what="bucketed history")
    assert page.text_content("#chart-note") == "4 steps per point"
    box = page.locator("#loss-chart .u-over").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.4, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.45, y, steps=5)
    page.mouse.up()
    wait_until(lambda: "zoomed" in (page.text_content("#chart-note") or ""), what="zoomed detail")
    assert "1 step(s) per point" in page.text_content("#chart-note")
    page.click("#reset-zoom")
    assert page.text_content("#chart-note") == "4 steps per point"
    assert not page.console_errors, page.console_errors


def test_after_a_tavern_restart_the_page_reconnects_and_rebuilds_its_state(tavern_realm, page):
    from core.ledger import Ledger
    from tavern.app import close_app
    from tavern.server import make_tavern_server

    ledger = Ledger(tavern_realm.ledger_path)
    writer = LedgerWriter(ledger)
    for _ in range(5):
        writer.step()
    writer.heartbeat()

    def serve(port):
        server, app = make_tavern_server(tavern_realm, host="127.0.0.1", port=port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, app

    def stop(server, app):
        server.shutdown()
        server.server_close()
        close_app(app)

    server, app = serve(0)
    port = server.server_port
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        wait_until(lambda: step_shown(page) == 5, what="the first state")
        stop(server, app)
        wait_until(lambda: page.get_attribute("#conn", "data-state") == "down", what="the page to notice")
        for _ in range(7):  # training goes on while the Tavern is down: no event can reach the page
            writer.step()
        writer.heartbeat()
        server, app = serve(port)
        wait_until(lambda: page.get_attribute("#conn", "data-state") == "live", timeout_seconds=20,
                   what="the reconnect")
        wait_until(lambda: step_shown(page) == 12, what="the state rebuilt from the server")
        assert page.text_content("#chart-note") == "every step"
    finally:
        stop(server, app)
        ledger.close()
