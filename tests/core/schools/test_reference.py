"""The reference log-probs sidecar: written once at a quest's start, read on resume, refused when it is
missing for a started quest or belongs to another quest."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from core.engine import Engine
from core.ledger import Ledger
from core.quest_queue import QuestQueue
from core.schools.reference import ReferenceError

RECORDS = [(i + 1, {"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": " no"}) for i in range(12)]


def test_reference_written_once_read_on_resume_and_refused_when_missing_or_foreign(make_realm, tmp_path):
    realm = make_realm(training={"micro_batch_size": 2, "eval_holdout_every": 0})
    ledger = Ledger(realm.ledger_path)
    path = realm.root / "p.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for _, ex in RECORDS))
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    ledger.update_quest(qid, format="preference", school="dpo")
    sidecar = tmp_path / "q.reference.safetensors"
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    first = engine.train_quest(qid, RECORDS, reference_path=sidecar, should_stop=lambda: engine.global_step >= 2)
    assert first.status == "interrupted" and first.examples_trained == 4
    with safe_open(str(sidecar), framework="pt") as f:
        meta, train = f.metadata(), f.get_tensor("train")
    assert meta["quest_id"] == str(qid) and meta["school"] == "dpo" and meta["global_step"] == "0"
    assert tuple(train.shape) == (12, 2) and meta["rows_per_step"] == "2"
    stamp = sidecar.stat().st_mtime_ns

    with pytest.raises(ReferenceError, match="missing"):
        engine.train_quest(qid, RECORDS, examples_done=4, reference_path=tmp_path / "gone.safetensors")
    other = ledger.get_quest(qid)
    ledger.update_quest(qid, school="ipo")
    with pytest.raises(ReferenceError, match="holds the reference of quest"):
        engine.train_quest(other["id"], RECORDS, examples_done=4, reference_path=sidecar)
    ledger.update_quest(qid, school="dpo")
    done = engine.train_quest(qid, RECORDS, examples_done=4, reference_path=sidecar)
    assert done.status == "completed" and done.examples_trained == 12 and sidecar.stat().st_mtime_ns == stamp
    engine.cleanup()
    ledger.close()


def test_under_lora_the_reference_is_the_hero_with_its_adapter_as_the_quest_starts(make_realm, tmp_path):
    """With a LoRA adapter already trained (an SFT quest first), a DPO quest's reference is the hero as the
    quest starts -- base plus that adapter --, not the bare base with the adapter disabled."""
    import torch

    from core.adapters import adapter_disabled
    from core.schools import make_school

    realm = make_realm(training={"micro_batch_size": 2, "eval_holdout_every": 0, "adapter": "lora",
                                 "learning_rate": 1e-2, "warmup_steps": 0})
    ledger = Ledger(realm.ledger_path)
    queue = QuestQueue(realm, ledger)
    sft = [(i + 1, {"prompt": f"Q{i}:", "completion": f" yes {i}"}) for i in range(8)]
    sft_path = realm.root / "s.jsonl"
    sft_path.write_text("".join(json.dumps(ex) + "\n" for _, ex in sft))
    sft_id = queue.admit(sft_path, "normal")
    ledger.update_quest(sft_id, format="prompt_completion", school="sft")
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    assert engine.adapter is not None
    assert engine.train_quest(sft_id, sft).status == "completed"

    judge = make_school("dpo")
    items = [judge.encode(ex, engine.tokenizer, 64, line) for line, ex in RECORDS]
    engine.model.eval()
    with torch.no_grad():
        hero_now = judge.reference_values(engine, items)
        with adapter_disabled(engine._raw_model):
            bare_base = judge.reference_values(engine, items)
    engine.model.train()
    assert (hero_now - bare_base).abs().max() > 1e-3  # the SFT quest moved the adapter

    path = realm.root / "p.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for _, ex in RECORDS))
    qid = queue.admit(path, "normal")
    ledger.update_quest(qid, format="preference", school="dpo")
    sidecar = tmp_path / "lora.reference.safetensors"
    done = engine.train_quest(qid, RECORDS, reference_path=sidecar)
    assert done.status == "completed" and done.examples_trained == len(RECORDS)
    with safe_open(str(sidecar), framework="pt") as f:
        stored = f.get_tensor("train")
    assert torch.allclose(stored, hero_now, atol=1e-4), (stored - hero_now).abs().max()
    assert all(s["loss"] == s["loss"] for s in ledger.steps())  # finite (not NaN)
    engine.cleanup()
    ledger.close()
