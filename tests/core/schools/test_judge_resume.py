"""A DPO quest killed with SIGKILL mid-quest resumes exactly: real daemon processes, real SQLite, the nano hero."""

from __future__ import annotations

import json

import pytest

from core.daemon import Daemon
from core.ledger import Ledger
from core.quest_queue import QuestQueue
from tests.resume import (
    assert_same_step_metrics,
    assert_same_steps,
    finish_until_idle,
    kill_daemon_at,
    trained_steps,
)

pytestmark = pytest.mark.slow

SETTINGS = dict(training={"micro_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 4,
                          "eval_holdout_every": 8, "eval_max_examples": 4, "eval_steps": 3},
                schools={"prefs*.jsonl": {"school": "dpo", "beta": 0.2}})
# 22 global steps of 4 pairs: the kill at step 6 must land mid-quest even when the test process is starved for a
# second on a loaded machine while the daemon trains on (with 11 steps it once finished the quest first)
PAIRS = 88


def write_pairs(path, n):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                                "rejected": f" I think {3 * i + 1}{'?' * (i % 3)}"}) + "\n")


def test_dpo_quest_killed_mid_quest_resumes_exactly(make_realm):
    ref = make_realm("reference", **SETTINGS)
    write_pairs(ref.inbox / "prefs.jsonl", PAIRS)
    assert Daemon(ref, ref.load_config(), until_idle=True).run() == 0
    ref_ledger = Ledger(ref.ledger_path)
    expected, expected_metrics = trained_steps(ref_ledger), ref_ledger.step_metrics()
    assert len(expected) >= 20
    quest = ref_ledger.list_quests()[0]
    assert quest["school"] == "dpo" and quest["state"] == "completed"
    assert QuestQueue(ref, ref_ledger).reference_path_of(quest).is_file()  # moved with the quest

    realm = make_realm("killed", **SETTINGS)
    write_pairs(realm.inbox / "prefs.jsonl", PAIRS)
    kill_daemon_at(realm, 6)
    ledger = Ledger(realm.ledger_path)
    quest = ledger.list_quests()[0]
    assert quest["state"] == "processing" and quest["steps"] >= 6  # killed mid-quest, with its reference stored
    assert QuestQueue(realm, ledger).reference_path_of(quest).is_file()
    ledger.close()
    finish_until_idle(realm)
    got_ledger = Ledger(realm.ledger_path)
    got = trained_steps(got_ledger)
    assert_same_steps(got, expected)                                 # same global steps, same pairs, same order
    lines = [ln for _, _, lns, _ in got for ln in lns]
    assert len(lines) == len(set(lines))                             # each pair trained once
    assert got[-1][3] == pytest.approx(expected[-1][3], abs=1e-5)    # the same final loss
    assert_same_step_metrics(got_ledger.step_metrics(), expected_metrics)
    for values in expected_metrics.values():
        assert set(values) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert "quest_resumed" in [e["kind"] for e in got_ledger.events()]  # resumed from its last checkpoint
    assert [q["state"] for q in got_ledger.list_quests()] == ["completed"]
