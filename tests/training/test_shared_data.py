"""The main job on real data: stories260K as the base model, Shakespeare, GSM8K (field_map), hh-rlhf."""

from __future__ import annotations

import sys

import pytest

from core.daemon import Daemon
from core.ledger import Ledger
from tests.conftest import ROOT, SHARED_DATA, STORIES260K, needs_shared

sys.path.insert(0, str(ROOT / "scripts"))
from shared_quests import GSM8K_FIELD_MAP, write_shared_quests  # noqa: E402

pytestmark = [needs_shared(STORIES260K), needs_shared(SHARED_DATA), pytest.mark.slow]


def test_stories260k_realm_trains_every_sft_quest_and_heldout_loss_falls(make_realm):
    realm = make_realm(hero={"base_model": str(STORIES260K)},
                       training={"max_length": 256, "micro_batch_size": 4, "learning_rate": 2e-3,
                                 "save_steps": 50, "eval_steps": 5, "eval_holdout_every": 10,
                                 "eval_max_examples": 16},
                       validation={"field_map": GSM8K_FIELD_MAP})
    # hh-rlhf would now train (Judge): its detection is tested in tests/core/test_validation.py
    write_shared_quests(realm.inbox, shakespeare_chars=60_000, gsm8k_lines=120, quests=2, hh_rlhf=False)
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0

    ledger = Ledger(realm.ledger_path)
    quests = {q["name"]: q for q in ledger.list_quests()}
    assert {n: q["state"] for n, q in quests.items()} == {
        "shakespeare_1.jsonl": "completed", "shakespeare_2.jsonl": "completed",
        "gsm8k_train.jsonl": "completed"}
    assert quests["gsm8k_train.jsonl"]["format"] == "prompt_completion"
    sft = [q for q in quests.values() if q["state"] == "completed"]
    assert ledger.last_step()["global_step"] == sum(q["steps"] for q in sft)
    for q in sft:
        assert q["examples_trained"] == q["examples_total"] > 0
    evals = ledger.evals(quests["shakespeare_1.jsonl"]["id"])
    assert len(evals) >= 3
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
