"""The feedback loop (core/feedback.py): thresholds, the held-out split, exactly-once quest files, crash
recovery, and the daemon closing the loop on the real nano hero (real SQLite, real files, real training)."""

from __future__ import annotations

import json
import os

import pytest

from core import feedback, preferences
from core.config import ConfigError, FeedbackConfig, parse_config
from core.ledger import Ledger

PROMPT = [{"role": "user", "content": "What is 2+2?"}]


def add_pairs(ledger, n, start=0):
    return [preferences.record_pair(ledger, checkpoint="base", prompt=[{"role": "user", "content": f"q{start + i}?"}],
                                    chosen=f"good {start + i}", rejected=f"bad {start + i}") for i in range(n)]


def add_ratings(ledger, n):
    return [preferences.record_rating(ledger, checkpoint="base", prompt=PROMPT, completion=f"answer {i}",
                                      rating=1 if i % 2 else -1) for i in range(n)]


@pytest.fixture
def realm(make_realm):
    return make_realm("fb")


@pytest.fixture
def ledger(realm):
    led = Ledger(realm.ledger_path)
    yield led
    led.close()


def lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_held_out_positions_are_the_first_and_every_kth_after():
    assert [p for p in range(1, 12) if feedback.is_held_out(p, 5)] == [1, 6, 11]
    assert not any(feedback.is_held_out(p, 0) for p in range(1, 20))
    assert feedback.train_count(0, 5, 5) == 4 and feedback.train_count(5, 5, 5) == 4
    cfg = FeedbackConfig(min_pairs=4, holdout_every=2)
    assert feedback.pairs_until_next(0, 0, cfg) == 8  # positions 2, 4, 6, 8 train
    assert feedback.pairs_until_next(0, 7, cfg) == 1 and feedback.pairs_until_next(0, 9, cfg) == 0
    with pytest.raises(ConfigError, match="feedback.holdout_every"):
        parse_config({"feedback": {"holdout_every": 1}})


