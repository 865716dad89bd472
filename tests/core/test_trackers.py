"""``training.report_to`` (core/trackers.py through accelerate): a real engine run writes TensorBoard event
files under the realm holding the ledger's loss curve, read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from core.config import ConfigError, parse_config
from core.engine import Engine
from core.ledger import Ledger
from core.quest_queue import QuestQueue
from core.trackers import RUNS_FOLDER, resolve_report_to

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e .[dev])")

SMALL = {"micro_batch_size": 2, "max_length": 64, "warmup_steps": 2, "learning_rate": 2e-3, "save_steps": 1000,
         "eval_holdout_every": 4, "eval_max_examples": 3, "eval_steps": 3}


def train(realm, n_records: int) -> Ledger:
    ledger = Ledger(realm.ledger_path)
    path = realm.root / "q.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}: the fox runs " * 2}) + "\n" for i in range(n_records)))
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    records = [(i + 1, {"text": f"record {i}: the fox runs " * 2}) for i in range(n_records)]
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    try:
        assert engine.train_quest(qid, iter(records)).status == "completed"
    finally:
        engine.cleanup()
    return ledger


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_loss_curve_of_a_run(make_realm):
    realm = make_realm(training=SMALL)
    ledger = train(realm, 40)
    try:
        steps = ledger.steps()
        evals = ledger.evals()
        assert len(steps) >= 10 and evals
        run_dir = realm.root / RUNS_FOLDER / "hero"
        assert list(run_dir.glob("events.out.tfevents.*"))
        scalars = read_scalars(run_dir)
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss"} <= set(scalars)
        assert [s for s, _ in scalars["loss"]] == [r["global_step"] for r in steps]
        for (_, logged), row in zip(scalars["loss"], steps, strict=True):
            assert math.isclose(logged, row["loss"], rel_tol=1e-6)
        assert [s for s, _ in scalars["learning_rate"]] == [r["global_step"] for r in steps]
        assert [s for s, _ in scalars["eval_loss"]] == [r["global_step"] for r in evals]
        assert math.isclose(scalars["eval_loss"][-1][1], evals[-1]["eval_loss"], rel_tol=1e-6)
    finally:
        ledger.close()


def test_an_empty_report_to_writes_nothing(make_realm):
    realm = make_realm(training={**SMALL, "report_to": []})
    train(realm, 8).close()
    assert not (realm.root / RUNS_FOLDER).exists()


def test_unknown_trackers_are_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"training\.report_to\.1: Input should be 'tensorboard', 'wandb'"):
        parse_config({"training": {"report_to": ["tensorboard", "comet"]}})
    assert parse_config({}).training.report_to is None
    assert resolve_report_to(parse_config({}))[0] == ["tensorboard"]  # the default, tensorboard being installed


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_a_warning_not_a_failure(make_realm):
    realm = make_realm(training={**SMALL, "report_to": ["wandb", "tensorboard"]})
    ledger = train(realm, 8)
    try:
        warning = ledger.last_event("report_to")
        assert warning is not None and "wandb, which is not installed (pip install wandb)" in warning["message"]
        assert ledger.steps() and list((realm.root / RUNS_FOLDER / "hero").glob("events.out.tfevents.*"))
    finally:
        ledger.close()
