"""Disk guard: a disk under the floor is pruned by policy, else training is told to pause with an alert."""

from __future__ import annotations

import json
import time

import pytest
import torch

from core.ledger import Ledger
from management import disk_guard
from management.disk_guard import GIB, ensure_space, estimate_checkpoint_bytes, wait_for_space

MIB = 1024 ** 2


def fake_checkpoint(realm, step, loss, weights_bytes=MIB, moments=64 * 1024):
    """A checkpoint folder as core.checkpoint writes it (small, without a model)."""
    d = realm.checkpoints_dir("hero") / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * weights_bytes)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "time": time.time() - 1000 + step,
                                                      "loss": loss, "eval_loss": None}))
    torch.save({"optimizer": {"state": {0: {"exp_avg": torch.zeros(moments)}}, "param_groups": [{"lr": 1e-3}]},
                "scheduler": {"last_epoch": step}, "rng": {}}, d / "trainer_state.pt")
    return d


@pytest.fixture
def realm(make_realm):
    realm = make_realm(retention={"keep_last": 2, "keep_best": 0, "keep_optimizer_last": 1,
                                  "min_free_gb": 1.0})
    for step, loss in ((10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0), (50, 5.0)):
        fake_checkpoint(realm, step, loss)
    return realm


def test_estimate_from_the_last_checkpoint_or_the_parameter_count(realm, tmp_path):
    size = sum(f.stat().st_size for f in (realm.checkpoints_dir("hero") / "step-00000050").iterdir())
    assert estimate_checkpoint_bytes(realm.checkpoints_dir("hero")) == int(size * 1.1)
    assert estimate_checkpoint_bytes(tmp_path / "none", parameters=1000) == int(12000 * 1.1) + 4 * MIB
    with pytest.raises(ValueError):
        estimate_checkpoint_bytes(tmp_path / "none")


def test_enough_space_does_nothing(realm):
    ledger = Ledger(realm.ledger_path)
    result = ensure_space(realm, realm.load_config(), MIB, ledger=ledger, free_bytes=lambda p: 5 * GIB)
    assert result.ok and not result.pause and not result.pruned
    assert len(list(realm.checkpoints_dir("hero").glob("step-*"))) == 5


def test_disk_under_the_floor_prunes_by_policy(realm):
    ledger = Ledger(realm.ledger_path)
    real_free = disk_guard.free_bytes_of(realm.root)
    start_count = 5

    def free(path):  # the floor is crossed until pruning removed at least one checkpoint
        remaining = len(list(realm.checkpoints_dir("hero").glob("step-*")))
        return GIB if remaining == start_count else real_free

    result = ensure_space(realm, realm.load_config(), 10 * MIB, ledger=ledger, free_bytes=free)
    assert result.ok and not result.pause
    # kept: latest (50), keep_last (40), best (10, lowest loss); removed 20, 30; 10 and 40 stripped
    assert sorted(p.name for p in realm.checkpoints_dir("hero").glob("step-*")) == \
        ["step-00000010", "step-00000040", "step-00000050"]
    assert set(result.pruned) == {"step-00000020", "step-00000030", "step-00000010", "step-00000040"}
    assert [e["kind"] for e in ledger.events()][-1] == "disk_low_pruned"


def test_still_short_after_pruning_pauses_with_an_alert_and_never_removes_protected(realm):
    ledger = Ledger(realm.ledger_path)
    config = realm.load_config()
    result = ensure_space(realm, config, 10 * MIB, ledger=ledger, free_bytes=lambda p: GIB)
    assert not result.ok and result.pause and "disk full" in result.message
    alert = [e for e in ledger.events() if e["kind"] == "disk_full_pause"]
    assert alert and alert[0]["level"] == "error"
    assert {"step-00000010", "step-00000050"} <= {p.name for p in realm.checkpoints_dir("hero").glob("step-*")}

    # wait_for_space: paused until space comes back (or a stop is requested)
    frees = iter([GIB, GIB, 3 * GIB])
    waits = []
    result = wait_for_space(realm, config, 10 * MIB, ledger=ledger, interval_seconds=0.01,
                            on_wait=waits.append, free_bytes=lambda p: next(frees, 3 * GIB))
    assert result.ok and waits and ledger.events()[-1]["kind"] == "disk_space_recovered"
    stopped = wait_for_space(realm, config, 10 * MIB, ledger=ledger, interval_seconds=0.01,
                             should_stop=lambda: True, free_bytes=lambda p: GIB)
    assert stopped.pause and not stopped.ok


def test_retention_disabled_never_prunes(make_realm):
    realm = make_realm(retention={"enabled": False, "keep_last": 1, "min_free_gb": 1.0})
    for step in (1, 2, 3):
        fake_checkpoint(realm, step, 1.0)
    result = ensure_space(realm, realm.load_config(), MIB, ledger=Ledger(realm.ledger_path),
                          free_bytes=lambda p: GIB)
    assert result.pause and len(list(realm.checkpoints_dir("hero").glob("step-*"))) == 3


def test_checkpoint_hooks_guard_then_prune(realm):
    from management.hooks import CheckpointHooks

    hooks = CheckpointHooks(realm, realm.load_config(), retry_seconds=0.01)
    assert hooks.before_save(parameters=1000) and hooks.last_guard.ok   # this disk has room
    hooks.after_save()
    assert sorted(p.name for p in realm.checkpoints_dir("hero").glob("step-*")) == \
        ["step-00000010", "step-00000040", "step-00000050"]
    full = CheckpointHooks(realm, realm.load_config(), retry_seconds=0.01, free_bytes=lambda path: 0)
    calls = []
    assert not full.before_save(should_stop=lambda: len(calls) > 2, on_wait=calls.append)
    assert calls and calls[0].pause and full.last_guard.pause
