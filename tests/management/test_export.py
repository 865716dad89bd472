"""Exports of real trained checkpoints (stories260K = Llama, the nano default hero = Qwen3): GGUF read back
by transformers with the checkpoint's next-token logits, the hf folder, the Ollama Modelfile, adapters
merged with PEFT, refusals, and nothing half-written on failure."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from core.ledger import Ledger
from core.realm import Realm
from management.export import ExportError, ExportUsageError, SourceNotFound, export_checkpoint
from management.export_model import load_for_export, merge_adapter, resolve_source
from management.ollama import parse_modelfile, render_go_template
from tests.conftest import STORIES260K, needs_shared
from tests.trained import trained_realm

PROMPT = [{"role": "user", "content": "Tell me a story about Lily and the red ball."},
          {"role": "assistant", "content": "Once upon a time, Lily found a ball."},
          {"role": "user", "content": "What happened next?"}]
# max |logit difference| on the last position of PROMPT, GGUF (read by transformers) vs the checkpoint.
# Measured on this machine: f32 0.0 (bit-identical), f16 0.006-0.02, q8_0 0.1-0.2 (stories260K's logits
# span about +-17; its ffn_down rows of 172 are not a multiple of 32, so they stay f16 in q8_0).
TOLERANCE = {"f32": 1e-5, "f16": 0.06, "q8_0": 0.5}


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    if not STORIES260K.exists():
        pytest.skip(f"{STORIES260K} is absent (a fresh clone has no ../shared)")
    return trained_realm(tmp_path_factory.mktemp("stories") / "realm")


@pytest.fixture
def realm_copy(stories, tmp_path):
    dest = tmp_path / "realm"
    shutil.copytree(stories.root, dest, ignore=shutil.ignore_patterns("*.lock", "*.pid", "exports"))
    return Realm.at(dest)


def run_export(realm, checkpoint="latest", fmt="gguf", quantization=None, output=None, progress=None):
    ledger = Ledger(realm.ledger_path)
    try:
        return export_checkpoint(realm, realm.load_config(), ledger, checkpoint, fmt, quantization, output, progress)
    finally:
        ledger.close()


def source_and_model(realm, checkpoint="latest"):
    ledger = Ledger(realm.ledger_path)
    try:
        source = resolve_source(realm, realm.load_config(), ledger, checkpoint)
    finally:
        ledger.close()
    model, tokenizer, _ = load_for_export(source, realm, realm.load_config())
    return source, model, tokenizer


def last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def load_gguf(path, head_dim=None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if head_dim is not None:  # transformers' qwen3 GGUF mapping ignores attention.key_length (the file has it)
        config.head_dim = head_dim
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                 dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@needs_shared(STORIES260K)
@pytest.mark.parametrize("quantization", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_stories260k_logits_match_the_checkpoint(stories, quantization):
    result = run_export(stories, "latest", "gguf", quantization)
    assert result.path.suffix == ".gguf" and result.path.parent == result.folder
    assert result.folder.parent == stories.root / "exports"
    source, model, tokenizer = source_and_model(stories)
    assert source.global_step and source.global_step > 0  # a trained checkpoint, not the base
    gguf_model, gguf_tokenizer = load_gguf(result.path)
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text)["input_ids"]
    assert gguf_tokenizer(text)["input_ids"] == ids  # the vocabulary, merges and BOS rule survive
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    ours, theirs = last_logits(model, ids), last_logits(gguf_model, ids)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE[quantization], diff
    if quantization != "q8_0":
        assert ours.argmax() == theirs.argmax()
    manifest = json.loads((result.folder / "export.json").read_text())
    assert manifest["source"] == {"kind": "checkpoint", "name": source.name, "global_step": source.global_step,
                                  "adapter_merged": False}
    assert manifest["gguf"]["architecture"] == "llama" and manifest["quantization"] == quantization
    norm_types = {t for n, t in manifest["gguf"]["types"].items() if n.endswith("_norm.weight")}
    assert norm_types == {"F32"}


def test_gguf_round_trip_qwen3_default_hero(realm):
    """``realm``: a copy of tests/management/conftest.py's trained nano hero (Qwen3, byte-level tokenizer)."""
    result = run_export(realm, "latest", "gguf", "f32")
    _, model, tokenizer = source_and_model(realm)
    gguf_model, gguf_tokenizer = load_gguf(result.path, head_dim=model.config.head_dim)
    import gguf

    fields = gguf.GGUFReader(result.path).fields
    assert int(fields["qwen3.attention.key_length"].parts[-1][0]) == model.config.head_dim
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) + "é 🐉"
    ids = tokenizer(text)["input_ids"]
    assert gguf_tokenizer(text)["input_ids"] == ids
    assert (last_logits(model, ids) - last_logits(gguf_model, ids)).abs().max().item() <= TOLERANCE["f32"]


