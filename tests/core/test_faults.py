"""Fault injection, one test each (issue 4): NaN loss, simulated CUDA OOM, disk under the floor, truncated
checkpoint. Real daemon, ledger, checkpoints and the nano default hero; the faults are injected.

The engine-level truncated-checkpoint test is tests/core/test_engine.py::
test_corrupt_latest_checkpoint_falls_back_to_the_previous; here the daemon-level one.
"""

from __future__ import annotations

import json

import pytest
import torch

from core import checkpoint as ckpt
from core.daemon import Daemon
from core.engine import Engine
from core.faults import lr_scale_key
from core.ledger import Ledger
from management.hooks import CheckpointHooks
from tests.conftest import write_text_quest
from tests.core.test_daemon import DaemonThread
from tests.core.test_engine import admit, make_records, start


def trained(ledger: Ledger) -> list[tuple[int, int]]:
    """(quest id, line) of every example the ledger's steps trained."""
    return [(s["quest_id"], ln) for s in ledger.steps() for ln in json.loads(s["examples_json"])]


def test_nonfinite_losses_roll_back_to_the_checkpoint_with_a_lower_learning_rate(make_realm, monkeypatch):
    realm = make_realm(training={"save_steps": 5, "max_nonfinite_steps": 2, "nonfinite_lr_factor": 0.5})
    write_text_quest(realm.inbox / "a.jsonl", 40)  # one example per row, 4 rows per step: 10 steps
    real_loss_sum = Engine._loss_sum
    injected = {"left": 2}

    def loss_sum(self, batch):  # the two attempts at global step 8 give NaN
        loss = real_loss_sum(self, batch)
        if self.model.training and self.global_step == 7 and injected["left"] > 0:
            injected["left"] -= 1
            return loss * float("nan")
        return loss

    monkeypatch.setattr(Engine, "_loss_sum", loss_sum)
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0

    ledger = Ledger(realm.ledger_path)
    quest = ledger.list_quests()[0]
    assert injected["left"] == 0
    assert quest["state"] == "completed" and quest["examples_trained"] == 40
    lines = trained(ledger)
    assert sorted(ln for _, ln in lines) == list(range(1, 41))  # every example once, none twice
    steps = ledger.steps()
    assert [s["global_step"] for s in steps] == list(range(1, 11))  # same end as an uninterrupted run
    events = ledger.events(limit=10000)
    assert [e["level"] for e in events if e["kind"] == "nonfinite_loss"] == ["warning", "warning"]
    rollback = [e for e in events if e["kind"] == "nonfinite_rollback"]
    assert len(rollback) == 1 and rollback[0]["level"] == "error"
    assert json.loads(rollback[0]["data"])["to_step"] == 5  # the last checkpoint before the NaNs
    lr = {s["global_step"]: s["learning_rate"] for s in steps}
    assert lr[5] == pytest.approx(1e-3) and lr[6] == lr[10] == pytest.approx(5e-4)
    assert ledger.get_value(lr_scale_key("hero"))["scale"] == 0.5
    engine = start(realm, ledger)  # the lower learning rate survives a restart
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    engine.cleanup()
    ledger.close()


def _simulate_oom(monkeypatch, engine: Engine, max_tokens: int, calls: list[int]) -> None:
    """The model raises torch.OutOfMemoryError for a forward pass of more than ``max_tokens`` tokens
    (``calls`` gets each pass's token count: rows x length, padded or not)."""
    real_forward = engine.model.forward

    def forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].numel())
        if kwargs["input_ids"].numel() > max_tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward)


@pytest.mark.parametrize("probe", [False, True], ids=["during-a-step", "memory-probe"])
def test_cuda_oom_halves_the_micro_batch_and_trains_the_same_steps(make_realm, monkeypatch, probe):
    training = {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "save_steps": 100}
    records = make_records(30)
    reference = make_realm("reference", training=training)
    ledger_ref = Ledger(reference.ledger_path)
    qid = admit(reference, ledger_ref, "quest.jsonl", records)
    engine = start(reference, ledger_ref)
    engine.train_quest(qid, records)
    engine.cleanup()

    realm = make_realm("oom", training=training)
    ledger = Ledger(realm.ledger_path)
    qid = admit(realm, ledger, "quest.jsonl", records)
    engine = start(realm, ledger)
    engine.probe_memory = probe
    calls: list[int] = []
    _simulate_oom(monkeypatch, engine, max_tokens=2 * 64, calls=calls)  # 2 rows of max_length fit
    result = engine.train_quest(qid, records)
    assert result.status == "completed"
    ooms = [e for e in ledger.events() if e["kind"] == "out_of_memory"]
    assert engine.micro_batch_size == 2 and len(ooms) == 1
    failed = next(i for i, n in enumerate(calls) if n > 2 * 64)
    assert max(calls[failed + 1:]) <= 2 * 64  # after halving, no pass is too large
    if probe:  # the probe (4 full rows) fails, then 2 full rows fit; the steps never meet an OOM
        assert "probe" in ooms[0]["message"] and calls[:2] == [4 * 64, 2 * 64] and failed == 0
    else:  # a micro-batch of 4 rows fails; the step is retried with 2 rows x 4 accumulation
        assert "gradient accumulation 4" in ooms[0]["message"]
    ref, got = ledger_ref.steps(), ledger.steps()
    key = [(s["example_start"], s["example_end"], s["tokens"], s["examples_json"]) for s in ref]
    assert [(s["example_start"], s["example_end"], s["tokens"], s["examples_json"]) for s in got] == key
    assert [s["loss"] for s in got] == pytest.approx([s["loss"] for s in ref], rel=1e-4)
    engine.cleanup()
    ledger.close()
    ledger_ref.close()


