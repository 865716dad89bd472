"""Which school trains a quest (config rules, formats), what validation says, the ledger's step metrics,
and the Judge's tokenization helpers."""

from __future__ import annotations

import json

import pytest

from core.chat import IGNORE_INDEX
from core.config import ConfigError, RealmConfig, parse_config
from core.ledger import Ledger
from core.schools import school_by_format, school_for, school_problem
from core.schools.base import keep_last_runs
from core.schools.judge import extract_prompt, pair_loss
from core.validation import validate_file


def words(example: dict) -> tuple[int, int]:
    text = json.dumps(example)
    return len(text.split()), max(1, len(text.split()) // 2)


def cfg(schools=None) -> RealmConfig:
    return parse_config({"schools": schools or {}})


def test_school_by_format_and_rules():
    assert [school_by_format(f) for f in ("text", "messages", "preference", "preference_implicit",
                                          "preference_sharegpt", "unpaired_preference", "messages_rated",
                                          None)] == ["sft", "sft", "dpo", "dpo", "dpo", "kto", "kto", "sft"]
    config = cfg({"prefs_ipo*.jsonl": {"school": "dpo", "loss_type": "ipo", "beta": 0.5},
                  "prefs*.jsonl": {"school": "orpo"}, "*.jsonl": {"beta": 0.3}})
    assert school_for("prefs_ipo_a.jsonl", "preference", config)[0] == "ipo"
    name, rule = school_for("high_prefs_b.jsonl.gz", "preference", config)  # priority prefix and .gz ignored
    assert name == "orpo" and rule.beta == 0.1
    name, rule = school_for("other.jsonl", "unpaired_preference", config)   # no school: by format
    assert name == "kto" and rule.beta == 0.3
    assert school_for("x.jsonl", "text", cfg())[0] == "sft"


def test_rules_are_validated_all_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config({"schools": {"a*": {"school": "kto", "loss_type": "ipo"}, "b*": {"school": "alchemy"},
                                  "c*": {"beta": 0, "teacher": "x"}}})
    text = str(err.value)
    for needle in ("schools.a*.loss_type", "schools.b*.school", "schools.c*.beta", "schools.c*.teacher"):
        assert needle in text


def test_a_setting_of_another_school_is_refused_naming_its_key():
    with pytest.raises(ConfigError) as err:
        parse_config({"schools": {
            "a*": {"school": "sft", "rewards": {"exact_match": 1.0}, "alpha": 0.3, "weighting": "margin"},
            "b*": {"school": "grpo", "beta": 0.05, "temperature": 0.7, "num_generations": 4, "epochs": 2},
            "c*": {"desirable_weight": 2.0, "beta": 0.2},  # no school: KTO or DPO by the file's format
            "d*": {"school": "fortune_teller", "weighting": "margin", "shuffle": True}}})
    text = str(err.value)
    assert "3 problem(s)" in text
    for needle in ("schools.a*.rewards: Value error, rewards is a setting of school grpo, not sft",
                   "schools.a*.alpha: Value error, alpha is a setting of school distill, not sft",
                   "schools.a*.weighting: Value error, weighting is a setting of school fortune_teller, not sft"):
        assert needle in text
    assert not any(f"schools.{k}*" in text for k in "bcd")


def test_school_problem_names_the_mismatch():
    assert school_problem("dpo", "preference") is None and school_problem("sft", "text") is None
    assert school_problem("kto", "messages_rated") is None and school_problem("fortune_teller", "alpaca") is None
    reason = school_problem("kto", "preference")
    assert "school kto trains unpaired ratings" in reason and "format preference" in reason
    assert "school dpo" in reason  # what the file would get without the rule
    assert "paired preferences" in school_problem("dpo", "text")


def test_validation_report_names_the_school_and_rejects_a_mismatch(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes it is", "rejected": "no"}) + "\n"
                            for i in range(4)))
    report = validate_file(path, config=cfg(), count_tokens=words)
    assert report.accepted and report.school == "dpo" and report.trainable
    bad = validate_file(path, config=cfg({"prefs*": {"school": "sft"}}), count_tokens=words)
    assert not bad.accepted and bad.school == "sft" and "school sft trains SFT records" in bad.reason
    rated = tmp_path / "ratings.jsonl"
    rated.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": "a"}],
                                         "label": i % 2 == 0}) + "\n" for i in range(4)))
    report = validate_file(rated, config=cfg(), count_tokens=words)
    assert report.accepted and report.format == "messages_rated" and report.school == "kto"
    assert report.tokens.total > 0


def test_step_metrics_are_stored_with_their_step_and_rolled_back(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for step in (1, 2, 3):
        ledger.record_step(global_step=step, quest_id=None, loss=0.5, learning_rate=1e-3, grad_norm=1.0, tokens=10,
                           tokens_per_second=1.0, example_start=0, example_end=1, example_lines=[step],
                           quest_steps=step, metrics={"rewards/margins": step / 10, "bad": float("nan")})
    assert ledger.step_metrics() == {1: {"rewards/margins": 0.1}, 2: {"rewards/margins": 0.2},
                                     3: {"rewards/margins": 0.3}}
    assert ledger.rollback_to(1) == 2
    assert ledger.step_metrics() == {1: {"rewards/margins": 0.1}}
    ledger.record_step(global_step=1, quest_id=None, loss=0.5, learning_rate=1e-3, grad_norm=1.0, tokens=10,
                       tokens_per_second=1.0, example_start=0, example_end=1, example_lines=[1], quest_steps=1)
    assert ledger.step_metrics() == {}  # a replaced step keeps no stale metrics
    assert "school" in {c["name"] for c in ledger.query("PRAGMA table_info(quests)")}
    ledger.close()


def test_extract_prompt_matches_trl():
    data_utils = pytest.importorskip("trl.data_utils")
    cases = [("\n\nHuman: hi\n\nAssistant: hello there", "\n\nHuman: hi\n\nAssistant: go away"),
             ("same start then A", "same start then B"), ("abc", "abd")]
    for chosen, rejected in cases:
        theirs = data_utils.extract_prompt({"chosen": chosen, "rejected": rejected})
        assert extract_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    conv_c = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}]
    conv_r = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]
    theirs = data_utils.extract_prompt({"chosen": conv_c, "rejected": conv_r})
    assert extract_prompt(conv_c, conv_r) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


def test_keep_last_runs_keeps_the_response_turns_only():
    x = IGNORE_INDEX
    labels = [x, 5, 6, x, x, 7, x, 8, 9]
    assert keep_last_runs(labels, 1) == [x, x, x, x, x, x, x, 8, 9]
    assert keep_last_runs(labels, 2) == [x, x, x, x, x, 7, x, 8, 9]
    assert keep_last_runs(labels, 5) == labels


def test_orpo_formula():
    import torch

    c, r = torch.tensor([-4.0]), torch.tensor([-9.0])
    nc, nr = torch.tensor([2.0]), torch.tensor([3.0])
    losses, cr, rr = pair_loss("orpo", 0.1, c, r, None, None, nc, nr)
    a, b = -2.0, -3.0
    log_odds = (a - b) - (torch.log1p(-torch.exp(torch.tensor(a))) - torch.log1p(-torch.exp(torch.tensor(b))))
    assert losses.item() == pytest.approx(2.0 - 0.1 * torch.nn.functional.logsigmoid(log_odds).item(), abs=1e-6)
    assert (cr.item(), rr.item()) == pytest.approx((-0.2, -0.3))
