"""A DPO quest killed with SIGKILL mid-quest resumes exactly: real daemon processes, real SQLite, the nano hero."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from core.daemon import Daemon
from core.ledger import Ledger
from core.quest_queue import QuestQueue
from tests.conftest import PYTHON, python_env, wait_for

pytestmark = pytest.mark.slow

SETTINGS = dict(training={"micro_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 4,
                          "eval_holdout_every": 8, "eval_max_examples": 4, "eval_steps": 3},
                schools={"prefs*.jsonl": {"school": "dpo", "beta": 0.2}})


def write_pairs(path, n):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                                "rejected": f" I think {3 * i + 1}{'?' * (i % 3)}"}) + "\n")


def trained(ledger):
    return [(r["global_step"], r["quest_id"], tuple(json.loads(r["examples_json"])), r["loss"])
            for r in ledger.steps()]


def test_dpo_quest_killed_mid_quest_resumes_exactly(make_realm):
    ref = make_realm("reference", **SETTINGS)
    write_pairs(ref.inbox / "prefs.jsonl", 44)
    assert Daemon(ref, ref.load_config(), until_idle=True).run() == 0
    ref_ledger = Ledger(ref.ledger_path)
    expected, expected_metrics = trained(ref_ledger), ref_ledger.step_metrics()
    assert len(expected) >= 9
    quest = ref_ledger.list_quests()[0]
    assert quest["school"] == "dpo" and quest["state"] == "completed"
    assert QuestQueue(ref, ref_ledger).reference_path_of(quest).is_file()  # moved with the quest

    realm = make_realm("killed", **SETTINGS)
    write_pairs(realm.inbox / "prefs.jsonl", 44)
    env = python_env()
    with open(realm.root / "daemon.log", "wb") as log:
        proc = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    ledger = None

    def reached():
        nonlocal ledger
        if ledger is None and realm.ledger_path.exists():
            ledger = Ledger(realm.ledger_path)
        last = ledger.last_step() if ledger else None
        return last and last["global_step"] >= 6

    try:
        wait_for(reached, timeout=180, what="global step 6")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    quest = ledger.list_quests()[0]
    assert quest["state"] == "processing" and quest["steps"] >= 6  # killed mid-quest, with its reference stored
    assert QuestQueue(realm, ledger).reference_path_of(quest).is_file()
    ledger.close()
    done = subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon", "--until-idle"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got_ledger = Ledger(realm.ledger_path)
    got = trained(got_ledger)
    assert [g[:3] for g in got] == [e[:3] for e in expected]        # same global steps, same pairs, same order
    lines = [ln for _, _, lns, _ in got for ln in lns]
    assert len(lines) == len(set(lines))                             # each pair trained once
    assert [g[3] for g in got] == pytest.approx([e[3] for e in expected], rel=0, abs=1e-5)
    assert got[-1][3] == pytest.approx(expected[-1][3], abs=1e-5)    # the same final loss
    metrics = got_ledger.step_metrics()
    assert sorted(metrics) == sorted(expected_metrics)
    for step, values in expected_metrics.items():
        assert set(values) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
        assert metrics[step] == pytest.approx(values, abs=1e-5)
    assert "quest_resumed" in [e["kind"] for e in got_ledger.events()]  # resumed from its last checkpoint
    assert [q["state"] for q in got_ledger.list_quests()] == ["completed"]