def test_a_quest_is_claimed_at_the_threshold_once_with_exactly_the_new_pairs(realm, ledger):
    cfg = FeedbackConfig(min_pairs=3, holdout_every=4)
    add_pairs(ledger, 3)
    assert feedback.claim(ledger, cfg) is None  # positions 1 (held out), 2, 3: two to train
    assert feedback.feedback_status(ledger, cfg)["pairs_until_next"] == 1
    add_pairs(ledger, 1, start=3)
    row = feedback.claim(ledger, cfg)
    assert (row["number"], row["kind"], row["records"], row["name"]) == (1, "pair", 3, "feedback-pairs-0001.jsonl")
    assert feedback.claim(ledger, cfg) is None  # used: never claimed twice
    path = feedback.publish(ledger, realm, cfg, 1)
    assert path == realm.inbox / "high" / "feedback-pairs-0001.jsonl"
    recs = lines(path)
    assert [r["chosen"][0]["content"] for r in recs] == ["good 1", "good 2", "good 3"]  # q0 held out
    assert recs[0]["prompt"] == [{"role": "user", "content": "q1?"}]
    assert recs[0]["rejected"] == [{"role": "assistant", "content": "bad 1"}]
    held = lines(feedback.held_out_path(realm, 1))
    assert [r["chosen"][0]["content"] for r in held] == ["good 0"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    status = feedback.feedback_status(ledger, cfg)
    assert (status["new_pairs"], status["held_out_pairs"], status["pairs_until_next"]) == (0, 1, 4)
    assert status["quests"][0]["state"] == "written" and status["quests"][0]["held_out"] == 1
    add_pairs(ledger, 4, start=10)  # positions 5..8: 5 held out, 6, 7, 8 train
    row = feedback.claim(ledger, cfg)
    assert row["number"] == 2 and row["records"] == 3
    feedback.publish(ledger, realm, cfg, 2)
    assert len(lines(feedback.held_out_path(realm, 2))) == 2  # its own and the earlier kept-back pair


def test_ratings_make_a_kto_quest_and_pairs_do_not_count_for_it(realm, ledger):
    cfg = FeedbackConfig(min_pairs=100, min_ratings=4)
    add_pairs(ledger, 5)
    add_ratings(ledger, 3)
    assert feedback.claim(ledger, cfg) is None
    add_ratings(ledger, 1)
    row = feedback.claim(ledger, cfg)
    assert (row["kind"], row["records"], row["name"]) == ("rating", 4, "feedback-ratings-0001.jsonl")
    path = feedback.publish(ledger, realm, cfg, row["number"])
    recs = lines(path)
    assert [r["label"] for r in recs] == [False, True, False, False]
    assert recs[1]["completion"] == [{"role": "assistant", "content": "answer 1"}]
    assert feedback.feedback_status(ledger, cfg)["new_pairs"] == 5


def test_a_crash_between_claim_and_write_writes_the_quest_once_at_the_next_start(realm, ledger, make_realm):
    config = realm.load_config().model_copy(update={"feedback": FeedbackConfig(min_pairs=2, holdout_every=0)})
    add_pairs(ledger, 2)
    feedback.claim(ledger, config.feedback)  # ... and the daemon died here
    path = realm.inbox / "high" / "feedback-pairs-0001.jsonl"
    assert not path.exists()
    loop = feedback.FeedbackLoop(realm, config, ledger)
    loop.start()
    assert len(lines(path)) == 2
    # died after the rename, before it was marked written: the file is there, it is not written again
    ledger.execute("UPDATE feedback_quests SET state='claimed'")
    before = path.stat().st_mtime_ns
    feedback.FeedbackLoop(realm, config, ledger).start()
    assert path.stat().st_mtime_ns == before
    # ... or the admission took it already (the ledger has the quest): not written again either
    ledger.execute("UPDATE feedback_quests SET state='claimed'")
    os.unlink(path)
    ledger.execute("INSERT INTO quests(name, stored_name, state, priority, created_at, updated_at) "
                   "VALUES ('feedback-pairs-0001.jsonl', 'x', 'queued', 'high', 0, 0)")
    feedback.FeedbackLoop(realm, config, ledger).start()
    assert not path.exists()
    assert ledger.query("SELECT state FROM feedback_quests")[0]["state"] == "written"


def test_a_quest_that_cannot_be_written_stays_claimed_and_is_reported(realm, ledger):
    config = realm.load_config().model_copy(update={"feedback": FeedbackConfig(min_pairs=1, holdout_every=0)})
    (realm.inbox / "high").rmdir()
    (realm.inbox / "high").write_text("not a folder")
    add_pairs(ledger, 1)
    loop = feedback.FeedbackLoop(realm, config, ledger, poll_interval_seconds=0)
    assert loop.poll() is None
    assert ledger.query("SELECT state FROM feedback_quests")[0]["state"] == "claimed"
    assert ledger.events_of_kind("feedback_quest_failed", 1)
    (realm.inbox / "high").unlink()
    (realm.inbox / "high").mkdir()
    loop.start()
    assert len(lines(realm.inbox / "high" / "feedback-pairs-0001.jsonl")) == 1


def test_off_switch_writes_nothing(realm, ledger):
    config = realm.load_config().model_copy(update={"feedback": FeedbackConfig(enabled=False, min_pairs=1)})
    add_pairs(ledger, 3)
    assert feedback.FeedbackLoop(realm, config, ledger, poll_interval_seconds=0).poll() is None
    assert not list((realm.inbox / "high").iterdir())
    assert feedback.feedback_status(ledger, config.feedback)["enabled"] is False


def test_the_battle_log_line():
    row = {"number": 3, "accuracy_before": 0.625, "accuracy_after": 0.8125, "held_out": 16, "margin_before": -1.5,
           "margin_after": 2.25}
    assert feedback.scored_message(row) == ("Judge quest #3: preference accuracy 0.62 → 0.81 on 16 held-out pairs "
                                            "(mean margin -1.50 → 2.25 nats)")
    assert "0.50 → ?" in feedback.scored_message({**row, "accuracy_before": 0.5, "accuracy_after": None})
    assert "no held-out pairs" in feedback.scored_message({**row, "held_out": 0})


def test_the_daemon_closes_the_loop_and_scores_with_the_eval_rule(make_realm):
    """Pairs in the ledger -> a Judge quest in the inbox by itself -> trained (DPO) -> scored before and after;
    the after number is what ``python -m training eval`` computes on the end checkpoint."""
    from core.checkpoint_layout import latest_checkpoint
    from core.evaluation import evaluate_preferences
    from tests.core.test_daemon import DaemonThread

    realm = make_realm("loop", feedback={"min_pairs": 4, "holdout_every": 2},
                       training={"micro_batch_size": 2, "learning_rate": 5e-3})
    ledger = Ledger(realm.ledger_path)
    for i in range(8):
        preferences.record_pair(ledger, checkpoint="base", prompt=[{"role": "user", "content": f"{i}+{i}?"}],
                                chosen=f"{i + i}", rejected=f"I cannot say what {i} and {i} make, sorry.")
    try:
        with DaemonThread(realm) as d:
            d.wait_for(lambda: ledger.events_of_kind("judge_quest_scored", 1), timeout=120, what="the score")
        quest = ledger.list_quests()[0]
        assert (quest["name"], quest["school"], quest["state"], quest["examples_trained"]) == (
            "feedback-pairs-0001.jsonl", "dpo", "completed", 4)
        row = ledger.query("SELECT * FROM feedback_quests")[0]
        event = ledger.events_of_kind("judge_quest_scored", 1)[0]
        assert event["message"] == feedback.scored_message(row)
        assert event["message"].startswith("Judge quest #1: preference accuracy ")
        assert row["global_step_before"] == 0 and row["global_step_after"] == quest["last_global_step"]
        config = realm.load_config()
        checkpoint = latest_checkpoint(realm.checkpoints_dir(config.hero.name))
        again = evaluate_preferences(checkpoint, feedback.held_out_path(realm, 1), config)
        assert again["pairs"] == 4 and again["preference_accuracy"] == pytest.approx(row["accuracy_after"])
        assert again["mean_margin"] == pytest.approx(row["margin_after"], abs=1e-4)  # the eval rule, exactly
        assert feedback.feedback_status(ledger, config.feedback)["pairs_until_next"] == 8
        from training.status import collect_status, format_status

        status = collect_status(realm, config)
        assert status["feedback"]["quests"][0]["accuracy_after"] == row["accuracy_after"]
        assert (f"feedback:     8 pairs until the next Judge quest, 64 ratings until a KTO one; Judge quest #1: "
                f"preference accuracy {row['accuracy_before']:.2f} → {row['accuracy_after']:.2f}") in format_status(status)
    finally:
        ledger.close()


@pytest.mark.slow
def test_scoring_before_and_after_does_not_change_what_the_quest_trains(make_realm):
    """The same Judge quest file trained with the before/after scoring (written by the loop) and without it
    (dropped by hand, the loop off) gives the same losses and margins at every step: scoring only reads the
    weights (eval mode, RNG forked, training mode and attention put back)."""
    from tests.core.test_daemon import DaemonThread

    def train(name, feedback_cfg, drop=None):
        realm = make_realm(name, feedback=feedback_cfg, training={"micro_batch_size": 2, "learning_rate": 5e-3,
                                                                   "warmup_steps": 0})
        ledger = Ledger(realm.ledger_path)
        for i in range(6):
            preferences.record_pair(ledger, checkpoint="base", prompt=[{"role": "user", "content": f"{i}*{i}?"}],
                                    chosen=f"{i * i}", rejected=f"maybe {i + 1}")
        if drop is not None:
            (realm.inbox / "high" / "feedback-pairs-0001.jsonl").write_bytes(drop)
        try:
            with DaemonThread(realm) as d:
                d.wait_for(lambda: any(q["state"] == "completed" for q in ledger.list_quests()), timeout=120,
                           what="the quest trained")
                if drop is None:
                    d.wait_for(lambda: ledger.events_of_kind("judge_quest_scored", 1), timeout=60, what="the score")
            steps = [(s["global_step"], s["loss"]) for s in ledger.steps(with_examples=False)]
            return steps, ledger.step_metrics(), realm
        finally:
            ledger.close()

    scored_steps, scored_metrics, realm = train("scored", {"min_pairs": 4, "holdout_every": 3})
    quest_file = realm.queue_dir("recently_completed").glob("*feedback-pairs-0001.jsonl")
    content = next(p for p in quest_file if p.name.endswith(".jsonl")).read_bytes()
    plain_steps, plain_metrics, _ = train("plain", {"enabled": False}, drop=content)
    assert len(scored_steps) == 2 and scored_steps == plain_steps
    assert scored_metrics == plain_metrics


def test_score_leaves_the_training_model_as_it_was_and_matches_the_eval_rule(tmp_path, realm):
    """:func:`core.feedback.score` on a model in training mode with the engine's packed attention and dropout:
    the mode, the attention, the weights and the torch RNG are as before; the numbers are the eval rule's."""
    import torch

    from core.evaluation import evaluate_preferences
    from core.hero import create_default_hero, load_model, load_tokenizer
    from core.packing import PACKED_SDPA, register_packed_sdpa

    config = realm.load_config()
    folder = create_default_hero(tmp_path / "nano", size="nano")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i}?"}],
                                        "chosen": [{"role": "assistant", "content": f"{i}"}],
                                        "rejected": [{"role": "assistant", "content": f"no {i}"}]}) + "\n"
                            for i in range(5)), encoding="utf-8")
    expected = evaluate_preferences(folder, held, config)
    register_packed_sdpa()
    model, tokenizer = load_model(folder, config.hero), load_tokenizer(folder, config.hero)
    model.config.attention_dropout = 0.5
    model.set_attn_implementation(PACKED_SDPA)
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    got = feedback.score(model, tokenizer, held, config)
    assert got["pairs"] == 5 and got["preference_accuracy"] == expected["preference_accuracy"]
    assert got["mean_margin"] == pytest.approx(expected["mean_margin"], abs=1e-4)
    assert model.training and model.config._attn_implementation == PACKED_SDPA
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
