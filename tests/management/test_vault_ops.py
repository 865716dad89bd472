"""Vault operations on real checkpoints of a real (nano) hero: prune, strip, backup, and the vault CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from core.ledger import Ledger
from core.vault import pin
from management import vault_ops
from management.retention import KeepReason
from tests.management.conftest import HERO, load_engine, steps_of
from training.cli import main


def test_prune_dry_run_changes_nothing_then_prune_keeps_latest_best_pinned(realm):
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    before = steps_of(realm)
    assert len(before) >= 6
    pin(ledger, f"step-{before[1]:08d}")
    dry = vault_ops.prune(realm, config, ledger, dry_run=True)
    assert steps_of(realm) == before and dry.plan.remove and dry.removed == []
    facts = {f.step: f for f in vault_ops.checkpoint_facts(realm, HERO, ledger)}
    best = min((f for f in facts.values() if f.loss is not None), key=lambda f: (f.loss, -f.step)).step
    result = vault_ops.prune(realm, config, ledger)
    after = steps_of(realm)
    assert set(after) == {before[-1], before[-2], before[1], best}
    assert sorted(result.removed) == sorted(f"step-{s:08d}" for s in set(before) - set(after))
    assert all(d.reasons[0] for d in result.plan.remove)
    kept = {d.step: d.reasons for d in result.plan.keep}
    assert KeepReason.PINNED.value in kept[before[1]] and KeepReason.LATEST.value in kept[before[-1]]
    # only the newest keep_optimizer_last (2) keep their optimizer state
    facts = {f.step: f for f in vault_ops.checkpoint_facts(realm, HERO, ledger)}
    assert [s for s in after if facts[s].has_optimizer] == sorted(after)[-2:]
    assert any(e["kind"] == "vault_pruned" for e in ledger.events())


def test_engine_resumes_from_a_weights_only_checkpoint(realm):
    latest = realm.checkpoints_dir(HERO) / f"step-{steps_of(realm)[-1]:08d}"
    size = (latest / vault_ops.TRAINER_STATE_PT).stat().st_size
    freed = vault_ops.strip_optimizer_state(latest)
    assert 0 < freed < size and vault_ops.strip_optimizer_state(latest) == 0  # idempotent
    engine, ledger = load_engine(realm)
    try:
        assert engine.global_step == steps_of(realm)[-1] and engine.last_checkpoint == latest
        assert not [e for e in ledger.events() if e["kind"] == "checkpoint_corrupt"]
    finally:
        engine.cleanup()


def test_backup_is_verified_and_a_corrupted_copy_is_detected(realm, tmp_path):
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    step = steps_of(realm)[-1]
    out = vault_ops.backup(realm, config, ledger, step, folder=str(tmp_path / "bk"))
    dest = tmp_path / "bk" / HERO / f"step-{step:08d}"
    assert out["path"] == str(dest) and not out["already"] and vault_ops.verify_copy(dest) == []
    assert vault_ops.backup(realm, config, ledger, step, folder=str(tmp_path / "bk"))["already"]
    weights = dest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert vault_ops.verify_copy(dest) == ["model.safetensors: SHA-256 differs (corrupted)"]
    again = vault_ops.backup(realm, config, ledger, step, folder=str(tmp_path / "bk"))  # replaces the damaged
    assert not again["already"] and vault_ops.verify_copy(dest) == []
    with pytest.raises(vault_ops.VaultOpsError, match="no checkpoint step-00000999"):
        vault_ops.backup(realm, config, ledger, 999)


def test_a_copy_that_differs_from_its_source_fails_and_leaves_nothing(realm, tmp_path, monkeypatch):
    def corrupting_copy(src, dst):
        shutil.copy2(src, dst)
        if str(dst).endswith(".safetensors"):
            with open(dst, "r+b") as f:
                f.seek(100)
                f.write(b"\0\1\2")

    monkeypatch.setattr(vault_ops, "_copy_file", corrupting_copy)
    with pytest.raises(vault_ops.BackupError, match="model.safetensors"):
        vault_ops.backup(realm, realm.load_config(), Ledger(realm.ledger_path), steps_of(realm)[-1],
                         folder=str(tmp_path / "bk"))
    assert not list((tmp_path / "bk" / HERO).iterdir())


def test_vault_cli(realm, capsys):
    steps = steps_of(realm)
    root = ["--realm", str(realm.root), "vault"]
    assert main([*root, "prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove" in out and f"remove  step-{steps[0]:08d}" in out and steps_of(realm) == steps
    assert main([*root, "backup", f"step-{steps[-1]:08d}"]) == 0
    assert "SHA-256 verified" in capsys.readouterr().out
    assert (realm.root / "backups" / HERO / f"step-{steps[-1]:08d}").is_dir()
    assert main([*root, "promote", str(steps[-1]), "--name", "v1"]) == 0
    assert "version v1 created" in capsys.readouterr().out
    assert main([*root, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in listed["versions"]] == ["v1"] and listed["backups"]
    assert main([*root, "backup", "18"]) == 1                      # no step 18: refused, nothing guessed
    assert "no checkpoint step-00000018" in capsys.readouterr().err
    assert main([*root, "backup", "step-18"]) == 2                 # not a step or checkpoint name
    assert main([*root, "restore", "nope"]) == 1
    assert main([*root, "prune"]) == 0
    assert len(steps_of(realm)) < len(steps)
