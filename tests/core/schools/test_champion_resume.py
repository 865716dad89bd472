"""A GRPO quest killed with SIGKILL mid-quest resumes exactly: real daemon processes, real SQLite, the nano hero.
The same global steps, each prompt consumed once, the same sampled completions (same rewards per step) and the
same final loss as an uninterrupted run."""

from __future__ import annotations

import pytest

from core.daemon import Daemon
from core.ledger import Ledger
from tests.core.schools.test_champion import write_prompts
from tests.resume import (
    assert_same_step_metrics,
    assert_same_steps,
    finish_until_idle,
    kill_daemon_at,
    trained_steps,
)

pytestmark = pytest.mark.slow

SETTINGS = dict(training={"micro_batch_size": 2, "gradient_accumulation_steps": 1, "save_steps": 4,
                          "learning_rate": 1e-3, "eval_holdout_every": 0},
                schools={"sums*.jsonl": {"school": "grpo", "rewards": {"numeric_answer": 1.0, "length_penalty": {
                    "weight": 0.5, "max_chars": 3}}, "num_generations": 4, "max_completion_length": 8,
                    "beta": 0.05}})
PROMPTS = 36


def test_grpo_quest_killed_mid_quest_resumes_exactly(make_realm):
    ref = make_realm("reference", **SETTINGS)
    write_prompts(ref.inbox / "sums.jsonl", PROMPTS)
    assert Daemon(ref, ref.load_config(), until_idle=True).run() == 0
    ref_ledger = Ledger(ref.ledger_path)
    expected, expected_metrics = trained_steps(ref_ledger), ref_ledger.step_metrics()
    assert len(expected) == PROMPTS // 2
    assert ref_ledger.list_quests()[0]["school"] == "grpo"
    assert all("kl" in m for m in expected_metrics.values())  # beta set: the KL to the quest-start hero

    realm = make_realm("killed", **SETTINGS)
    write_prompts(realm.inbox / "sums.jsonl", PROMPTS)
    kill_daemon_at(realm, 6, timeout=180)
    ledger = Ledger(realm.ledger_path)
    quest = ledger.list_quests()[0]
    assert quest["state"] == "processing" and 6 <= quest["steps"] < PROMPTS // 2  # killed mid-quest
    ledger.close()
    finish_until_idle(realm)
    got_ledger = Ledger(realm.ledger_path)
    got = trained_steps(got_ledger)
    assert_same_steps(got, expected)                                 # same global steps, same prompts, same order
    lines = [ln for _, _, lns, _ in got for ln in lns]
    assert sorted(lines) == list(range(1, PROMPTS + 1))              # each prompt consumed once
    assert_same_step_metrics(got_ledger.step_metrics(), expected_metrics)  # the same completions were sampled
    assert got_ledger.list_quests()[0]["state"] == "completed"
