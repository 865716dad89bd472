"""core.vault: listing, tags, pins, guarded deletion by exact name, disk usage — on real folders and SQLite."""

from __future__ import annotations

import json
import os

import pytest

from core.ledger import Ledger
from core.realm import Realm
from core.vault import (
    PINNED_KEY,
    VaultError,
    delete_checkpoint,
    list_checkpoints_info,
    parse_checkpoint_name,
    pin,
    pinned_checkpoints,
    unpin,
    vault_disk_usage,
)

HERO = "hero"


@pytest.fixture
def realm(tmp_path):
    r = Realm.at(tmp_path / "realm")
    r.ensure_layout()
    return r


@pytest.fixture
def ledger(realm):
    lg = Ledger(realm.ledger_path)
    yield lg
    lg.close()


def make_checkpoint(realm: Realm, step: int, loss=None, eval_loss=None, t=None, weights_bytes=1000,
                    hero=HERO):
    """A checkpoint folder as the engine writes it (weights stand-in plus trainer_state.json)."""
    path = realm.checkpoints_dir(hero) / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * weights_bytes)
    state = {"global_step": step, "time": t if t is not None else 1_700_000_000.0 + step, "loss": loss,
             "eval_loss": eval_loss, "reason": "save_steps",
             "cursor": {"quest_id": 1, "examples_done": step, "quest_done": False}, "hero": {}, "config": {}}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def by_name(infos):
    return {i["name"]: i for i in infos}


def test_parse_checkpoint_name_is_strict():
    assert parse_checkpoint_name("step-00001234") == 1234
    for bad in ["step-1234", "step-000012345", "step-00001234/", "../step-00001234", "step-0000123a",
                "xstep-00001234", "step-00001234\n", "", "step-", ".tmp-step-00001234"]:
        with pytest.raises(VaultError):
            parse_checkpoint_name(bad)


def test_list_reads_metrics_and_tags(realm, ledger):
    make_checkpoint(realm, 100, loss=2.0, eval_loss=2.5)
    make_checkpoint(realm, 200, loss=1.5, eval_loss=2.1)
    make_checkpoint(realm, 300, loss=1.2, eval_loss=2.3, weights_bytes=5000)
    # not checkpoints: temp folder, trash folder, a file, a wrong name
    (realm.checkpoints_dir(HERO) / ".tmp-step-00000400").mkdir()
    (realm.checkpoints_dir(HERO) / ".trash-step-00000050-abcd").mkdir()
    (realm.checkpoints_dir(HERO) / "step-00000500").write_text("not a folder")
    (realm.checkpoints_dir(HERO) / "step-600").mkdir()
    infos = list_checkpoints_info(realm, HERO, ledger)
    assert [i["name"] for i in infos] == ["step-00000300", "step-00000200", "step-00000100"]
    d = by_name(infos)
    assert d["step-00000300"]["tags"] == ["latest"]
    assert d["step-00000200"]["tags"] == ["best"]  # lowest eval_loss, not lowest loss
    assert d["step-00000100"]["tags"] == []
    top = d["step-00000300"]
    assert top["step"] == 300 and top["loss"] == 1.2 and top["eval_loss"] == 2.3
    assert top["time"] == 1_700_000_300.0 and top["reason"] == "save_steps" and top["problem"] is None
    state_size = (realm.checkpoints_dir(HERO) / "step-00000300" / "trainer_state.json").stat().st_size
    assert top["size_bytes"] == 5000 + state_size


def test_best_falls_back_to_loss_and_latest_can_be_best(realm, ledger):
    make_checkpoint(realm, 10, loss=3.0)
    make_checkpoint(realm, 20, loss=1.0)
    d = by_name(list_checkpoints_info(realm, HERO, ledger))
    assert d["step-00000020"]["tags"] == ["latest", "best"]
    assert d["step-00000010"]["tags"] == []


def test_missing_or_corrupt_state_is_listed_with_a_problem(realm, ledger):
    p = make_checkpoint(realm, 5, loss=1.0)
    (p / "trainer_state.json").write_text("{truncated")
    q = make_checkpoint(realm, 6, loss=float("nan"))
    (q / "trainer_state.json").unlink()
    d = by_name(list_checkpoints_info(realm, HERO, ledger))
    assert "unreadable" in d["step-00000005"]["problem"]
    assert "missing" in d["step-00000006"]["problem"]
    assert d["step-00000005"]["loss"] is None and d["step-00000005"]["time"] > 0


def test_empty_vault(realm, ledger):
    assert list_checkpoints_info(realm, HERO, ledger) == []
    assert list_checkpoints_info(realm, "nobody", ledger) == []


