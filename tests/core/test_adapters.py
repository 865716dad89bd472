"""Adapters (core/adapters.py): LoRA on the real engine with exact resume, small adapter checkpoints, the
base's identity verified, inference through the merged model, QLoRA refused where it cannot run, and
gradient checkpointing exact on packed batches. Real ledger, real checkpoints, the nano hero."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core import adapters
from core import checkpoint as ckpt
from core.chat import TokenizedExample
from core.checkpoint_layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    KEY_ADAPTER,
    is_adapter_checkpoint,
)
from core.config import ConfigError, parse_config
from core.engine import Engine
from core.evaluation import mean_token_loss
from core.hero import HERO_SIZES, load_model, load_tokenizer
from core.ledger import Ledger
from core.packing import collate, collate_flat, model_attention_mask, register_packed_sdpa
from tests.conftest import STORIES260K, needs_shared
from tests.core.test_engine import SMALL, admit, make_records

LORA = {**SMALL, "adapter": "lora", "lora": {"r": 4, "alpha": 8}, "learning_rate": 5e-3}


def _start(realm, ledger) -> Engine:
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    return engine


def _qwen3(size: str = "nano"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**HERO_SIZES[size]))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_default_targets_are_the_decoder_projections_as_peft_all_linear():
    from peft import LoraConfig, get_peft_model

    model = _qwen3()
    ours = adapters.default_target_modules(model)
    assert ours == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft = get_peft_model(_qwen3(), LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(peft.peft_config["default"].target_modules) == ours   # PEFT's "all-linear" picks the same
    assert "lm_head" not in ours and "embed_tokens" not in ours


@needs_shared(STORIES260K)
def test_default_targets_on_stories260k_a_llama():
    model = load_model(STORIES260K, parse_config({}).hero)
    assert adapters.default_target_modules(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                      "up_proj", "v_proj"]


def test_lora_trains_only_the_adapter_and_checkpoints_hold_it_alone(make_realm):
    realm = make_realm(training={**LORA, "save_steps": 3})
    ledger = Ledger(realm.ledger_path)
    engine = _start(realm, ledger)
    info = engine.hero_info
    assert info["adapter"] == "lora" and 0 < info["trainable_parameters"] < info["parameters"] / 5
    base = {n: p.detach().clone() for n, p in engine._raw_model.named_parameters() if not p.requires_grad}
    records = make_records(20)
    result = engine.train_quest(admit(realm, ledger, "a.jsonl", records), records)
    assert result.status == "completed" and math.isfinite(result.loss)
    for n, p in engine._raw_model.named_parameters():       # the base never moves
        if n in base:
            assert torch.equal(p, base[n]), n
    path = engine.last_checkpoint
    assert is_adapter_checkpoint(path) and (path / ADAPTER_WEIGHTS_FILE).is_file()
    assert not (path / ckpt.WEIGHTS_FILE).exists() and not (path / "config.json").exists()
    state = ckpt.load_trainer_state(path)
    rec = state[KEY_ADAPTER]
    assert rec["type"] == "lora" and rec["r"] == 4 and rec["trainable_parameters"] == info["trainable_parameters"]
    assert rec["base"]["path"] == str((realm.hero_dir("hero") / "base").resolve())
    assert len(rec["base"]["weights_sha256"]) == 64 and state["hero"]["adapter"] == "lora"
    # the adapter's weights only: a small fraction of a full model's
    adapter_bytes = (path / ADAPTER_WEIGHTS_FILE).stat().st_size
    full_bytes = (realm.hero_dir("hero") / "base" / "model.safetensors").stat().st_size
    assert adapter_bytes < full_bytes / 4
    engine.cleanup()


def test_lora_resume_is_exact(make_realm):
    records = make_records(36)
    settings = {**LORA, "save_steps": 2, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}

    ref = make_realm("ref", training=settings)
    ledger = Ledger(ref.ledger_path)
    engine = _start(ref, ledger)
    engine.train_quest(admit(ref, ledger, "a.jsonl", records), records)
    expected = [(s["global_step"], s["example_start"], s["loss"]) for s in ledger.steps()]
    engine.cleanup()

    realm = make_realm("cut", training=settings)
    ledger = Ledger(realm.ledger_path)
    engine = _start(realm, ledger)
    qid = admit(realm, ledger, "a.jsonl", records)
    calls = 0

    def stop_after_five():
        nonlocal calls
        calls += 1
        return calls > 5

    assert engine.train_quest(qid, records, should_stop=stop_after_five).status == "interrupted"
    engine.cleanup()  # no save: the steps after the last save_steps checkpoint are lost, as in a crash
    engine = _start(realm, ledger)
    assert engine.global_step == 4 and engine.hero_info["adapter"] == "lora"
    engine.train_quest(qid, records, examples_done=ledger.get_quest(qid)["examples_trained"])
    got = [(s["global_step"], s["example_start"], s["loss"]) for s in ledger.steps()]
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected], rel=1e-5, abs=1e-6)
    engine.cleanup()


def test_a_different_base_is_refused_on_resume(make_realm):
    realm = make_realm(training=LORA)
    ledger = Ledger(realm.ledger_path)
    engine = _start(realm, ledger)
    records = make_records(8)
    engine.train_quest(admit(realm, ledger, "a.jsonl", records), records)
    engine.cleanup()
    base = realm.hero_dir("hero") / "base"
    model = load_model(base, parse_config({}).hero)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)   # the same architecture, other weights
    shutil.rmtree(base)
    model.save_pretrained(base)
    load_tokenizer("embedded:byte-level", parse_config({}).hero).save_pretrained(base)
    with pytest.raises(adapters.AdapterError, match="an adapter only fits the weights it was trained on"):
        _start(realm, ledger)


def test_switching_between_full_and_adapter_is_refused_with_the_way_out(make_realm):
    realm = make_realm(training=SMALL)
    ledger = Ledger(realm.ledger_path)
    engine = _start(realm, ledger)
    engine.save_checkpoint("test")
    engine.cleanup()
    data = json.loads(realm.config_path.read_text())
    data["training"]["adapter"] = "lora"
    realm.config_path.write_text(json.dumps(data))
    with pytest.raises(adapters.AdapterError, match="full fine-tuning checkpoint.*new hero.name"):
        _start(realm, ledger)


def test_eval_and_the_oracle_path_load_an_adapter_checkpoint_merged(make_realm):
    realm = make_realm(training={**LORA, "eval_holdout_every": 3, "eval_max_examples": 4})
    ledger = Ledger(realm.ledger_path)
    engine = _start(realm, ledger)
    records = make_records(24)
    result = engine.train_quest(admit(realm, ledger, "a.jsonl", records), records)
    engine.cleanup()
    hero = realm.load_config().hero
    merged = load_model(result.checkpoint, hero)       # what eval and the oracle call
    assert not adapters.is_adapter_model(merged) and type(merged).__name__ == "Qwen3ForCausalLM"
    tokenizer = load_tokenizer(result.checkpoint, hero)
    from core.chat import tokenize_example

    held = [tokenize_example(ex, tokenizer, 64, line) for i, (line, ex) in enumerate(records) if i % 3 == 2][:4]
    assert mean_token_loss(merged, tokenizer, held) == pytest.approx(result.eval_loss, rel=1e-4)
    base = load_model(realm.hero_dir("hero") / "base", hero)
    assert mean_token_loss(base, tokenizer, held) != pytest.approx(result.eval_loss, rel=1e-3)
    # the realm moved: the embedded base is found beside the checkpoint, and still verified by its hash
    moved = realm.root.parent / "moved"
    shutil.move(realm.root, moved)
    checkpoint = moved / "models" / "hero" / "checkpoints" / Path(result.checkpoint).name
    assert mean_token_loss(load_model(checkpoint, hero), tokenizer, held) == pytest.approx(result.eval_loss, rel=1e-4)
    other = load_model(moved / "models" / "hero" / "base", hero)
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)
    other.save_pretrained(moved / "models" / "hero" / "base")
    with pytest.raises(adapters.AdapterError, match="restore the base it was trained on"):
        load_model(checkpoint, hero)


def test_adapter_disabled_is_the_base_and_adapter_state_a_copy(make_realm):
    realm = make_realm(training=LORA)
    ledger = Ledger(realm.ledger_path)
    engine = _start(realm, ledger)
    records = make_records(12)
    engine.train_quest(admit(realm, ledger, "a.jsonl", records), records)
    model = engine._raw_model
    base = load_model(realm.hero_dir("hero") / "base", realm.load_config().hero).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    with torch.no_grad():
        with adapters.adapter_disabled(model):
            off = model(input_ids=ids, use_cache=False).logits
        on = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(off, base(input_ids=ids, use_cache=False).logits, atol=1e-5)
    assert not torch.allclose(on, off, atol=1e-4)
    snap = adapters.adapter_state(model)
    assert snap and all(t.device.type == "cpu" for t in snap.values())
    with pytest.raises(adapters.AdapterError):
        with adapters.adapter_disabled(base):
            pass
    engine.cleanup()


def test_qlora_is_refused_without_cuda_or_bitsandbytes(make_realm):
    config = parse_config({"training": {"adapter": "qlora"}})
    problems = adapters.environment_problems(config.training)
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: bench/gpu_check.py runs QLoRA")
    assert any("needs a CUDA GPU" in p for p in problems) and all(p.startswith("training.adapter:") for p in problems)
    with pytest.raises(ConfigError, match="qlora"):
        adapters.check_environment(config)
    assert adapters.environment_problems(parse_config({"training": {"adapter": "lora"}}).training) == []
    realm = make_realm(training={"adapter": "qlora"})
    engine = Engine(realm, realm.load_config(), Ledger(realm.ledger_path))
    with pytest.raises(ConfigError, match="CUDA"):
        engine.setup()       # refused before anything loads
    assert not (realm.hero_dir("hero") / "base").exists()


def test_weights_hash_is_cached_and_follows_the_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a" * 100)
    (folder / "adapter_model.safetensors").write_bytes(b"ignored")
    cache = tmp_path / "cache.json"
    first = adapters.weights_sha256(folder, cache)
    assert json.loads(cache.read_text()) and adapters.weights_sha256(folder, cache) == first
    (folder / "model.safetensors").write_bytes(b"b" * 100)
    assert adapters.weights_sha256(folder, cache) != first
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(adapters.AdapterError, match="no model weight file"):
        adapters.weights_sha256(empty)


# --- gradient checkpointing on packed batches -------------------------------------------------------------
def _examples() -> list[list[TokenizedExample]]:
    g = torch.Generator().manual_seed(1)
    exs = [TokenizedExample(torch.randint(0, 256, (n,), generator=g).tolist(),
                            torch.randint(0, 256, (n,), generator=g).tolist()) for n in (9, 14, 5, 21, 7)]
    return [exs[:2], exs[2:4], exs[4:]]


def _loss_and_grads(model, batch, packed: bool):
    model.zero_grad(set_to_none=True)
    extra = ({"attention_mask": None, "packed_segments": batch.segments} if packed
             else {"attention_mask": model_attention_mask(batch.attention_mask, "sdpa")})
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **extra).logits
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
@pytest.mark.parametrize("packed", [True, False], ids=["segmented-sdpa", "4d-mask"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_keeps_packed_losses_and_gradients(packed, lora):
    model = _qwen3()
    model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
        for n, p in model.named_parameters():       # B starts at zero: make the adapter matter
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    if packed:
        model.set_attn_implementation(register_packed_sdpa())
    model.train()
    rows = _examples()
    batch = collate_flat(rows) if packed else collate(rows, 0, 32)
    torch.manual_seed(3)
    loss_a, grads_a = _loss_and_grads(model, batch, packed)
    adapters.enable_gradient_checkpointing(model)
    base = model.get_base_model() if lora else model
    assert base.is_activation_checkpointing if hasattr(base, "is_activation_checkpointing") else True
    torch.manual_seed(3)
    loss_b, grads_b = _loss_and_grads(model, batch, packed)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-5)
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-6), n


def test_engine_with_gradient_checkpointing_trains_the_same_steps(make_realm):
    records = make_records(16)
    losses = []
    for name, gc in (("plain", False), ("gc", True)):
        realm = make_realm(name, training={**SMALL, "gradient_checkpointing": gc})
        ledger = Ledger(realm.ledger_path)
        engine = _start(realm, ledger)
        engine.train_quest(admit(realm, ledger, "a.jsonl", records), records)
        losses.append([s["loss"] for s in ledger.steps()])
        engine.cleanup()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_truncated_adapter_checkpoint_is_quarantined_and_the_previous_one_loads(make_realm):
    realm = make_realm(training={**LORA, "save_steps": 2})
    ledger = Ledger(realm.ledger_path)
    engine = _start(realm, ledger)
    records = make_records(16)
    engine.train_quest(admit(realm, ledger, "a.jsonl", records), records)
    engine.cleanup()
    found = ckpt.list_checkpoints(realm.checkpoints_dir("hero"))
    latest, previous = found[-1], found[-2]
    weights = latest / ADAPTER_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    engine = _start(realm, ledger)
    assert engine.global_step == ckpt.step_of(previous) and engine.hero_info["adapter"] == "lora"
    assert (latest.parent / (latest.name + ".corrupt")).is_dir()
    engine.cleanup()
    state = json.loads((previous / ckpt.TRAINER_STATE_JSON).read_text())
    del state[KEY_ADAPTER]
    (previous / ckpt.TRAINER_STATE_JSON).write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match="without its base's identity"):
        ckpt.verify_checkpoint(previous)
    assert (previous / ADAPTER_CONFIG_FILE).is_file()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_promotion_trials_at_checkpoints_run_on_the_adapter_and_leave_training_exact(make_realm):
    """The hero loop's trials (core.skills.loop, after each checkpoint) generate with the PEFT model the engine
    trains: they are recorded, and the LoRA run's steps, losses and gradient norms are bit-identical to the
    same run without trials."""
    from core.daemon import Daemon
    from core.skills.binary import BinarySkill
    from core.skills.quests import mixed_items, quest_record, write_quest

    items = mixed_items(BinarySkill(), [0, 1], 80, "exact")
    losses = {}
    for every in (0, 2):
        realm = make_realm(f"every{every}", training={"adapter": "lora", "lora": {"r": 4, "alpha": 8}},
                           skills={"trial_every_steps": every, "trial_samples": 30})
        write_quest(realm.inbox / "skill-BIN-L0-1-exact.jsonl", (quest_record(it) for it in items))
        assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
        ledger = Ledger(realm.ledger_path)
        losses[every] = [(r["global_step"], r["loss"], r["grad_norm"]) for r in ledger.steps()]
        trials = ledger.trials(realm.load_config().hero.name)
        ledger.close()
        assert (len(trials) >= 1) == (every == 2), trials
        assert is_adapter_checkpoint(ckpt.latest_checkpoint(realm.checkpoints_dir("hero")))
    assert len(losses[0]) >= 4 and losses[2] == losses[0]
