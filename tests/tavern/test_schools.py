"""The Schools page (``/api/schools``, ``/api/schools/metrics``) and the feedback loop's status on the Oracle
page (``/api/oracle/feedback``), recomputed from real ledger rows; the page in real Chromium."""

from __future__ import annotations

from core import preferences
from core.ledger import Ledger, QuestState
from core.quest_queue import QuestQueue
from core.schools import SCHOOL_DATA
from tavern import game
from tavern.pages.schools import schools_view
from tests.tavern.conftest import running_tavern, save_screenshot
from tests.tavern.test_browser import wait_until


def add_quest(realm, ledger, name: str, school: str, steps: range, metrics=None) -> int:
    path = realm.inbox / name
    path.write_text('{"text": "x"}\n', encoding="utf-8")
    queue = QuestQueue(realm, ledger)
    qid = queue.admit(path)
    queue.transition(qid, QuestState.QUEUED, format="prompt_completion", examples_total=100, school=school)
    queue.transition(qid, QuestState.PROCESSING)
    for i, s in enumerate(steps, start=1):
        ledger.record_step(global_step=s, quest_id=qid, loss=1.0, learning_rate=1e-3, grad_norm=0.5, tokens=10,
                           tokens_per_second=10.0, example_start=i, example_end=i + 1, example_lines=[],
                           quest_steps=i, metrics=metrics(s) if metrics else None)
    return qid


def fill(realm) -> Ledger:
    ledger = Ledger(realm.ledger_path)
    add_quest(realm, ledger, "notes.jsonl", "sft", range(1, 11))
    add_quest(realm, ledger, "spar-BIN-L0-r1.jsonl", "sft", range(11, 14))
    add_quest(realm, ledger, "prefs.jsonl", "dpo", range(14, 20),
              lambda s: {"rewards/margins": s / 10, "rewards/accuracies": 0.5})
    add_quest(realm, ledger, "ratings.jsonl", "kto", range(20, 22), lambda s: {"kl": 0.1, "rewards/margins": 1.0})
    return ledger


def test_every_school_with_its_quests_steps_and_metrics(tavern_realm, client):
    ledger = fill(tavern_realm)
    view = client.get("/api/schools").get_json()
    by = {s["title"]: s for s in view["schools"]}
    assert [s["title"] for s in view["schools"]] == [s.title for s in game.SCHOOLS] == [
        "Scribe", "Mirror", "Judge", "Champion", "Whisper", "Fortune Teller"]
    assert all(s["icon"] and s["motto"] for s in view["schools"])
    assert (by["Scribe"]["quests"], by["Scribe"]["steps"]) == (1, 10)  # the spar-* quest is the Mirror's
    assert (by["Mirror"]["quests"], by["Mirror"]["steps"]) == (1, 3)
    assert (by["Judge"]["quests"], by["Judge"]["steps"], by["Judge"]["xp"]) == (2, 8, 8)
    assert by["Judge"]["metrics"] == ["kl", "rewards/accuracies", "rewards/margins"]
    assert view["total_steps"] == 21 == ledger.last_step()["global_step"]  # every step is 1 XP, whatever school
    # availability is the registry's: a school lights up when its module is registered
    assert by["Judge"]["available"] and by["Mirror"]["available"] and by["Fortune Teller"]["available"]
    assert by["Champion"]["available"] == ("grpo" in SCHOOL_DATA)
    assert by["Whisper"]["available"] == ("distill" in SCHOOL_DATA)
    with_grpo = {s["title"]: s for s in schools_view(ledger, {**SCHOOL_DATA, "grpo": "prompts"})["schools"]}
    assert with_grpo["Champion"]["available"]

    data = client.get("/api/schools/metrics?school=Judge&name=rewards/margins").get_json()
    assert data["points"] == [[s, s / 10] for s in range(14, 20)] + [[20, 1.0], [21, 1.0]]
    assert client.get("/api/schools/metrics?school=Judge&name=kl").get_json()["points"] == [[20, 0.1], [21, 0.1]]
    for bad in ("school=Nobody&name=kl", "school=Scribe&name=kl", "school=Judge&name=%3Cb%3E", "school=Judge"):
        r = client.get("/api/schools/metrics?" + bad)
        assert r.status_code == 400 and "error" in r.get_json(), bad
    ledger.close()


def test_the_series_is_thinned_to_the_maximum_keeping_the_ends(tavern_realm):
    ledger = Ledger(tavern_realm.ledger_path)
    add_quest(tavern_realm, ledger, "p.jsonl", "dpo", range(1, 101), lambda s: {"rewards/margins": float(s)})
    points = ledger.step_metric_series("rewards/margins", ["dpo"], max_points=10)
    assert len(points) <= 11 and points[0] == (1, 1.0) and points[-1] == (100, 100.0)
    assert ledger.step_metric_series("rewards/margins", ["sft"]) == []
    ledger.close()


def test_the_oracle_shows_pairs_until_the_next_judge_quest(make_realm):
    from tavern.app import create_app

    realm = make_realm("fbstatus", feedback={"min_pairs": 3, "min_ratings": 2, "holdout_every": 0})
    app = create_app(realm, testing=True)
    ledger = Ledger(realm.ledger_path)
    preferences.record_pair(ledger, checkpoint="base", prompt=[{"role": "user", "content": "hi"}], chosen="a",
                            rejected="b")
    status = app.test_client().get("/api/oracle/feedback").get_json()
    assert (status["enabled"], status["new_pairs"], status["pairs_until_next"], status["ratings_until_next"]) == (
        True, 1, 2, 2)
    ledger.close()


def test_schools_page_in_the_browser(tavern_realm, page):
    ledger = fill(tavern_realm)
    with running_tavern(tavern_realm) as live:
        page.goto(live.url + "/schools")
        page.locator("section.school[data-school=Judge]").wait_for(timeout=15_000)
        judge = page.locator("section.school[data-school=Judge]")
        assert "Of two answers, know the better." in judge.inner_text()
        assert judge.locator(".school-steps").inner_text() == "8"
        assert page.locator("section.school").count() == 6
        wait_until(lambda: page.locator("#school-chart").get_attribute("data-points") == "8", timeout_seconds=15,
                   what="the Judge's margins chart")
        save_screenshot(page, "schools")
        page.select_option("#chart-metric", "kl")
        wait_until(lambda: page.locator("#school-chart").get_attribute("data-points") == "2", timeout_seconds=15,
                   what="the KL chart")
        assert page.locator("nav a", has_text="Schools").count() == 1
    assert page.console_errors == []
    ledger.close()
