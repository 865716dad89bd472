"""A newborn hero learns a (custom) skill through the real daemon and a 50-item trial promotes it (processes).

The skill is a tiny custom one (two greetings), so the test measures the plumbing — custom skill file,
``skills quest`` into the inbox, validation, SFT in the daemon, the trial on the checkpoint, the ledger,
``status`` — in a few dozen nano steps; how fast BIN levels are learned is measured by
``bench/skills_learnability.py``.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.slow

GREET = """
NAME = "GREET"

def generate(level, rng):
    return ("hi", "yo") if rng.random() < 0.5 else ("hey", "ok")
"""


def test_sft_on_skill_items_then_a_trial_promotes_the_newborn(make_realm):
    realm = make_realm(training={"learning_rate": 3e-3, "micro_batch_size": 8, "warmup_steps": 5,
                                 "save_steps": 10000},
                       skills={"priorities": {"GREET": 1.0}, "trial_every_steps": 0})  # trials by the CLI only
    (realm.root / "skills").mkdir()
    (realm.root / "skills" / "greet.py").write_text(GREET)
    newborn = cli(realm, "trial", "GREET", "--checkpoint", "base", "--json")
    assert newborn.returncode == 0, newborn.stderr
    assert json.loads(newborn.stdout)["correct"] == 0
    out = cli(realm, "skills", "quest", "GREET", "--count", "800", "--key", "e2e")
    assert out.returncode == 0, out.stderr
    out = cli(realm, "daemon", "--until-idle", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads(cli(realm, "status", "--json").stdout)
    quest = status["quests"][0]
    assert quest["state"] == "completed" and quest["format"] == "prompt_completion"
    out = cli(realm, "trial", "GREET", "--json")
    assert out.returncode == 0, out.stderr
    trial = json.loads(out.stdout)
    assert trial["n"] == 50 and trial["level"] == 0 and trial["global_step"] == status["global_step"] > 0
    assert trial["promoted"] and trial["level_after"] == 1 and trial["correct"] >= 46, trial
    after = json.loads(cli(realm, "status", "--json").stdout)
    assert after["skills"] == [{"name": "GREET", "level": 1, "trials": 2, "priority": 1.0,
                                "last_trial": {"level": 0, "n": 50, "correct": trial["correct"],
                                               "accuracy": trial["accuracy"], "lower_bound": trial["lower_bound"],
                                               "step": status["global_step"]}}]
    again = cli(realm, "trial", "GREET", "--json")  # level 1 = every level passed: mastered, nothing to try
    assert again.returncode == 0 and "mastered" in again.stdout
