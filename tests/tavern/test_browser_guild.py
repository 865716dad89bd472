"""Real headless Chromium against the real Tavern: the Guild page shows a promotion as it happens (the trial's
numbers, the new level, Total Level, the log entry) over Socket.IO, without a reload; answers are text."""

from __future__ import annotations

from tests.tavern.conftest import LedgerWriter, save_screenshot
from tests.tavern.test_browser import wait_until
from tests.tavern.test_guild import add_skill_quest, trial


def test_guild_shows_a_promotion_live_without_reload(live_tavern, page):
    ledger = live_tavern.ledger
    add_skill_quest(live_tavern.realm, ledger, "skill-BIN-L0-idle000001.jsonl", range(1, 13))
    ledger.record_trial(trial("BIN", 0, 31, 6, promoted=False))
    navigations = []
    with LedgerWriter(ledger, start_step=12, step_interval_seconds=0.3):
        page.goto(live_tavern.url + "/guild")
        page.on("framenavigated", lambda frame: navigations.append(frame.url))
        wait_until(lambda: page.get_attribute("#conn", "data-state") == "live", what="socket connected")
        card = page.locator('[data-skill="BIN"]')
        wait_until(lambda: card.count() == 1 and "Lv 0" in card.locator(".skill-level").text_content(),
                   what="BIN at level 0")
        assert "31/50 right" in card.locator(".last-trial").text_content()
        assert page.text_content("#total-level") == "Total Lv 0"
        assert card.locator("canvas").count() >= 1  # the accuracy chart

        ledger.record_trial(trial("BIN", 0, 49, 12, promoted=True))  # what the daemon's loop writes
        wait_until(lambda: "Lv 1" in card.locator(".skill-level").text_content(), what="the promotion on screen")
        text = card.locator(".last-trial").text_content()
        assert "49/50 right (98.0%)" in text and "promoted to level 1" in text and "step 12" in text
        assert page.text_content("#total-level") == "Total Lv 1"
        wait_until(lambda: "promotion" in page.text_content("#guild-log"), what="the promotion in the log")
        assert card.locator("table.samples tr.wrong").count() == 1
        assert card.locator("table.samples b").count() == 0  # "<b>x</b>" is shown as text
        assert "<b>x</b>" in card.locator("table.samples").text_content()
        save_screenshot(page, "guild")
    assert navigations == []  # no reload: the promotion arrived over Socket.IO
    assert not [e for e in page.console_errors if "Content Security Policy" in e or "Refused" in e], \
        page.console_errors