@needs_shared(STORIES260K)
def test_hf_export_is_standalone_with_identical_logits_and_a_model_card(stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = []
    result = run_export(stories, "best", "hf", progress=lambda f, m: steps.append(f))
    assert result.path == result.folder and steps[-1] == 1.0 and steps == sorted(steps)
    source, model, tokenizer = source_and_model(stories, "best")
    exported = AutoModelForCausalLM.from_pretrained(result.folder, local_files_only=True).eval()
    exported_tokenizer = AutoTokenizer.from_pretrained(result.folder, local_files_only=True)
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    ids = tokenizer(tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True))["input_ids"]
    assert torch.equal(last_logits(model, ids), last_logits(exported, ids))
    card = (result.folder / "README.md").read_text()
    state = json.loads((stories.checkpoints_dir("hero") / source.name / "trainer_state.json").read_text())
    assert str(STORIES260K) in card and f"| global step | {source.global_step} |" in card
    assert "| stories.jsonl |" in card and f"{state['loss']:.4f}" in card and "## Chat template" in card
    assert not list(result.folder.glob("trainer_state*"))  # no optimizer state in an export


@needs_shared(STORIES260K)
def test_ollama_modelfile_renders_the_heros_prompt_and_stops_at_its_markers(stories):
    result = run_export(stories, "latest", "ollama", "q8_0")
    assert result.path.name == "Modelfile"
    modelfile = parse_modelfile(result.path.read_text())
    assert (result.folder / modelfile["from"]).is_file() and modelfile["from"].endswith("-q8_0.gguf")
    _, _, tokenizer = source_and_model(stories)
    conversation = [{"role": "system", "content": "You tell short stories."}, *PROMPT,
                    {"role": "assistant", "content": "Lily threw the ball.\nIt flew high!"},
                    {"role": "user", "content": "And then? 🐉"}]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert render_go_template(modelfile["template"], conversation) == expected
    assert modelfile["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert modelfile["parameters"]["num_ctx"] == ["512"]
    assert "ollama create hero -f Modelfile" in (result.folder / "README.md").read_text()


@needs_shared(STORIES260K)
def test_an_inexpressible_chat_template_is_refused_and_leaves_nothing(realm_copy):
    config = json.loads(realm_copy.config_path.read_text())
    config["hero"]["chat_template"] = "{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}"
    realm_copy.config_path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="Ollama template"):
        run_export(realm_copy, "latest", "ollama")
    assert not (realm_copy.root / "exports").exists() or not list((realm_copy.root / "exports").iterdir())
    run_export(realm_copy, "latest", "gguf")  # the GGUF itself carries the Jinja template: still fine


