"""The Temple's blessing (``/api/status`` ``hero.blessing``) recomputed by hand from the ledger's rows, and
its formula's edge cases."""

from __future__ import annotations

import math

import pytest

from core.ledger import Ledger
from tavern import game
from tests.tavern.test_guild import add_skill_quest, trial


def test_blessing_recomputed_from_the_ledger(client, tavern_realm):
    ledger = Ledger(tavern_realm.ledger_path)
    bin_quest = add_skill_quest(tavern_realm, ledger, "skill-BIN-L0-idle000001.jsonl", range(1, 11))
    ledger.execute("UPDATE quests SET state='completed' WHERE id=?", (bin_quest,))
    text_quest = add_skill_quest(tavern_realm, ledger, "stories.jsonl", range(11, 26))
    t1, t2 = trial("BIN", 0, 20, 5, promoted=False), trial("BIN", 0, 30, 10, promoted=False)
    ledger.record_trial(t1)
    ledger.record_trial(t2)
    ledger.record_eval(15, text_quest, 1.0, 8)
    ledger.record_eval(20, text_quest, 1.2, 8)
    b = client.get("/api/status").get_json()["hero"]["blessing"]

    # by hand: q = (score + clamp(0.5 + 5 (score - previous), 0, 1)) / 2, each step judged by the first
    # evaluation at or after it of what it trained; steps 21-25 have none yet
    q_trial1 = (0.4 + 0.5) / 2  # steps 1-5: first BIN level-0 trial, no previous
    q_trial2 = (0.6 + 1.0) / 2  # steps 6-10: +20 points of accuracy, trend capped at 1
    s1, s2 = math.exp(-1.0), math.exp(-1.2)
    q_eval1 = (s1 + 0.5) / 2  # steps 11-15
    q_eval2 = (s2 + min(1.0, max(0.0, 0.5 + 5 * (s2 - s1)))) / 2  # steps 16-20: worse than before
    expected = 5 * q_trial1 + 5 * q_trial2 + 5 * q_eval1 + 5 * q_eval2
    assert b["effort"] == 25 and b["judged_effort"] == 20 and b["unblessed_effort"] == 5
    assert b["blessed_xp"] == pytest.approx(expected)
    assert b["quality"] == pytest.approx(expected / 20)
    assert q_eval2 < q_eval1  # the held-out loss rose: those steps earn less
    ledger.close()


def test_blessing_edge_cases():
    assert game.blessing([], [], 0) == game.Blessing(0, 0, 0.0, 0, None)
    steps = [(1, 7), (2, 7), (3, None)]
    nothing = game.blessing(steps, [game.Evaluation(2, frozenset([8]), 1.0, None)], 3)
    assert nothing.judged_effort == 0 and nothing.unblessed_effort == 3  # another quest's evaluation
    two = [game.Evaluation(2, frozenset([7]), 0.2, None), game.Evaluation(2, frozenset([7]), 0.9, None)]
    best = game.blessing(steps, two, 3)
    assert best.judged_effort == 2 and best.blessed_xp == pytest.approx(2 * (0.9 + 0.5) / 2)
    assert game.evaluation_quality(0.5, 0.7) == pytest.approx(0.25)  # 20 points worse: trend 0
    assert game.evaluation_quality(1.0, 1.0) == pytest.approx(0.75)
    md = game.formula_table_markdown()
    assert "| blessed XP |" in md and "| unblessed effort |" in md
