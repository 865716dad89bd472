"""Named versions on real checkpoints of a real (nano) hero: promote, then restore as the starting point."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from core.ledger import Ledger
from management import vault_ops, versions
from tests.management.conftest import HERO, load_engine, steps_of


def test_promote_then_restore_makes_the_version_the_starting_point(realm):
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    steps = steps_of(realm)
    early, latest = steps[1], steps[-1]
    meta = versions.promote(realm, config, ledger, early, "first-steps")
    assert meta["global_step"] == early and meta["source_checkpoint"] == f"step-{early:08d}"
    assert meta["hero"]["newborn"] and "base_model" in meta and meta["metrics"]["loss"] is not None
    assert [q["name"] for q in meta["quests_seen"]] == ["quest.jsonl"]
    assert meta["quests_seen"][0]["steps"] == early
    with pytest.raises(vault_ops.VaultOpsError, match="exists"):
        versions.promote(realm, config, ledger, early, "first-steps")
    with pytest.raises(vault_ops.VaultOpsError, match="not a version name"):
        versions.promote(realm, config, ledger, early, "../evil")
    version_weights = vault_ops.sha256_file(realm.hero_dir(HERO) / "versions/first-steps/model.safetensors")
    latest_weights = vault_ops.sha256_file(realm.checkpoints_dir(HERO) / f"step-{latest:08d}/model.safetensors")

    fd = os.open(realm.run_dir / "daemon.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a running daemon holds this lock
    with pytest.raises(vault_ops.VaultOpsError, match="daemon is running"):
        versions.restore(realm, config, ledger, "first-steps")
    os.close(fd)

    out = versions.restore(realm, config, ledger, "first-steps")
    assert out["global_step"] == latest and steps_of(realm)[-1] == latest     # the global step goes on
    restored = realm.checkpoints_dir(HERO) / f"step-{latest:08d}"
    assert vault_ops.sha256_file(restored / "model.safetensors") == version_weights
    saved = realm.hero_dir(HERO) / "versions" / out["previous_saved_as"]
    assert vault_ops.sha256_file(saved / "model.safetensors") == latest_weights  # nothing lost
    assert vault_ops.verify_copy(saved) == []
    state = json.loads((restored / "trainer_state.json").read_text())
    assert state["restored_from"]["version"] == "first-steps" and state["cursor"]["quest_done"]
    assert {v["name"] for v in versions.list_versions(realm, HERO)} == {"first-steps", out["previous_saved_as"]}
    engine, _ = load_engine(realm)
    try:
        assert engine.global_step == latest and engine.last_checkpoint == restored
    finally:
        engine.cleanup()
