"""A Whisper (distillation) quest killed with SIGKILL mid-quest resumes exactly: real daemon processes, real
SQLite, the nano hero distilled from another nano model."""

from __future__ import annotations

import pytest

from core.daemon import Daemon
from core.hero import create_default_hero
from core.ledger import Ledger
from tests.conftest import write_text_quest
from tests.resume import (
    assert_same_step_metrics,
    assert_same_steps,
    finish_until_idle,
    kill_daemon_at,
    trained_steps,
)

pytestmark = pytest.mark.slow

SETTINGS = dict(training={"micro_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 4,
                          "max_length": 48, "eval_holdout_every": 8, "eval_max_examples": 4, "eval_steps": 3},
                schools={"quest*.jsonl": {"school": "distill", "teacher": "teachers/nano7", "alpha": 0.7,
                                          "temperature": 2.0}})
# 21 global steps of 4 records: the kill at step 6 lands mid-quest even on a loaded machine
RECORDS = 96


def realm_with_quest(make_realm, name):
    realm = make_realm(name, **SETTINGS)
    create_default_hero(realm.root / "teachers" / "nano7", "nano", seed=7)
    write_text_quest(realm.inbox / "quest.jsonl", RECORDS)
    return realm


def test_whisper_quest_killed_mid_quest_resumes_exactly(make_realm):
    ref = realm_with_quest(make_realm, "reference")
    assert Daemon(ref, ref.load_config(), until_idle=True).run() == 0
    ref_ledger = Ledger(ref.ledger_path)
    expected, expected_metrics = trained_steps(ref_ledger), ref_ledger.step_metrics()
    assert len(expected) >= 20 and ref_ledger.list_quests()[0]["school"] == "distill"

    realm = realm_with_quest(make_realm, "killed")
    kill_daemon_at(realm, 6)
    ledger = Ledger(realm.ledger_path)
    assert ledger.list_quests()[0]["state"] == "processing"  # killed mid-quest
    ledger.close()
    finish_until_idle(realm)
    got_ledger = Ledger(realm.ledger_path)
    got = trained_steps(got_ledger)
    assert_same_steps(got, expected)                                 # same global steps, same records, same order
    lines = [ln for _, _, lns, _ in got for ln in lns]
    assert len(lines) == len(set(lines))                             # each record trained once
    assert_same_step_metrics(got_ledger.step_metrics(), expected_metrics)
    for values in expected_metrics.values():
        assert set(values) == {"distill/kl", "distill/ce"}
    assert "quest_resumed" in [e["kind"] for e in got_ledger.events()]
    assert [q["state"] for q in got_ledger.list_quests()] == ["completed"]
