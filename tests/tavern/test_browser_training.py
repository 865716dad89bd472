"""Acceptance, end to end: the real daemon process trains ../shared/models/stories260K on GSM8K lines while
real headless Chromium watches the Tavern's Home page: the hero card shows the real model and the step
advances without a reload; pause reaches the real daemon and its answer is shown; a quest uploaded on the
Quests page moves queued -> processing -> completed on screen."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess

import pytest

from core.ledger import Ledger
from tests.conftest import PYTHON, SHARED_DATA, STORIES260K, needs_shared, python_env
from tests.tavern.conftest import running_tavern, save_screenshot
from tests.tavern.test_browser import step_shown, wait_until

pytestmark = [pytest.mark.slow, needs_shared(STORIES260K), needs_shared(SHARED_DATA / "gsm8k_train.jsonl")]


def start_daemon(realm) -> subprocess.Popen:
    """The real daemon, in the foreground of a child process (``python -m training daemon``)."""
    with open(realm.logs / "daemon-test.log", "wb") as log:  # the child writes to its own copy of the fd
        return subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon"], stdout=log,
                                stderr=subprocess.STDOUT, env=python_env(), cwd=str(realm.root))


def stop_daemon(proc: subprocess.Popen) -> int:
    """SIGTERM (the daemon checkpoints, then exits); SIGKILL only if it hangs."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def test_home_follows_the_real_daemon_training_stories260k(make_realm, page, tmp_path):
    realm = make_realm(
        "stories", hero={"base_model": str(STORIES260K)},
        training={"save_steps": 10, "eval_steps": 10, "eval_holdout_every": 10, "max_length": 384,
                  "micro_batch_size": 2},
        validation={"field_map": {"gsm8k*.jsonl": {"question": "prompt", "answer": "completion"}}})
    with open(SHARED_DATA / "gsm8k_train.jsonl", encoding="utf-8") as src:
        lines = list(itertools.islice(src, 400))
    (realm.inbox / "gsm8k_train.jsonl").write_text("".join(lines), encoding="utf-8")
    with running_tavern(realm) as live:
        daemon = start_daemon(realm)
        try:
            page.goto(live.url + "/")
            wait_until(lambda: page.text_content("#quest-name") == "gsm8k_train.jsonl", timeout_seconds=90,
                       what="the daemon to pick up the quest")
            wait_until(lambda: step_shown(page) >= 2, timeout_seconds=90, what="training steps")
            first = step_shown(page)
            wait_until(lambda: step_shown(page) >= first + 3, timeout_seconds=60,
                       what="the step to advance without reload")
            assert "LlamaForCausalLM" in page.text_content("#hero-arch")
            assert page.text_content("#hero-level").startswith("Lv ")
            assert page.text_content("#atk") != "—"
            wait_until(lambda: page.text_content("#def") != "—", timeout_seconds=60, what="a validation loss")
            wait_until(lambda: step_shown(page) >= 20, timeout_seconds=60, what="a longer loss curve")
            assert page.text_content("#chart-note") == "every step"
            page.wait_for_timeout(1000)  # the chart draws live points at most twice a second
            save_screenshot(page, "home")

            page.click("#controls [data-command=pause]")
            wait_until(lambda: "paused" in (page.text_content("#command-result") or ""), timeout_seconds=30,
                       what="the daemon's answer to pause")
            wait_until(lambda: page.text_content("#daemon-state") == "daemon: paused", timeout_seconds=15,
                       what="the paused state")
            page.click("#controls [data-command=resume]")
            wait_until(lambda: "resumed" in (page.text_content("#command-result") or ""), timeout_seconds=30,
                       what="the daemon's answer to resume")

            # an uploaded quest moves queued -> processing -> completed on screen, trained by the real daemon
            page.click("#controls [data-command=pause]")
            wait_until(lambda: page.text_content("#daemon-state") == "daemon: paused", timeout_seconds=30,
                       what="paused again")
            upload = tmp_path / "uploaded_quest.jsonl"
            upload.write_text("".join(json.dumps({"text": f"Once upon a time there was a cat number {i}."}) + "\n"
                                      for i in range(1500)), encoding="utf-8")
            page.goto(live.url + "/quests")
            page.set_input_files("#upload-file", str(upload))
            page.select_option("#upload-priority", "high")
            page.click("#upload-button")
            row = page.locator("#group-queued tr", has_text="uploaded_quest.jsonl")
            row.wait_for(timeout=60_000)
            page.evaluate("window.__sameDocument = true")
            ledger = Ledger(realm.ledger_path)
            ledger.send_command("skip")    # the GSM8K quest goes back to the queue, nothing lost
            ledger.send_command("resume")  # the high-priority upload trains next
            try:
                page.locator("#group-processing tr", has_text="uploaded_quest.jsonl").wait_for(timeout=60_000)
                page.locator("#group-finished tr", has_text="uploaded_quest.jsonl").wait_for(timeout=180_000)
            except Exception:
                print(ledger.list_quests(), ledger.events()[-20:])
                raise
            assert page.evaluate("window.__sameDocument") is True  # no reload happened
            quest = [q for q in ledger.list_quests() if q["name"] == "uploaded_quest.jsonl"][0]
            assert quest["state"] == "completed" and quest["examples_trained"] == quest["examples_total"] == 1350
            ledger.close()
        finally:
            code = stop_daemon(daemon)
        assert code == 0, (realm.logs / "daemon-test.log").read_text(errors="replace")[-3000:]
    assert not [e for e in page.console_errors if "Content Security Policy" in e], page.console_errors
