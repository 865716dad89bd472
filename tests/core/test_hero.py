"""The embedded default hero, model source resolution and tokenizer loading (core/hero.py)."""

from __future__ import annotations

import json

import pytest
import torch

from core.config import HeroConfig, RealmConfig
from core.hero import (
    DEFAULT_CHAT_TEMPLATE,
    EMBEDDED_TOKENIZER,
    HERO_SIZES,
    HeroError,
    build_byte_tokenizer,
    create_default_hero,
    describe_model,
    load_model,
    load_tokenizer,
    resolve_model_source,
    resolve_tokenizer_source,
)
from core.realm import init_realm
from tests.conftest import STORIES260K, needs_shared


def test_byte_tokenizer_ids_are_bytes_and_round_trip():
    tok = build_byte_tokenizer()
    assert len(tok) == 260
    text = "héllo wörld 😀\n\ttabs"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]) == [256, 257, 258, 259]
    assert tok.eos_token_id == 256 and tok.pad_token_id == 259
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_end|>")["input_ids"] == [258]


def test_hero_sizes_parameter_counts():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    counts = {}
    for size, kwargs in HERO_SIZES.items():
        with torch.device("meta"):
            model = Qwen3ForCausalLM(Qwen3Config(**kwargs))
        counts[size] = describe_model(model)["parameters"]
    assert 0.3e6 <= counts["nano"] <= 0.5e6
    assert 2e6 <= counts["micro"] <= 3e6
    assert 8e6 <= counts["tiny"] <= 12e6
    assert 35e6 <= counts["small"] <= 45e6


def test_create_default_hero_writes_a_loadable_folder_atomically(tmp_path):
    rng_before = torch.get_rng_state()
    dest = create_default_hero(tmp_path / "hero" / "base", "nano", seed=7)
    assert torch.equal(rng_before, torch.get_rng_state())  # global RNG untouched
    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert [p.name for p in dest.parent.iterdir()] == ["base"]  # no temporary folder left
    cfg = HeroConfig()
    model = load_model(dest, cfg)
    tok = load_tokenizer(dest, cfg)
    info = describe_model(model)
    assert info["architecture"] == "Qwen3ForCausalLM" and 0.3e6 <= info["parameters"] <= 0.5e6
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and tok.pad_token == "<|pad|>"
    assert model.config.tie_word_embeddings and model.config.vocab_size == 260
    # same seed -> same weights; another seed -> different
    again = load_model(create_default_hero(tmp_path / "again", "nano", seed=7), cfg)
    other = load_model(create_default_hero(tmp_path / "other", "nano", seed=8), cfg)
    w = model.model.embed_tokens.weight
    assert torch.equal(w, again.model.embed_tokens.weight)
    assert not torch.equal(w, other.model.embed_tokens.weight)
    with pytest.raises(HeroError, match="exists"):
        create_default_hero(dest, "nano")
    with pytest.raises(HeroError, match="unknown hero size"):
        create_default_hero(tmp_path / "x", "huge")


def test_resolve_default_hero_is_created_once_and_newborn(tmp_path):
    realm = init_realm(tmp_path / "r", overrides={"hero": {"name": "ada", "default_size": "nano"}})
    config = realm.load_config()
    assert resolve_tokenizer_source(realm, config) == EMBEDDED_TOKENIZER
    assert load_tokenizer(EMBEDDED_TOKENIZER, config.hero)("ab")["input_ids"] == [97, 98]
    source, newborn = resolve_model_source(realm, config.hero, create=False)
    assert newborn and source == str(realm.hero_dir("ada") / "base")
    assert not realm.hero_dir("ada").exists()
    source, newborn = resolve_model_source(realm, config.hero)
    assert newborn and (realm.hero_dir("ada") / "base" / "model.safetensors").is_file()
    mtime = (realm.hero_dir("ada") / "base" / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_source(realm, config.hero) == (source, True)
    assert (realm.hero_dir("ada") / "base" / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_tokenizer_source(realm, config) == source


def test_resolve_missing_folder_and_uncached_hub_id_fail_clearly(tmp_path):
    realm = init_realm(tmp_path / "r")
    with pytest.raises(HeroError, match="does not exist"):
        resolve_model_source(realm, HeroConfig(base_model="./no-such-model"))
    (realm.root / "empty").mkdir()
    with pytest.raises(HeroError, match="no config.json"):
        resolve_model_source(realm, HeroConfig(base_model="empty"))
    with pytest.raises(HeroError, match="local Hugging Face cache"):
        resolve_model_source(realm, HeroConfig(base_model="nobody-here/no-such-model-xyz"))
    with pytest.raises(HeroError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path, HeroConfig())


@needs_shared(STORIES260K)
def test_local_folder_and_tokenizer_without_template(tmp_path):
    realm = init_realm(tmp_path / "r", base_model=str(STORIES260K))
    config = realm.load_config()
    source, newborn = resolve_model_source(realm, config.hero)
    assert source == str(STORIES260K.resolve()) and not newborn
    tok = load_tokenizer(source, config.hero)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # stories260K has none: the documented default
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id
    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok2 = load_tokenizer(source, HeroConfig(base_model=str(STORIES260K), chat_template=custom))
    assert tok2.chat_template == custom
    assert describe_model(load_model(source, config.hero))["architecture"] == "LlamaForCausalLM"


def test_resolve_tokenizer_source_prefers_the_newest_checkpoint(tmp_path):
    realm = init_realm(tmp_path / "r", overrides={"hero": {"default_size": "nano"}})
    ck = realm.checkpoints_dir("hero") / "step-00000003"
    ck.mkdir(parents=True)
    build_byte_tokenizer().save_pretrained(ck)
    assert json.loads((ck / "tokenizer_config.json").read_text())
    assert resolve_tokenizer_source(realm, RealmConfig.model_validate(json.loads(realm.config_path.read_text()))) \
        == str(ck)
