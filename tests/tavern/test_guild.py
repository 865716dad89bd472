"""The Guild's JSON (``/api/guild``) and the hero card's Total Level, recomputed from the ledger rows."""

from __future__ import annotations

import time

from core.ledger import Ledger, QuestState, TrialRecord
from core.quest_queue import QuestQueue
from tavern import game


def trial(skill: str, level: int, correct: int, step: int, *, promoted: bool, hero: str = "hero",
          n: int = 50) -> TrialRecord:
    return TrialRecord(hero=hero, skill=skill, level=level, level_after=level + 1 if promoted else level, n=n,
                       correct=correct, accuracy=correct / n, lower_bound=0.9 if promoted else 0.5, threshold=0.8,
                       promoted=promoted, global_step=step, checkpoint=f"step-{step:08d}", seed=1,
                       duration_seconds=1.0, time=time.time(),
                       samples=[{"prompt": "1+1", "expected": "10", "answer": "10", "correct": True},
                                {"prompt": "<b>x</b>", "expected": "1", "answer": "11", "correct": False}])


def add_skill_quest(realm, ledger, name: str, steps: range) -> int:
    path = realm.inbox / name
    path.write_text('{"text": "x"}\n', encoding="utf-8")
    queue = QuestQueue(realm, ledger)
    qid = queue.admit(path)
    queue.transition(qid, QuestState.QUEUED, format="prompt_completion", examples_total=100)
    queue.transition(qid, QuestState.PROCESSING)
    for s in steps:
        ledger.record_step(global_step=s, quest_id=qid, loss=1.0, learning_rate=1e-3, grad_norm=0.5, tokens=10,
                           tokens_per_second=10.0, example_start=s, example_end=s + 1, example_lines=[],
                           quest_steps=s)
    return qid


def test_guild_levels_trials_and_steps_until_the_next_trial(client, tavern_realm):
    ledger = Ledger(tavern_realm.ledger_path)
    add_skill_quest(tavern_realm, ledger, "skill-BIN-L0-idle000001.jsonl", range(1, 31))
    ledger.record_trial(trial("BIN", 0, 30, 10, promoted=False))
    ledger.record_trial(trial("BIN", 0, 49, 20, promoted=True))
    ledger.record_trial(trial("LETTERS", 0, 50, 5, promoted=True))
    ledger.record_trial(trial("LETTERS", 1, 50, 25, promoted=True))
    g = client.get("/api/guild").get_json()
    every = tavern_realm.load_config().skills.trial_every_steps
    assert g["trial_every_steps"] == every
    skills = {s["name"]: s for s in g["skills"]}
    assert list(skills) == ["BIN", "LETTERS"]  # priorities first, then skills with a trial
    b = skills["BIN"]
    assert b["level"] == 1 and b["trials"] == 2 and b["max_level"] == 11 and not b["mastered"]
    assert [(t["global_step"], t["correct"], t["promoted"]) for t in b["history"]] == [(10, 30, False),
                                                                                      (20, 49, True)]
    assert b["last_trial"]["samples"][1] == {"prompt": "<b>x</b>", "expected": "1", "answer": "11",
                                             "correct": False}
    steps_after = len([s for s in range(1, 31) if s > 20])  # BIN quest steps after its newest trial
    assert b["steps_since_trial"] == steps_after == 10 and b["steps_until_trial"] == every - 10
    assert skills["LETTERS"]["level"] == 2 and skills["LETTERS"]["steps_since_trial"] == 0
    assert g["total_level"] == 1 + 2
    assert [e["kind"] for e in g["log"]][:2] == ["promotion", "trial"] and g["log"][0]["data"]["skill"] == "LETTERS"
    ledger.close()


def test_guild_counts_correction_quests_and_logs_sparring_rounds(client, tavern_realm):
    from core.ledger import SparRecord

    ledger = Ledger(tavern_realm.ledger_path)
    add_skill_quest(tavern_realm, ledger, "skill-BIN-L0-idle000001.jsonl", range(1, 6))
    ledger.record_trial(trial("BIN", 0, 30, 5, promoted=False))
    ledger.record_spar_round(SparRecord(hero="hero", skill="BIN", level=0, round=1, n=40, correct=28, wrong=12,
                                        accuracy=0.7, global_step=5, checkpoint="step-00000005", seed=3,
                                        quest="spar-BIN-L0-r000001-s5.jsonl", examples=12,
                                        feedback_turn=False, duration_seconds=1.0, time=time.time()))
    add_skill_quest(tavern_realm, ledger, "spar-BIN-L0-r000001-s5.jsonl", range(6, 9))
    g = client.get("/api/guild").get_json()
    assert g["skills"][0]["steps_since_trial"] == 3  # the correction quest's steps train BIN
    spar = g["log"][0]
    assert spar["kind"] == "spar" and spar["data"]["wrong"] == 12 and spar["data"]["level"] == 0
    assert "12/40 wrong" in spar["message"] and spar["level"] == "info"
    ledger.close()


def test_hero_card_total_level_is_the_sum_of_the_skill_levels(client, tavern_realm):
    ledger = Ledger(tavern_realm.ledger_path)
    assert client.get("/api/status").get_json()["hero"]["total_level"] == 0
    ledger.record_trial(trial("BIN", 0, 49, 3, promoted=True))
    ledger.record_trial(trial("BIN", 1, 48, 6, promoted=True))
    ledger.record_trial(trial("BIN", 2, 20, 9, promoted=False))
    ledger.record_trial(trial("LETTERS", 0, 50, 4, promoted=True))
    ledger.record_trial(trial("BIN", 0, 50, 9, promoted=True, hero="someone-else"))
    hero = client.get("/api/status").get_json()["hero"]
    # recomputed from the raw rows: the newest trial's level_after per skill, summed
    rows = ledger.query("SELECT skill, level_after FROM trials WHERE hero='hero' ORDER BY id")
    levels: dict[str, int] = {}
    for r in rows:
        levels[r["skill"]] = r["level_after"]
    assert hero["skill_levels"] == levels == {"BIN": 2, "LETTERS": 1}
    assert hero["total_level"] == sum(levels.values()) == 3
    assert hero["level"] == 1  # the step-based level is unchanged beside it
    ledger.close()


def test_total_level_formula():
    assert game.total_level({}) == 0 and game.total_level({"BIN": 3, "LETTERS": 2}) == 5
    import pytest

    with pytest.raises(ValueError):
        game.total_level({"BIN": -1})
    md = game.formula_table_markdown()
    assert "| Total Level |" in md and "| skill level |" in md


def test_guild_page_renders(client):
    html = client.get("/guild").get_data(as_text=True)
    assert 'id="total-level"' in html and "js/guild.js" in html and 'href="/guild"' in html
