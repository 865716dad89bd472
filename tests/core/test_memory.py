"""The memory estimate (core/memory.py) and the presets (core/presets.py): shapes read without torch match
the real models, the activation formula matches what autograd really keeps, and the parts move the right
way with LoRA, QLoRA, checkpointing and precision. (Estimate vs measured RSS: bench/memory_estimate.py.)"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from core import memory
from core.config import TrainingConfig, parse_config
from core.hero import BYTE_VOCAB_SIZE, HERO_SIZES
from core.presets import PRESETS, preset_overrides, preset_table_markdown
from tests.conftest import ROOT, STORIES260K, needs_shared

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)


def _meta_params(cfg: dict) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", list(HERO_SIZES))
def test_config_formula_counts_the_embedded_heroes_exactly(size):
    cfg = {**HERO_SIZES[size], "vocab_size": BYTE_VOCAB_SIZE, "model_type": "qwen3"}
    assert memory.shape_from_config(cfg).parameters == _meta_params(HERO_SIZES[size] | {"vocab_size": BYTE_VOCAB_SIZE})


def test_config_formula_counts_qwen3_0_6b():
    shape = memory.shape_from_config({**QWEN3_0_6B, "model_type": "qwen3"})
    assert shape.parameters == _meta_params(QWEN3_0_6B) and shape.qk_norm
    assert 590e6 < shape.parameters < 600e6


@needs_shared(STORIES260K)
def test_folder_shape_of_stories260k_matches_the_loaded_model():
    from core.hero import load_model

    shape = memory.shape_from_folder(STORIES260K)
    model = load_model(STORIES260K, parse_config({}).hero)
    assert shape.parameters == sum(p.numel() for p in model.parameters()) and not shape.qk_norm
    assert sorted(shape.block_linears) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                           "v_proj"]
    assert shape.block_linears["down_proj"] == [(64, 172)] * 5
    assert shape.linear_parameters == sum(m.weight.numel() for n, m in model.named_modules()
                                          if isinstance(m, torch.nn.Linear) and "layers" in n)


def test_lora_parameters_equal_peft_trainable_count(tmp_path):
    from peft import LoraConfig, get_peft_model

    from core.hero import create_default_hero

    folder = create_default_hero(tmp_path / "nano", "nano")
    shape = memory.shape_from_folder(folder)
    from core.hero import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft = get_peft_model(load_model(folder, parse_config({}).hero), LoraConfig(r=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert shape.lora_parameters(16, None) == trainable
    assert shape.lora_parameters(16, ["q_proj", "v_proj"]) < trainable


def _saved_activation_bytes(model, tokens: int) -> int:
    """Bytes of the tensors autograd keeps for the backward (parameters excluded), for one packed row."""
    from core.chat import TokenizedExample
    from core.packing import collate_flat, register_packed_sdpa

    model.set_attn_implementation(register_packed_sdpa())
    model.train()
    batch = collate_flat([[TokenizedExample([7] * tokens, [7] * tokens)]])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                       packed_segments=batch.segments, use_cache=False).logits
        F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch.labels.reshape(-1), ignore_index=-100)
    return sum(seen.values())


@pytest.mark.parametrize("adapter", [None, "lora"])
@pytest.mark.parametrize("which", ["tiny", "stories260K"])
def test_activation_formula_matches_what_autograd_keeps(adapter, which, tmp_path):
    from core.hero import create_default_hero, load_model

    if which == "stories260K":
        if not STORIES260K.exists():
            pytest.skip("../shared is absent")
        folder = STORIES260K
    else:
        folder = create_default_hero(tmp_path / which, which)
    model = load_model(folder, parse_config({}).hero)
    shape = memory.shape_from_folder(folder)
    training = TrainingConfig(adapter=adapter, micro_batch_size=1, max_length=256, lora={"r": 8})
    if adapter:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    saved = _saved_activation_bytes(model, 256)
    est = memory.estimate(shape, training, device="cpu")
    T = 256
    layer = memory._layer_activation_bytes(shape, 4, adapter is not None, shape.targets(None), 8, 0.0)
    formula = T * shape.layers * layer + T * (4 if adapter else 12) * shape.hidden_size + T * shape.vocab_size * 4
    assert formula == pytest.approx(saved, rel=0.05)   # the saved tensors, counted the same way
    assert est.activations_plain_bytes > formula        # plus one layer of backward working memory


def test_the_parts_move_the_right_way():
    shape = memory.shape_from_config({**QWEN3_0_6B, "model_type": "qwen3"})
    full = memory.estimate(shape, TrainingConfig(micro_batch_size=4, max_length=2048), device="cuda")
    assert full.precision == "bf16" and full.trainable_parameters == shape.parameters
    gc = memory.estimate(shape, TrainingConfig(micro_batch_size=4, max_length=2048, gradient_checkpointing=True),
                         device="cuda")
    assert gc.activations_bytes == full.activations_checkpointed_bytes < full.activations_bytes / 5
    lora = memory.estimate(shape, TrainingConfig(micro_batch_size=4, max_length=2048, adapter="lora"), device="cuda")
    assert lora.trainable_parameters < shape.parameters / 50
    assert lora.optimizer_bytes < full.optimizer_bytes / 50 and lora.weights_bytes < full.weights_bytes / 2
    qlora = memory.estimate(shape, TrainingConfig(micro_batch_size=4, max_length=2048, adapter="qlora"),
                            device="cuda")
    assert qlora.weights_bytes < lora.weights_bytes
    cpu = memory.estimate(shape, TrainingConfig(micro_batch_size=4, max_length=2048), device="cpu")
    assert cpu.precision == "no" and cpu.activations_bytes > full.activations_bytes
    # the loss over a 151,936-token vocabulary: 12 bytes per logit in fp32 + the bf16 logits
    assert full.loss_bytes == 4 * 2048 * 151936 * 14
    assert full.total_bytes == full.weights_bytes + full.optimizer_bytes + max(
        full.gradients_bytes, full.activations_bytes + full.loss_bytes)
    acc = memory.estimate(shape, TrainingConfig(micro_batch_size=4, max_length=2048, gradient_accumulation_steps=2),
                          device="cuda")
    assert acc.total_bytes == full.total_bytes + min(full.gradients_bytes, full.activations_bytes + full.loss_bytes)


def test_fit_problem_names_the_numbers_and_the_remedies():
    shape = memory.shape_from_config({**QWEN3_0_6B, "model_type": "qwen3"})
    est = memory.estimate(shape, TrainingConfig(micro_batch_size=8, max_length=2048), device="cuda")
    assert memory.fit_problem(est, est.total_bytes) is None
    msg = memory.fit_problem(est, 8 * memory.GIB)
    assert "8.00 GiB" in msg and "gradient_checkpointing" in msg and "lora" in msg and "--preset" in msg


def test_realm_estimate_uses_the_embedded_default_before_it_exists(make_realm):
    realm = make_realm(hero={"default_size": "tiny"})
    shape = memory.shape_for_realm(realm, realm.load_config())
    assert shape.parameters == memory.shape_from_config(
        {**HERO_SIZES["tiny"], "vocab_size": BYTE_VOCAB_SIZE, "model_type": "qwen3"}).parameters
    assert not (realm.hero_dir("hero") / "base").exists()   # nothing created


def test_presets_are_valid_configs_and_documented():
    from training.cli import PRESET_NAMES

    assert tuple(PRESETS) == PRESET_NAMES
    for name in PRESETS:
        cfg = parse_config(preset_overrides(name))
        assert cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps in (8, 16)
    assert parse_config(preset_overrides("8gb")).training.adapter == "qlora"
    with pytest.raises(KeyError, match="24gb"):
        preset_overrides("2gb")
    assert preset_table_markdown() in (ROOT / "README.md").read_text(encoding="utf-8")
