"""The continuous trainer (core/engine.py): global step across quests and restarts, exact resume,
checkpoint fallback, non-finite losses. Real SQLite ledger, real checkpoints, the nano default hero."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core import checkpoint as ckpt
from core.engine import Engine, count_train_examples, is_held_out, resolve_mixed_precision
from core.ledger import Ledger
from core.quest_queue import QuestQueue
from tests.conftest import STORIES260K, needs_shared

SMALL = {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_length": 64, "warmup_steps": 2,
         "learning_rate": 2e-3}


def make_records(n: int, seed: int = 0) -> list[tuple[int, dict]]:
    """n normalized examples of the three shapes and varied lengths (some longer than max_length)."""
    out = []
    for i in range(n):
        k = (i * 7 + seed) % 11
        if i % 3 == 0:
            ex = {"text": f"record {i}: " + "the fox runs " * (k + 1)}
        elif i % 3 == 1:
            ex = {"prompt": f"Q{i}: what is {k} plus {k}?", "completion": f" It is {2 * k}."}
        else:
            ex = {"messages": [{"role": "user", "content": f"hello {i}"},
                               {"role": "assistant", "content": "hi! " * (k % 4 + 1)}]}
        out.append((i + 1, ex))
    return out


def admit(realm, ledger, name: str, records) -> int:
    path = realm.root / name
    path.write_text("".join(json.dumps(ex) + "\n" for _, ex in records), encoding="utf-8")
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    ledger.update_quest(qid, format="sft", records=len(records))
    return qid


def start(realm, ledger) -> Engine:
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    return engine


def trained_lines(ledger: Ledger) -> list[int]:
    return [line for s in ledger.steps() for line in json.loads(s["examples_json"])]


def test_holdout_helpers():
    assert [i for i in range(12) if is_held_out(i, 4)] == [3, 7, 11]
    assert not any(is_held_out(i, 0) for i in range(10))
    assert count_train_examples(12, 4) == 9 and count_train_examples(13, 4) == 10
    assert count_train_examples(5, 0) == 5
    assert resolve_mixed_precision("no") == "no"
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == "no" and resolve_mixed_precision("bf16") == "no"


def test_global_step_continues_across_quests_and_restarts(make_realm):
    realm = make_realm(training={**SMALL, "save_steps": 3, "eval_holdout_every": 4, "eval_max_examples": 3,
                                 "eval_steps": 2})
    ledger = Ledger(realm.ledger_path)
    engine = start(realm, ledger)
    assert engine.global_step == 0 and engine.hero_info["newborn"] and engine.hero_info["checkpoint"] is None
    assert (realm.hero_dir("hero") / "base" / "model.safetensors").is_file()
    assert engine.hero_info["architecture"] == "Qwen3ForCausalLM" and engine.latest_checkpoint_info() is None

    rec1 = make_records(30)
    q1 = admit(realm, ledger, "one.jsonl", rec1)
    r1 = engine.train_quest(q1, rec1)
    assert r1.status == "completed" and r1.steps == engine.global_step == r1.quest_steps > 2
    assert r1.examples_trained == r1.examples_total == count_train_examples(30, 4) == 23
    assert r1.eval_examples == 3 and math.isfinite(r1.eval_loss) and math.isfinite(r1.loss)
    held_out = {line for line, _ in rec1 if line % 4 == 0}  # record i is held out when i % 4 == 3
    assert sorted(trained_lines(ledger)) == sorted({line for line, _ in rec1} - held_out)
    quest = ledger.get_quest(q1)
    assert (quest["steps"], quest["examples_trained"], quest["first_global_step"], quest["last_global_step"]) \
        == (r1.steps, 23, 1, r1.steps)
    eval_steps = [e["global_step"] for e in ledger.evals(q1)]
    assert eval_steps == sorted({s for s in range(1, r1.steps + 1) if s % 2 == 0} | {r1.steps})
    assert [p.name for p in ckpt.list_checkpoints(realm.checkpoints_dir("hero"))] == \
        [ckpt.checkpoint_name(s) for s in sorted({s for s in range(1, r1.steps + 1) if s % 3 == 0} | {r1.steps})]
    state = ckpt.read_checkpoint_info(ckpt.latest_checkpoint(realm.checkpoints_dir("hero")))
    assert state["cursor"] == {"quest_id": q1, "examples_done": 23, "quest_done": True,
                               "eval_holdout_every": 4, "epochs": 1, "shuffle": False}
    assert state["hero"]["newborn"] and state["config"]["training"]["save_steps"] == 3
    assert state["reason"] == "quest_end" and state["eval_loss"] == r1.eval_loss

    rec2 = make_records(12, seed=5)
    q2 = admit(realm, ledger, "two.jsonl", rec2)
    r2 = engine.train_quest(q2, rec2)
    assert engine.global_step == r1.steps + r2.steps
    assert [s["global_step"] for s in ledger.steps()] == list(range(1, engine.global_step + 1))
    assert ledger.get_quest(q2)["first_global_step"] == r1.steps + 1
    assert engine.latest_checkpoint_info()["step"] == engine.global_step == engine.last_saved_step
    final_step = engine.global_step
    engine.cleanup()

    # restart: same global step, same weights; a changed learning rate takes effect
    config_data = json.loads(realm.config_path.read_text())
    config_data["training"]["learning_rate"] = 5e-4
    realm.config_path.write_text(json.dumps(config_data))
    again = start(realm, ledger)
    assert again.global_step == final_step and again.resume_cursor["quest_id"] == q2
    assert again.resume_cursor["quest_done"] and again.hero_info["newborn"]
    assert again.hero_info["checkpoint"].endswith(ckpt.checkpoint_name(final_step))
    rec3 = make_records(9, seed=9)
    q3 = admit(realm, ledger, "three.jsonl", rec3)
    r3 = again.train_quest(q3, rec3)
    steps = ledger.steps(since_step=final_step)
    assert [s["global_step"] for s in steps] == list(range(final_step + 1, final_step + r3.steps + 1))
    assert {s["learning_rate"] for s in steps} == {5e-4}
    assert ledger.get_quest(q3)["steps"] == r3.steps and ledger.get_quest(q1)["steps"] == r1.steps
    again.cleanup()
    ledger.close()


def _train_uninterrupted(make_realm, records, training):
    realm = make_realm("run-a", training=training)
    ledger = Ledger(realm.ledger_path)
    qid = admit(realm, ledger, "quest.jsonl", records)
    engine = start(realm, ledger)
    result = engine.train_quest(qid, records)
    engine.cleanup()
    return ledger, result


def test_resume_after_a_kill_is_exact(make_realm):
    training = {**SMALL, "save_steps": 4, "eval_holdout_every": 5, "eval_max_examples": 3, "eval_steps": 3}
    records = make_records(70)
    ledger_a, result_a = _train_uninterrupted(make_realm, records, training)
    assert result_a.steps >= 9

    # run B: trains, checkpoints at step 4, trains two more steps, then "dies" (nothing saved)
    realm = make_realm("run-b", training=training)
    ledger = Ledger(realm.ledger_path)
    qid = admit(realm, ledger, "quest.jsonl", records)
    doomed = start(realm, ledger)
    interrupted = doomed.train_quest(qid, records, should_stop=lambda: doomed.global_step >= 6)
    assert interrupted.status == "interrupted" and interrupted.steps == 6 and interrupted.examples_total is None
    assert ledger.get_quest(qid)["steps"] == 6
    doomed.cleanup()

    # a config edit while the quest is half done must not shift its example indices: the quest keeps the
    # held-out spacing it started with (recorded in the checkpoint's cursor)
    config_data = json.loads(realm.config_path.read_text())
    config_data["training"]["eval_holdout_every"] = 7
    realm.config_path.write_text(json.dumps(config_data))
    engine = start(realm, ledger)  # the restart: loads step-00000004, rolls the ledger back to it
    assert engine.global_step == 4 and [s["global_step"] for s in ledger.steps()] == [1, 2, 3, 4]
    quest = ledger.get_quest(qid)
    assert quest["steps"] == 4 and quest["examples_trained"] == ledger.steps()[-1]["example_end"]
    assert engine.resume_cursor == {"quest_id": qid, "examples_done": quest["examples_trained"], "quest_done": False,
                                    "eval_holdout_every": 5, "epochs": 1, "shuffle": False}
    assert any(e["kind"] == "rollback" for e in ledger.events())
    result = engine.train_quest(qid, records, examples_done=quest["examples_trained"])
    assert any(e["kind"] == "holdout_pinned" for e in ledger.events())
    engine.cleanup()

    assert result.status == "completed" and result.global_step == result_a.global_step
    assert result.examples_trained == result_a.examples_trained == result.examples_total
    assert result.quest_steps == result_a.quest_steps and result.steps == result_a.steps - 4
    steps_a, steps_b = ledger_a.steps(), ledger.steps()
    assert [s["global_step"] for s in steps_b] == [s["global_step"] for s in steps_a]
    lines_b = trained_lines(ledger)
    assert len(lines_b) == len(set(lines_b)) and lines_b == trained_lines(ledger_a)  # each exactly once
    for a, b in zip(steps_a, steps_b, strict=True):
        assert (a["example_start"], a["example_end"], a["learning_rate"]) == \
            (b["example_start"], b["example_end"], b["learning_rate"])
        assert b["loss"] == pytest.approx(a["loss"], rel=0, abs=1e-6), a["global_step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    evals_a = [(e["global_step"], e["eval_loss"]) for e in ledger_a.evals()]
    evals_b = [(e["global_step"], e["eval_loss"]) for e in ledger.evals()]
    assert [s for s, _ in evals_b] == [s for s, _ in evals_a]
    assert [v for _, v in evals_b] == pytest.approx([v for _, v in evals_a], abs=1e-6)
    ledger.close()
    ledger_a.close()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(make_realm):
    realm = make_realm(training={**SMALL, "save_steps": 2})
    ledger = Ledger(realm.ledger_path)
    records = make_records(24)
    qid = admit(realm, ledger, "quest.jsonl", records)
    engine = start(realm, ledger)
    first = engine.train_quest(qid, records)
    engine.cleanup()
    last = first.global_step
    saved = [ckpt.step_of(p) for p in ckpt.list_checkpoints(realm.checkpoints_dir("hero"))]
    assert saved[-1] == last and len(saved) >= 2
    previous = saved[-2]
    lines_before = trained_lines(ledger)
    weights = realm.checkpoints_dir("hero") / ckpt.checkpoint_name(last) / ckpt.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # a torn write

    engine = start(realm, ledger)
    assert engine.global_step == previous
    assert (realm.checkpoints_dir("hero") / (ckpt.checkpoint_name(last) + ".corrupt")).is_dir()
    warnings = [e for e in ledger.events() if e["kind"] == "checkpoint_corrupt"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    quest = ledger.get_quest(qid)
    assert quest["steps"] == previous and quest["examples_trained"] == ledger.steps()[-1]["example_end"]
    result = engine.train_quest(qid, records, examples_done=quest["examples_trained"])
    assert result.global_step == last and trained_lines(ledger) == lines_before
    assert ckpt.latest_checkpoint(realm.checkpoints_dir("hero")).name == ckpt.checkpoint_name(last)
    engine.cleanup()
    ledger.close()


def test_nonfinite_loss_skips_the_update_without_a_step(make_realm):
    realm = make_realm(training={**SMALL, "max_nonfinite_steps": 4})  # 3 in a row: skipped, no rollback
    # (the rollback after max_nonfinite_steps: tests/core/test_faults.py)
    ledger = Ledger(realm.ledger_path)
    records = make_records(10)
    qid = admit(realm, ledger, "quest.jsonl", records)
    engine = start(realm, ledger)
    with torch.no_grad():
        engine._raw_model.get_input_embeddings().weight[:, 0] = float("nan")
    result = engine.train_quest(qid, records)
    assert result.status == "completed" and engine.global_step == 0 and result.steps == 0
    assert result.examples_trained == 10 and ledger.steps() == []
    assert [e["level"] for e in ledger.events() if e["kind"] == "nonfinite_loss"] == ["warning"] * 3
    engine.cleanup()
    ledger.close()


def test_should_stop_before_the_first_step(make_realm):
    realm = make_realm(training=SMALL)
    ledger = Ledger(realm.ledger_path)
    records = make_records(6)
    qid = admit(realm, ledger, "quest.jsonl", records)
    engine = start(realm, ledger)
    result = engine.train_quest(qid, records, examples_done=2, should_stop=lambda: True)
    assert (result.status, result.steps, result.examples_trained) == ("interrupted", 0, 2)
    assert ckpt.list_checkpoints(realm.checkpoints_dir("hero")) == []  # the caller saves
    path = engine.save_checkpoint("sigterm")
    assert ckpt.read_checkpoint_info(path)["cursor"]["examples_done"] == 2
    engine.cleanup()
    ledger.close()


@needs_shared(STORIES260K)
def test_stories260k_base_model_without_packing(make_realm):
    realm = make_realm(hero={"base_model": str(STORIES260K)},
                       training={**SMALL, "packing": False, "max_length": 48, "save_steps": 100})
    ledger = Ledger(realm.ledger_path)
    records = make_records(12)
    qid = admit(realm, ledger, "quest.jsonl", records)
    engine = start(realm, ledger)
    assert not engine.hero_info["newborn"] and engine.hero_info["architecture"] == "LlamaForCausalLM"
    assert engine.hero_info["base_model"] == str(STORIES260K)
    assert engine.count_tokens(records[2][1])[1] > 0
    result = engine.train_quest(qid, records)
    assert result.steps == 3 and len(trained_lines(ledger)) == 12  # 4 rows (one example each) per step
    assert all(s["example_end"] - s["example_start"] == 4 for s in ledger.steps())
    engine.cleanup()
    again = start(realm, ledger)
    assert again.global_step == 3 and again.tokenizer.chat_template == engine.tokenizer.chat_template
    again.cleanup()
    ledger.close()


def test_packed_steps_on_cpu_compute_the_same_loss_as_padded_rows_with_the_4d_mask(make_realm):
    """The engine's CPU path (examples end to end, attention per example) against the reference: the same
    rows padded to max_length with the block-diagonal mask under SDPA, from the same initial weights."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from core.chat import tokenize_example
    from core.packing import PACKED_SDPA, collate, iter_steps, micro_batches

    realm = make_realm(training={**SMALL, "warmup_steps": 0, "save_steps": 100})
    ledger = Ledger(realm.ledger_path)
    records = make_records(16)
    qid = admit(realm, ledger, "quest.jsonl", records)
    engine = start(realm, ledger)
    assert engine._attn == PACKED_SDPA  # CPU: segmented attention
    t = engine.config.training
    tokenized = [tokenize_example(ex, engine.tokenizer, t.max_length, line) for line, ex in records]
    rows = next(iter_steps(tokenized, t.micro_batch_size * t.gradient_accumulation_steps, t.max_length))
    reference = AutoModelForCausalLM.from_pretrained(realm.hero_dir("hero") / "base", dtype=torch.float32)
    reference.set_attn_implementation("sdpa")
    total, n = 0.0, 0
    with torch.no_grad():
        for mb in micro_batches(rows, t.micro_batch_size):
            b = collate(mb, engine.tokenizer.pad_token_id, t.max_length)
            logits = reference(input_ids=b.input_ids, attention_mask=b.attention_mask,
                               position_ids=b.position_ids).logits[:, :-1]
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), b.labels[:, 1:].reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            n += b.num_trainable
    calls = []
    engine.train_quest(qid, records, should_stop=lambda: len(calls) > 1 or bool(calls.append(1)))
    first = ledger.steps()[0]
    assert first["example_end"] == sum(len(r) for r in rows)
    assert first["loss"] == pytest.approx(total / n, abs=1e-5)
    engine.cleanup()
    ledger.close()


