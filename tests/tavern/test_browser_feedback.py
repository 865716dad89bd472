"""Acceptance, end to end: the feedback loop closes. In real headless Chromium, choices are given on the Oracle
page (regenerate, keep the better answer; a 👍) against the real daemon process training the nano hero; when
``feedback.min_pairs`` pairs to train exist a Judge quest appears in the queue by itself, the daemon trains it,
and the battle log shows its preference accuracy before and after on the pairs kept back."""

from __future__ import annotations

import pytest

from core.ledger import Ledger
from tests.tavern.conftest import running_tavern
from tests.tavern.test_browser import wait_until
from tests.tavern.test_browser_training import start_daemon, stop_daemon

pytestmark = pytest.mark.slow

MIN_PAIRS, HOLDOUT_EVERY = 4, 2  # pairs 1, 3, 5, 7 are kept back: the 8th pair makes Judge quest #1


def answered(page, selector: str, count: int | None, what: str) -> None:
    """Wait until ``count`` elements (any number when None) match ``selector``; an answer that failed on the way (on a loaded machine
    the Socket.IO connection may drop and reconnect mid-answer) is retried with the page's Retry button."""
    def ready() -> bool:
        if page.locator(".msg.assistant .retry").count():
            page.locator(".msg.assistant .retry").first.click()
            return False
        found = page.locator(selector).count()
        return found > 0 if count is None else found == count

    try:
        wait_until(ready, timeout_seconds=180, what=what)
    except AssertionError:
        print(page.locator("#chat-log").inner_text())
        raise


def give_pair(page, prompt: str) -> bool:
    """One new chat: ask, regenerate, keep the second answer. False when both answers were the same text
    (no pair can be made of them)."""
    page.click("#chat-new")
    page.fill("#chat-input", prompt)
    page.press("#chat-input", "Enter")
    answered(page, ".msg.assistant .regenerate", 1, "the first answer")
    page.click(".msg.assistant .regenerate")
    answered(page, ".msg.assistant .pick, .msg.assistant .no-pair", None, "a second answer to pick from")
    if page.locator(".msg.assistant .no-pair").count():  # two equal answers, or a blank one: no pair
        assert page.locator(".msg.assistant .pick").count() == 0
        return False
    page.locator(".msg.assistant .pick").nth(1).click()
    wait_until(lambda: page.locator(".answer.chosen").count() == 1, timeout_seconds=60, what="the choice saved")
    return True


def test_oracle_choices_become_a_judge_quest_that_trains_and_is_scored(make_realm, page):
    realm = make_realm("feedback", feedback={"min_pairs": MIN_PAIRS, "holdout_every": HOLDOUT_EVERY},
                       training={"micro_batch_size": 2, "warmup_steps": 0, "learning_rate": 5e-3,
                                 "max_length": 256})
    with running_tavern(realm) as live:
        daemon = start_daemon(realm)
        ledger = Ledger(realm.ledger_path)
        try:
            wait_until(lambda: (realm.models / "hero" / "base").is_dir(), timeout_seconds=90,
                       what="the daemon to create the newborn hero")
            page.goto(live.url + "/oracle")
            wait_until(lambda: page.locator("#oracle-model option[value='hero']").count(), timeout_seconds=60,
                       what="the model list")
            page.fill("#oracle-max-new-tokens", "12")
            wait_until(lambda: "8 pairs until the next Judge quest" in page.text_content("#feedback-next"),
                       timeout_seconds=60, what="the pairs until the next Judge quest")
            given, attempt = 0, 0
            while given < 2 * MIN_PAIRS:
                attempt += 1
                assert attempt < 4 * MIN_PAIRS, "the oracle kept giving two equal answers"
                if give_pair(page, f"Tell me a story about cat number {attempt}."):
                    given += 1
                    if given == 1:  # a rating too (min_ratings is 64: it waits for more)
                        page.locator(".msg.assistant .rate-up").first.click()
                        wait_until(lambda: page.locator(".rate-up[aria-pressed='true']").count(), 60, "a rating")
                    if given < 2 * MIN_PAIRS:
                        left = f"{2 * MIN_PAIRS - given} pair"
                        wait_until(lambda left=left: left in page.text_content("#feedback-next"), timeout_seconds=60,
                                   what=f"'{left}s until the next Judge quest'")
            # the daemon writes the quest by itself, trains it, scores it
            judge = page.locator("#feedback-quests li", has_text="Judge quest #1")
            judge.wait_for(timeout=180_000)
            try:
                wait_until(lambda: "→" in judge.inner_text(), timeout_seconds=300, what="the before/after score")
            except AssertionError:
                print(ledger.list_quests(), ledger.latest_events(20))
                raise
            assert "feedback-pairs-0001.jsonl: 4 pairs · preference accuracy " in judge.inner_text()
            quest = [q for q in ledger.list_quests() if q["name"] == "feedback-pairs-0001.jsonl"][0]
            assert (quest["state"], quest["school"], quest["priority"], quest["examples_trained"]) == (
                "completed", "dpo", "high", MIN_PAIRS)
            page.goto(live.url + "/")
            line = page.locator("#battle-log li", has_text="Judge quest #1: preference accuracy")
            line.wait_for(timeout=60_000)
            assert "on 4 held-out pairs" in line.inner_text()
            page.goto(live.url + "/quests")
            row = page.locator("#group-finished tr", has_text="feedback-pairs-0001.jsonl")
            row.wait_for(timeout=60_000)
            assert row.locator("td.school").inner_text() == "dpo"
        finally:
            ledger.close()
            code = stop_daemon(daemon)
        assert code == 0, (realm.logs / "daemon-test.log").read_text(errors="replace")[-3000:]
    assert not [e for e in page.console_errors if "Content Security Policy" in e], page.console_errors