def test_pin_and_unpin_persist_in_the_ledger(realm, ledger):
    make_checkpoint(realm, 1, loss=1.0)
    make_checkpoint(realm, 2, loss=2.0)
    assert pin(ledger, "step-00000001", realm, HERO) is True
    assert pin(ledger, "step-00000001", realm, HERO) is False  # idempotent
    other = Ledger(realm.ledger_path)  # another process sees it
    try:
        assert other.get_value(PINNED_KEY) == ["step-00000001"]
        assert pinned_checkpoints(other) == ["step-00000001"]
    finally:
        other.close()
    assert "pinned" in by_name(list_checkpoints_info(realm, HERO, ledger))["step-00000001"]["tags"]
    with pytest.raises(VaultError, match="no checkpoint"):
        pin(ledger, "step-00000099", realm, HERO)
    with pytest.raises(VaultError):
        pin(ledger, "../../etc", realm, HERO)
    assert unpin(ledger, "step-00000001") is True
    assert unpin(ledger, "step-00000001") is False
    assert pinned_checkpoints(ledger) == []
    kinds = [e["kind"] for e in ledger.events()]
    assert kinds.count("checkpoint_pinned") == 1 and kinds.count("checkpoint_unpinned") == 1


def test_delete_requires_exact_confirmation_and_never_touches_a_prefix_match(realm, ledger):
    keep = make_checkpoint(realm, 18, loss=5.0)
    gone = make_checkpoint(realm, 180000, loss=4.0)  # shares the prefix step-0018...
    make_checkpoint(realm, 1800000, loss=3.0)
    make_checkpoint(realm, 2000000, loss=1.0)  # latest and best
    with pytest.raises(VaultError, match="exact name"):
        delete_checkpoint(realm, HERO, ledger, "step-00180000", confirm="step-0018")
    with pytest.raises(VaultError, match="exact name"):
        delete_checkpoint(realm, HERO, ledger, "step-00180000", confirm="step-00180000 ")
    with pytest.raises(VaultError):
        delete_checkpoint(realm, HERO, ledger, "step-0018", confirm="step-0018")
    assert gone.is_dir()
    result = delete_checkpoint(realm, HERO, ledger, "step-00180000", confirm="step-00180000")
    assert result["step"] == 180000 and result["leftover"] is None and result["size_bytes"] > 1000
    assert not gone.exists() and keep.is_dir()
    names = sorted(os.listdir(realm.checkpoints_dir(HERO)))
    assert names == ["step-00000018", "step-01800000", "step-02000000"]  # no trash left behind
    ev = [e for e in ledger.events() if e["kind"] == "checkpoint_deleted"]
    assert len(ev) == 1 and json.loads(ev[0]["data"])["checkpoint"] == "step-00180000"
    with pytest.raises(VaultError, match="no checkpoint"):
        delete_checkpoint(realm, HERO, ledger, "step-00180000", confirm="step-00180000")


def test_delete_refuses_latest_best_and_pinned(realm, ledger):
    make_checkpoint(realm, 1, loss=2.0, eval_loss=1.0)  # best
    make_checkpoint(realm, 2, loss=2.0, eval_loss=3.0)  # pinned
    make_checkpoint(realm, 3, loss=2.0, eval_loss=4.0)  # plain
    make_checkpoint(realm, 4, loss=2.0, eval_loss=5.0)  # latest
    pin(ledger, "step-00000002", realm, HERO)
    for name, why in [("step-00000004", "latest"), ("step-00000001", "best"), ("step-00000002", "pinned")]:
        with pytest.raises(VaultError, match=why):
            delete_checkpoint(realm, HERO, ledger, name, confirm=name)
        assert (realm.checkpoints_dir(HERO) / name).is_dir()
    delete_checkpoint(realm, HERO, ledger, "step-00000003", confirm="step-00000003")
    unpin(ledger, "step-00000002")
    delete_checkpoint(realm, HERO, ledger, "step-00000002", confirm="step-00000002")
    assert [i["name"] for i in list_checkpoints_info(realm, HERO, ledger)] == ["step-00000004", "step-00000001"]


def test_disk_usage(realm, ledger):
    empty = vault_disk_usage(realm, HERO)  # no checkpoints folder yet
    assert empty["vault_bytes"] == 0 and 0 < empty["free_bytes"] <= empty["total_bytes"]
    make_checkpoint(realm, 1, loss=1.0, weights_bytes=10_000)
    make_checkpoint(realm, 2, loss=1.0, weights_bytes=20_000)
    usage = vault_disk_usage(realm, HERO)
    assert 30_000 < usage["vault_bytes"] < 32_000
    assert usage["total_bytes"] >= usage["free_bytes"] > 0


# names with non-ASCII digits are junk, never checkpoints (issue 8) -------------------------------------
JUNK_STEP_NAMES = ["step-٠٠٠٠٠٠١٨", "step-００００００１８", "step-𝟎𝟎𝟎𝟎𝟎𝟎𝟏𝟖", "step-00000018\n", "step-٠٠٠٠٠٠١٨\n"]


def test_unicode_digit_names_are_not_checkpoints(realm, ledger):
    make_checkpoint(realm, 10)
    for name in JUNK_STEP_NAMES:
        (realm.checkpoints_dir(HERO) / name).mkdir()
        with pytest.raises(VaultError, match="not a checkpoint name"):
            parse_checkpoint_name(name)
        with pytest.raises(VaultError):
            pin(ledger, name, realm, HERO)
    assert [i["name"] for i in list_checkpoints_info(realm, HERO, ledger)] == ["step-00000010"]
    ledger.set_value(PINNED_KEY, ["step-00000010", *JUNK_STEP_NAMES])  # written by hand: junk ignored
    assert pinned_checkpoints(ledger) == ["step-00000010"]
