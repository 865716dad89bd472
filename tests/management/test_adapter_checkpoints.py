"""Retention, the disk guard, backups and versions on adapter (LoRA) checkpoints: a realm whose nano hero
trained a LoRA adapter with the real daemon."""

from __future__ import annotations

import shutil

import pytest

from core.checkpoint_layout import (
    ADAPTER_WEIGHTS_FILE,
    KEY_ADAPTER,
    is_adapter_checkpoint,
    read_checkpoint_info,
)
from core.daemon import Daemon
from core.ledger import Ledger
from core.realm import Realm
from core.vault import list_checkpoints_info
from management.disk_guard import estimate_checkpoint_bytes
from management.vault_ops import backup, prune, strip_optimizer_state, verify_copy
from management.versions import promote, restore
from tests.conftest import FAST_CONFIG, deep_update, write_text_quest
from tests.management.conftest import HERO, load_engine, steps_of


@pytest.fixture(scope="session")
def trained_lora(tmp_path_factory):
    from core.realm import init_realm

    realm = init_realm(tmp_path_factory.mktemp("lora") / "realm", overrides=deep_update(FAST_CONFIG, {
        "training": {"save_steps": 2, "adapter": "lora", "lora": {"r": 4, "alpha": 8}},
        "retention": {"keep_last": 2, "keep_best": 0, "keep_optimizer_last": 1}}))
    write_text_quest(realm.inbox / "quest.jsonl", 40)
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    return realm


@pytest.fixture
def realm(trained_lora, tmp_path):
    dest = tmp_path / "realm"
    shutil.copytree(trained_lora.root, dest, ignore=shutil.ignore_patterns("*.lock", "*.pid"))
    return Realm.at(dest)


def test_vault_shows_adapter_size_against_a_full_checkpoint(realm):
    ledger = Ledger(realm.ledger_path)
    infos = list_checkpoints_info(realm, HERO, ledger)
    assert len(infos) >= 4 and all(i["adapter"] == "lora" for i in infos)
    for i in infos:
        assert i["size_bytes"] < i["full_size_bytes"] / 3   # even with the tokenizer and optimizer state
    base_params = read_checkpoint_info(realm.checkpoints_dir(HERO) / infos[0]["name"])[KEY_ADAPTER]["base"]["parameters"]
    assert infos[0]["full_size_bytes"] == base_params * 4 * 3


def test_disk_guard_estimates_the_next_adapter_checkpoint_from_the_last(realm):
    folder = realm.checkpoints_dir(HERO)
    newest = folder / list_checkpoints_info(realm, HERO, Ledger(realm.ledger_path))[0]["name"]
    size = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    assert estimate_checkpoint_bytes(folder) == int(size * 1.1)
    info = read_checkpoint_info(newest)
    trainable = info[KEY_ADAPTER]["trainable_parameters"]
    full = estimate_checkpoint_bytes(None, info["hero"]["parameters"])
    overhead = 4 * 1024 ** 2   # tokenizer and configs, the same for both
    assert estimate_checkpoint_bytes(None, trainable) - overhead < (full - overhead) / 5   # before the first one


def test_prune_strips_and_removes_adapter_checkpoints_and_training_resumes(realm):
    ledger = Ledger(realm.ledger_path)
    before = steps_of(realm)
    result = prune(realm, realm.load_config(), ledger)
    after = steps_of(realm)
    assert result.removed and after == before[-2:]
    assert result.stripped == [f"step-{after[0]:08d}"]
    assert is_adapter_checkpoint(realm.checkpoints_dir(HERO) / result.stripped[0])
    assert strip_optimizer_state(realm.checkpoints_dir(HERO) / result.stripped[0]) == 0   # already stripped
    engine, ledger = load_engine(realm)
    try:
        assert engine.global_step == after[-1] and engine.hero_info["adapter"] == "lora"
    finally:
        engine.cleanup()


def test_backup_promote_and_restore_an_adapter_checkpoint(realm, tmp_path):
    ledger = Ledger(realm.ledger_path)
    config = realm.load_config()
    steps = steps_of(realm)
    done = backup(realm, config, ledger, steps[0], folder=str(tmp_path / "bk"))
    assert not verify_copy(tmp_path / "bk" / HERO / f"step-{steps[0]:08d}")
    assert (tmp_path / "bk" / HERO / f"step-{steps[0]:08d}" / ADAPTER_WEIGHTS_FILE).is_file() and done["bytes"] > 0
    meta = promote(realm, config, ledger, steps[0], "early")
    assert meta["adapter"] == "lora"
    restored = restore(realm, config, ledger, "early")
    assert restored["global_step"] == steps[-1]
    engine, ledger = load_engine(realm)
    try:
        assert engine.global_step == steps[-1] and engine.hero_info["adapter"] == "lora"
        version = realm.hero_dir(HERO) / "versions" / "early"
        now = realm.checkpoints_dir(HERO) / f"step-{steps[-1]:08d}"
        assert (now / ADAPTER_WEIGHTS_FILE).read_bytes() == (version / ADAPTER_WEIGHTS_FILE).read_bytes()
        assert read_checkpoint_info(now)[KEY_ADAPTER] == read_checkpoint_info(version)[KEY_ADAPTER]
    finally:
        engine.cleanup()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_export_merges_an_engine_adapter_checkpoint_and_refuses_a_changed_base(realm, tmp_path):
    """The engine's adapter checkpoint exports as a plain hf model with the merged model's logits (the
    oracle's path, core.hero.load_model); a base whose weights changed since training is refused."""
    import torch
    from transformers import AutoModelForCausalLM

    from core.hero import load_model
    from management.export import ExportError, export_checkpoint

    config = realm.load_config()
    latest = realm.checkpoints_dir(HERO) / f"step-{steps_of(realm)[-1]:08d}"
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        want = load_model(latest, config.hero).eval()(ids).logits[0, -1]
        plain = load_model(realm.hero_dir(HERO) / "base", config.hero).eval()(ids).logits[0, -1]
    assert (want - plain).abs().max() > 1e-4   # the adapter trained: merging changes the outputs
    ledger = Ledger(realm.ledger_path)
    try:
        hf = export_checkpoint(realm, config, ledger, "latest", "hf")
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(hf.folder, local_files_only=True).eval()(ids).logits[0, -1]
        assert not list(hf.folder.glob("adapter_*")) and (got - want).abs().max().item() <= 1e-5
        base = load_model(realm.hero_dir(HERO) / "base", config.hero)
        with torch.no_grad():
            next(base.parameters()).mul_(1.5)
        base.save_pretrained(realm.hero_dir(HERO) / "base")
        with pytest.raises(ExportError, match="restore the base it was trained on"):
            export_checkpoint(realm, config, ledger, "latest", "hf", output=tmp_path / "out")
        assert not (tmp_path / "out").exists()
    finally:
        ledger.close()