def test_shuffled_epochs_train_every_example_once_per_epoch_in_the_seeded_order(make_realm):
    from core.epochs import permutation

    realm = make_realm(training={**SMALL, "save_steps": 1000, "eval_holdout_every": 5, "eval_max_examples": 2},
                       schools={"shuf*": {"epochs": 3, "shuffle": True}, "*": {"epochs": 2}})
    ledger = Ledger(realm.ledger_path)
    engine = start(realm, ledger)
    records = make_records(20)
    qid = admit(realm, ledger, "shuffled.jsonl", records)
    result = engine.train_quest(qid, records)
    n = count_train_examples(20, 5)
    assert result.status == "completed" and result.examples_trained == result.examples_total == 3 * n
    train_lines = [line for i, (line, _) in enumerate(records) if not is_held_out(i, 5)]
    key = ledger.get_quest(qid)["content_hash"]
    expected = [train_lines[j] for epoch in range(3) for j in permutation(n, key, epoch)]
    assert trained_lines(ledger) == expected and expected[:n] != train_lines
    assert engine.cursor["epochs"] == 3 and engine.cursor["shuffle"] is True

    # the other glob: two epochs in file order, the file read again for the second (records as a function)
    other = make_records(10, seed=3)
    q2 = admit(realm, ledger, "plain.jsonl", other)
    with pytest.raises(ValueError, match="function"):
        engine.train_quest(q2, other)
    done = engine.train_quest(q2, lambda: iter(other))
    plain = [line for i, (line, _) in enumerate(other) if not is_held_out(i, 5)]
    assert done.examples_total == 2 * len(plain)
    assert trained_lines(ledger)[3 * n:] == plain * 2
    engine.cleanup()
