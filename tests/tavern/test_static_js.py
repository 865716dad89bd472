"""tavern/static/js: helpers shared by the pages live in tavern.js (loaded by base.html), in a real browser."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.tavern.test_vault import HERO, make_checkpoint

JS = Path(__file__).resolve().parents[2] / "tavern" / "static" / "js"


def test_pages_use_the_shared_action_helper_instead_of_their_own():
    shared = (JS / "tavern.js").read_text(encoding="utf-8")
    assert re.search(r"async function act\(url, body, done, after\)", shared) and "act," in shared
    for page in ("quests.js", "vault.js"):
        src = (JS / page).read_text(encoding="utf-8")
        assert "Tavern.act(" in src, page
        assert "apiPost(url" not in src, f"{page} posts through a helper of its own again"


def test_an_action_toasts_its_outcome_and_refreshes_either_way(live_tavern, page):
    realm = live_tavern.realm
    for step in (1, 2, 3):
        make_checkpoint(realm, step, loss=4.0 - step)
    page.goto(live_tavern.url + "/vault")
    row = 'tr[data-checkpoint="{}"]'
    page.locator(row.format("step-00000001") + ' button[data-action="pin"]').wait_for()
    assert page.evaluate("typeof Tavern.act") == "function"

    page.locator(row.format("step-00000002") + ' button[data-action="pin"]').click()
    page.locator("#toasts .toast.success", has_text="step-00000002 pinned").wait_for()
    page.locator(row.format("step-00000002") + " .badge", has_text="pinned").wait_for()

    shutil.rmtree(realm.checkpoints_dir(HERO) / "step-00000001")  # gone behind the page's back
    page.locator(row.format("step-00000001") + ' button[data-action="pin"]').click()
    page.locator("#toasts .toast.error", has_text="no checkpoint step-00000001").wait_for()
    page.locator(row.format("step-00000001")).wait_for(state="detached")  # refreshed after the error too
    assert page.console_errors == [] or all("404" in e for e in page.console_errors), page.console_errors
