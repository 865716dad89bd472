"""Checkpoints (core/checkpoint.py): atomic save, listing, loading, corruption detection, repair."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from core import checkpoint as ckpt
from core.hero import HERO_SIZES, build_byte_tokenizer


@pytest.fixture(scope="module")
def parts():
    from transformers import Qwen3Config, Qwen3ForCausalLM, get_constant_schedule_with_warmup

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**HERO_SIZES["nano"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = get_constant_schedule_with_warmup(opt, 3)
    loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    opt.step()
    sched.step()
    return model, build_byte_tokenizer(), opt, sched


def save(parts, d, step, **info):
    model, tok, opt, sched = parts
    return ckpt.save_checkpoint(d, global_step=step, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                                info={ckpt.KEY_CURSOR: {ckpt.KEY_QUEST_ID: 1, ckpt.KEY_EXAMPLES_DONE: step * 4,
                                                        ckpt.KEY_QUEST_DONE: False}, **info})


def test_save_list_and_load_round_trip(parts, tmp_path):
    random.seed(123)
    torch.manual_seed(456)
    p1 = save(parts, tmp_path, 5, reason="save_steps")
    p2 = save(parts, tmp_path, 12, reason="quest_end")
    assert p1.name == "step-00000005" and p2.name == "step-00000012"
    assert ckpt.list_checkpoints(tmp_path) == [p1, p2] and ckpt.latest_checkpoint(tmp_path) == p2
    assert ckpt.list_checkpoints(tmp_path / "absent") == [] and ckpt.latest_checkpoint(tmp_path / "absent") is None
    assert sorted(os.listdir(tmp_path)) == ["step-00000005", "step-00000012"]  # no temporary folders left
    state = ckpt.load_trainer_state(p2)
    assert state[ckpt.KEY_GLOBAL_STEP] == 12 and state[ckpt.KEY_FORMAT_VERSION] == ckpt.FORMAT_VERSION
    assert state[ckpt.KEY_CURSOR] == {"quest_id": 1, "examples_done": 48, "quest_done": False}
    assert state[ckpt.KEY_REASON] == "quest_end"
    _, _, opt, sched = parts
    assert state[ckpt.KEY_SCHEDULER] == sched.state_dict()
    saved_avg = state[ckpt.KEY_OPTIMIZER]["state"][0]["exp_avg"]
    assert torch.equal(saved_avg, opt.state_dict()["state"][0]["exp_avg"])
    expected = (random.random(), torch.rand(3))
    ckpt.set_rng_state(state[ckpt.KEY_RNG])
    got = (random.random(), torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(p2)
    for (name, a), b in zip(parts[0].state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(p2).chat_template == parts[1].chat_template
    assert ckpt.read_checkpoint_info(p2)[ckpt.KEY_GLOBAL_STEP] == 12


def test_resaving_a_step_replaces_it(parts, tmp_path):
    save(parts, tmp_path, 7, reason="save_steps")
    p = save(parts, tmp_path, 7, reason="quest_end")
    assert ckpt.read_checkpoint_info(p)[ckpt.KEY_REASON] == "quest_end"
    assert os.listdir(tmp_path) == ["step-00000007"]


def test_a_failing_save_leaves_nothing(parts, tmp_path):
    model, tok, opt, sched = parts

    class Broken:
        def state_dict(self):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, global_step=3, model=model, tokenizer=tok, optimizer=Broken(),
                             scheduler=sched, info={})
    assert os.listdir(tmp_path) == []


def test_truncated_or_missing_files_raise_checkpoint_error(parts, tmp_path):
    p = save(parts, tmp_path, 1)
    weights = p / ckpt.WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_trainer_state(p)
    weights.write_bytes(data[:5])
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_trainer_state(p)
    weights.write_bytes(data)
    ckpt.load_trainer_state(p)  # whole again
    blob = (p / ckpt.TRAINER_STATE_PT).read_bytes()
    (p / ckpt.TRAINER_STATE_PT).write_bytes(blob[:100])
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.pt"):
        ckpt.load_trainer_state(p)
    (p / ckpt.TRAINER_STATE_PT).write_bytes(blob)
    tokenizer_json = (p / "tokenizer.json").read_text()
    (p / "tokenizer.json").write_text(tokenizer_json[:50])
    with pytest.raises(ckpt.CheckpointError, match="tokenizer.json"):
        ckpt.load_trainer_state(p)
    (p / "tokenizer.json").write_text(tokenizer_json)
    ckpt.load_trainer_state(p)
    (p / ckpt.TRAINER_STATE_JSON).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json"):
        ckpt.read_checkpoint_info(p)
    weights.unlink()
    with pytest.raises(ckpt.CheckpointError):
        ckpt.verify_weights(p)


def test_clean_incomplete_quarantine_and_prune(parts, tmp_path):
    p3 = save(parts, tmp_path, 3)
    p4 = save(parts, tmp_path, 4)
    (tmp_path / ".tmp-step-00000009-123").mkdir()  # a save killed midway
    os.rename(p4, tmp_path / ".old-step-00000004")  # killed between the two renames of a re-save
    notes = ckpt.clean_incomplete(tmp_path)
    assert len(notes) == 2 and sorted(os.listdir(tmp_path)) == ["step-00000003", "step-00000004"]
    moved = ckpt.quarantine(p4)
    assert moved.name == "step-00000004.corrupt" and ckpt.list_checkpoints(tmp_path) == [p3]
    assert ckpt.quarantine(save(parts, tmp_path, 4)).name == "step-00000004.corrupt2"
    save(parts, tmp_path, 5)
    save(parts, tmp_path, 6)
    assert [p.name for p in ckpt.prune_checkpoints(tmp_path, 2)] == ["step-00000003"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000005", "step-00000006"]
    assert json.loads((tmp_path / "step-00000006" / ckpt.TRAINER_STATE_JSON).read_text())["global_step"] == 6
    assert ckpt.step_of("step-00001234") == 1234
    with pytest.raises(ValueError):
        ckpt.step_of("step-12")


def test_unicode_digit_folders_are_not_checkpoints(tmp_path):
    from tests.core.test_vault import JUNK_STEP_NAMES

    (tmp_path / "step-00000007").mkdir()
    for name in JUNK_STEP_NAMES:
        (tmp_path / name).mkdir()
        with pytest.raises(ValueError):
            ckpt.step_of(tmp_path / name)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000007"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000007"