def test_micro_batch_of_one_that_runs_out_of_memory_raises(make_realm, monkeypatch):
    realm = make_realm(training={"micro_batch_size": 2})
    ledger = Ledger(realm.ledger_path)
    records = make_records(4)
    qid = admit(realm, ledger, "quest.jsonl", records)
    engine = start(realm, ledger)
    _simulate_oom(monkeypatch, engine, max_tokens=0, calls=[])
    with pytest.raises(torch.OutOfMemoryError, match="micro_batch_size 1"):
        engine.train_quest(qid, records)
    assert ledger.steps() == []
    engine.cleanup()
    ledger.close()


def test_disk_under_the_floor_pauses_the_daemon_until_space_returns(make_realm):
    realm = make_realm(training={"save_steps": 3})
    free = {"bytes": 0, "checks": 0}

    def free_bytes(path):
        free["checks"] += 1
        return free["bytes"]

    hooks = CheckpointHooks(realm, realm.load_config(), free_bytes=free_bytes, retry_seconds=0.1)
    checkpoints = realm.checkpoints_dir("hero")
    with DaemonThread(realm, checkpoint_hooks=hooks) as d:
        write_text_quest(realm.inbox / "a.jsonl", 24)  # 6 steps; the first save at step 3
        d.wait_for(lambda: (d.ledger.get_value("daemon") or {}).get("state") == "paused", what="paused")
        alerts = [e for e in d.ledger.events() if e["kind"] == "disk_full_pause"]
        assert len(alerts) == 1 and alerts[0]["level"] == "error"
        checks = free["checks"]  # positive sentinel: the guard is still looking at the disk, again and again
        d.wait_for(lambda: free["checks"] >= checks + 5, what="the disk guard re-checking the free space")
        assert d.ledger.last_step()["global_step"] == 3  # waits at the save, trains no further
        assert not checkpoints.exists() or list(checkpoints.iterdir()) == []  # no half checkpoint
        assert d.states() == ["processing"]
        free["bytes"] = 1 << 50
        d.wait_for(lambda: d.states() == ["completed"], what="training resumed")
        assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(checkpoints)] == [3, 6]
        assert any(e["kind"] == "disk_space_recovered" for e in d.ledger.events())
        assert sorted(ln for _, ln in trained(d.ledger)) == list(range(1, 25))
    hooks.ledger.close()


def test_truncated_latest_checkpoint_falls_back_and_the_quest_is_trained_again(make_realm):
    realm = make_realm(training={"save_steps": 2})
    write_text_quest(realm.inbox / "a.jsonl", 24)  # 6 steps, checkpoints 2, 4, 6
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    weights = realm.checkpoints_dir("hero") / ckpt.checkpoint_name(6) / ckpt.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # a torn write of the quest's last checkpoint
    write_text_quest(realm.inbox / "b.jsonl", 8, prefix="bee")
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0

    ledger = Ledger(realm.ledger_path)
    kinds = {e["kind"]: e for e in ledger.events(limit=10000)}
    assert "checkpoint_corrupt" in kinds and kinds["quest_reopened"]["level"] == "error"
    a, b = ledger.list_quests()
    assert a["state"] == b["state"] == "completed" and a["steps"] == 6 and b["steps"] == 2
    assert ledger.last_step()["global_step"] == 8  # as if nothing had happened
    lines = trained(ledger)
    assert len(lines) == len(set(lines)) == 32
    ledger.close()


def test_the_lower_learning_rate_is_dropped_when_the_configured_rate_changes(tmp_path):
    from core.faults import load_lr_scale, store_lr_scale

    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert load_lr_scale(ledger, "hero", 1e-3) == 1.0
    store_lr_scale(ledger, "hero", 0.25, 1e-3, global_step=40)
    assert load_lr_scale(ledger, "hero", 1e-3) == 0.25 and load_lr_scale(ledger, "other", 1e-3) == 1.0
    assert load_lr_scale(ledger, "hero", 2e-4) == 1.0  # the user set a new rate: theirs wins
    assert load_lr_scale(ledger, "hero", 1e-3) == 1.0 and ledger.events()[-1]["kind"] == "lr_scale_reset"
    ledger.close()