@needs_shared(STORIES260K)
def test_a_failure_half_way_leaves_nothing_and_a_reexport_replaces(realm_copy, monkeypatch):
    import management.gguf_export as gguf_export

    real = gguf_export.write_gguf

    def broken(model, tokenizer, tokenizer_dir, path, *a, **kw):
        path.write_bytes(b"GGUF half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_export, "write_gguf", broken)
    with pytest.raises(OSError, match="No space"):
        run_export(realm_copy, "latest", "gguf")
    assert list((realm_copy.root / "exports").iterdir()) == []
    monkeypatch.setattr(gguf_export, "write_gguf", real)
    first = run_export(realm_copy, "latest", "gguf", "f16")
    (first.folder / "note.txt").write_text("from the first export")
    second = run_export(realm_copy, "latest", "gguf", "f16")
    assert second.folder == first.folder and not (second.folder / "note.txt").exists()
    assert [p.name for p in (realm_copy.root / "exports").iterdir()] == [first.folder.name]
    with pytest.raises(ExportError, match="exists"):
        run_export(realm_copy, "latest", "gguf", output=first.folder)


@needs_shared(STORIES260K)
def test_checkpoint_names_resolve_and_bad_requests_are_refused(realm_copy):
    from management.versions import promote

    config = realm_copy.load_config()
    ledger = Ledger(realm_copy.ledger_path)
    try:
        latest = resolve_source(realm_copy, config, ledger, "latest")
        step = latest.global_step
        for spec in (str(step), f"step-{step:08d}", "best"):
            assert resolve_source(realm_copy, config, ledger, spec).path == latest.path
        promote(realm_copy, config, ledger, step, "first-light")
        version = resolve_source(realm_copy, config, ledger, "first-light")
        assert version.kind == "version" and version.global_step == step and version.metadata["quests_seen"]
        assert resolve_source(realm_copy, config, ledger, "base").path == STORIES260K
        for spec in ("999999", "step-00999999", "no-such-version", "../../etc", ""):
            with pytest.raises(SourceNotFound, match="first-light"):
                resolve_source(realm_copy, config, ledger, spec)
    finally:
        ledger.close()
    for fmt, q in (("zip", None), ("gguf", "q3_k"), ("hf", "q8_0")):
        with pytest.raises(ExportUsageError):
            run_export(realm_copy, "latest", fmt, q)
    card = (run_export(realm_copy, "first-light", "hf").folder / "README.md").read_text()
    assert "version `first-light`" in card and "| stories.jsonl |" in card


def test_unsupported_architectures_and_rope_scaling_are_refused():
    from management.gguf_export import UnsupportedModel, check_exportable

    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel.*--format hf"):
        check_exportable({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModel, match="yarn"):
        check_exportable({"architectures": ["Qwen3ForCausalLM"], "rope_parameters": {"rope_type": "yarn"}})
    assert check_exportable({"architectures": ["LlamaForCausalLM"]}).permute_qk


def test_tiny_qwen2_with_attention_biases_round_trips(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from core.hero import build_byte_tokenizer
    from management.gguf_export import write_gguf

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         max_position_embeddings=256)).eval()
    tokenizer.save_pretrained(tmp_path / "tok")
    report = write_gguf(model, tokenizer, tmp_path / "tok", tmp_path / "q2.gguf", "f32", name="q2")
    assert "blk.0.attn_q.bias" in report["types"] and "output.weight" in report["types"]
    gguf_model, _ = load_gguf(tmp_path / "q2.gguf")
    ids = tokenizer("Hello there, traveller")["input_ids"]
    assert (last_logits(model, ids) - last_logits(gguf_model, ids)).abs().max().item() <= TOLERANCE["f32"]


@needs_shared(STORIES260K)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_a_lora_adapter_checkpoint_is_merged_into_a_standalone_export(realm_copy, tmp_path):
    """PEFT itself makes the adapter (non-zero B, so merging changes the weights); the export must equal
    the PEFT model's outputs, as a plain model, in hf and in GGUF."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    latest = realm_copy.checkpoints_dir("hero") / "step-00000099"
    peft_model.save_pretrained(latest)
    shutil.copy(realm_copy.checkpoints_dir("hero") / sorted(p.name for p in realm_copy.checkpoints_dir("hero").iterdir())[0]
                / "trainer_state.json", latest / "trainer_state.json")
    state = json.loads((latest / "trainer_state.json").read_text())
    (latest / "trainer_state.json").write_text(json.dumps({**state, "global_step": 99}))
    adapter_config = json.loads((latest / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(STORIES260K) and not (latest / "config.json").exists()
    adapter_config["base_model_name_or_path"] = "someone/not-here"  # found through the realm's hero.base_model
    (latest / "adapter_config.json").write_text(json.dumps(adapter_config))

    merged = merge_adapter(latest, STORIES260K, realm_copy.load_config().hero)
    assert not isinstance(merged, PeftModel)
    ids = list(range(3, 40))
    expected = last_logits(peft_model, ids)
    plain = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()
    assert (last_logits(plain, ids) - expected).abs().max() > 1e-3  # the adapter does change the outputs
    assert (last_logits(merged, ids) - expected).abs().max().item() <= 1e-5

    hf = run_export(realm_copy, "latest", "hf")
    exported = AutoModelForCausalLM.from_pretrained(hf.folder, local_files_only=True).eval()
    assert not list(hf.folder.glob("adapter_*"))
    assert (last_logits(exported, ids) - expected).abs().max().item() <= 1e-5
    assert json.loads((hf.folder / "export.json").read_text())["source"]["adapter_merged"] is True
    assert "LoRA adapter merged" in (hf.folder / "README.md").read_text()
    gg = run_export(realm_copy, "latest", "gguf", "f32")
    gguf_model, _ = load_gguf(gg.path)
    assert (last_logits(gguf_model, ids) - expected).abs().max().item() <= 1e-4
