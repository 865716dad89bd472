"""core.evaluation / ``python -m training eval``: the records it evaluates are the ones training held out."""

from __future__ import annotations

import json
import shutil

import pytest

from core import checkpoint as ckpt
from core.daemon import Daemon
from core.evaluation import evaluate_file
from core.ledger import Ledger
from tests.conftest import cli


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["drop", "reject"])
def test_eval_every_n_evaluates_exactly_the_records_training_held_out(make_realm, tmp_path, policy):
    """With length_policy drop or reject, records too long for max_length never enter training, so the
    held-out positions count only the records training reads: ``eval --every N`` must count the same way."""
    realm = make_realm(training={"max_length": 48, "eval_holdout_every": 3, "eval_max_examples": 50},
                       validation={"length_policy": policy, "max_bad_line_ratio": 0.5})
    source = tmp_path / "mixed.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        for i in range(30):  # lines 2, 6, 10, ... are longer than max_length: never trained
            text = "long " * 20 if i % 4 == 1 else f"record {i}: " + "ab" * (i % 7)
            f.write(json.dumps({"text": text}) + "\n")
    shutil.copy(source, realm.inbox / source.name)
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0

    ledger = Ledger(realm.ledger_path)
    quest = ledger.list_quests()[0]
    held_out = ledger.evals(quest["id"])[-1]  # the engine's evaluation of the final weights
    trained = {ln for s in ledger.steps() for ln in json.loads(s["examples_json"])}
    ledger.close()
    assert quest["state"] == "completed" and held_out["examples"] == 7  # 22 trainable records, every 3rd
    assert len(trained) == 22 - 7

    out = cli(realm, "eval", str(source), "--every", "3", "--max-examples", "50", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["checkpoint"] == ckpt.checkpoint_name(held_out["global_step"])
    assert result["examples"] == held_out["examples"]
    assert result["loss"] == pytest.approx(held_out["eval_loss"], rel=1e-4)

    # a file the realm never stored a verdict for is validated the same way on the spot
    model_dir = realm.checkpoints_dir("hero") / ckpt.checkpoint_name(held_out["global_step"])
    loss, n = evaluate_file(model_dir, source, realm.load_config(), max_examples=50, every=3)
    assert n == held_out["examples"] and loss == pytest.approx(held_out["eval_loss"], rel=1e-4)


def _write_pairs(path, n):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                                "rejected": f" Perhaps {3 * i + 1}{'!' * (i % 4)}"}) + "\n")


@pytest.mark.slow
def test_eval_on_a_preference_file_gives_accuracy_margin_and_pairs(make_realm, tmp_path):
    from core.engine import Engine
    from core.evaluation import evaluate_preferences
    from core.records import held_out_records
    from core.schools import make_school

    realm = make_realm(training={"micro_batch_size": 4, "learning_rate": 3e-3, "save_steps": 100})
    source = tmp_path / "prefs.jsonl"
    _write_pairs(source, 24)
    config = realm.load_config()

    # the base model, through the engine's own (training) path: the same log-probs as eval's
    ledger = Ledger(realm.ledger_path)
    engine = Engine(realm, config, ledger)
    engine.setup()
    judge = make_school("dpo")
    from core.evaluation import file_verdicts
    verdicts = file_verdicts(source, config, engine.tokenizer)
    items = [judge.encode(ex, engine.tokenizer, config.training.max_length, line)
             for line, ex in held_out_records(source, verdicts, 1)]
    engine.model.eval()
    values = judge.reference_values(engine, items)
    engine.cleanup()
    ledger.close()
    margins = (values[:, 0] - values[:, 1]).tolist()
    base_dir = realm.hero_dir("hero") / "base"
    base = evaluate_preferences(base_dir, source, config)
    assert base["pairs"] == 24
    assert base["preference_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 24)
    assert base["mean_margin"] == pytest.approx(sum(margins) / 24, abs=1e-4)

    shutil.copy(source, realm.inbox / "prefs.jsonl")
    assert Daemon(realm, config, until_idle=True).run() == 0
    out = cli(realm, "eval", str(source), "--checkpoint", "latest", "--compare-base", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["pairs"] == result["base"]["pairs"] == 24 and 0 <= result["preference_accuracy"] <= 1
    assert result["base"]["preference_accuracy"] == pytest.approx(base["preference_accuracy"])
    assert result["delta"]["mean_margin"] == pytest.approx(result["mean_margin"] - base["mean_margin"])
    assert result["mean_margin"] > base["mean_margin"]  # DPO on these pairs widened the margin
    step = result["checkpoint"]
    again = cli(realm, "eval", str(source), "--checkpoint", str(int(step.split("-")[1])), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["mean_margin"] == pytest.approx(result["mean_margin"])
    rated = tmp_path / "ratings.jsonl"
    rated.write_text(json.dumps({"prompt": "q", "completion": "a", "label": True}) + "\n")
    refused = cli(realm, "eval", str(rated), "--checkpoint", "base", "--json")
    assert refused.returncode == 1 and "unpaired ratings" in refused.stderr


def test_eval_on_a_prompt_file_gives_the_mean_reward_of_greedy_completions(make_realm, tmp_path):
    """A Champion (GRPO) prompt file: the mean reward of one greedy completion per prompt, scored by the
    file's rule -- the same number the engine's held-out evaluation of a grpo quest computes."""
    from core.engine import Engine
    from core.evaluation import evaluate_prompts, file_verdicts
    from core.records import held_out_records
    from core.schools import make_school

    realm = make_realm(schools={"sums*.jsonl": {"school": "grpo", "max_completion_length": 6, "rewards": {
        "numeric_answer": 1.0, "length_penalty": {"weight": 0.5, "max_chars": 3}}}, "plain*": {"school": "grpo"}})
    source = tmp_path / "sums.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(10)))
    config = realm.load_config()
    base_dir = realm.hero_dir("hero") / "base"
    ledger = Ledger(realm.ledger_path)
    engine = Engine(realm, config, ledger)
    engine.setup()  # creates the newborn base
    champion = make_school("grpo", config.schools["sums*.jsonl"])
    verdicts = file_verdicts(source, config, engine.tokenizer)
    items = [champion.encode(ex, engine.tokenizer, config.training.max_length, line)
             for line, ex in held_out_records(source, verdicts, 1)]
    want = -champion.evaluate(engine, items)  # the engine's own held-out evaluation
    engine.cleanup()
    ledger.close()
    got = evaluate_prompts(base_dir, source, config, realm)
    assert got["prompts"] == 10 and got["mean_reward"] == pytest.approx(want, abs=1e-6)
    assert -0.5 <= got["mean_reward"] <= 1.0

    out = cli(realm, "eval", str(source), "--checkpoint", "base", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["mean_reward"] == pytest.approx(want, abs=1e-6)
    text = cli(realm, "eval", str(source), "--checkpoint", "base")
    assert "mean reward" in text.stdout and "on 10 prompts" in text.stdout
    bare = tmp_path / "plain.jsonl"  # its rule names no rewards, and the records carry no skill + answer
    bare.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(3)))
    refused = cli(realm, "eval", str(bare), "--checkpoint", "base", "--json")
    assert refused.returncode == 1 and "set config schools[<glob>].rewards" in refused.stderr, refused.stderr
    shutil.copy(bare, tmp_path / "other.jsonl")  # no grpo rule: prompts alone are not a valid quest
    refused = cli(realm, "eval", str(tmp_path / "other.jsonl"), "--checkpoint", "base", "--json")
    assert refused.returncode == 1 and "does not pass validation: no valid records" in refused.stderr, refused.stderr
