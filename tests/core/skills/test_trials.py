"""Promotion trials: greedy batched answers on a real (nano) hero, scoring, the Wilson rule, the ledger."""

import json

import pytest
import torch

from core.config import HeroConfig
from core.hero import create_default_hero, load_model, load_tokenizer
from core.ledger import Ledger
from core.skills.base import TRIAL, SkillItem, generate_items, prompt_held_out
from core.skills.binary import BinarySkill
from core.skills.stats import wilson_lower_bound
from core.skills.trials import (
    ANSWER_SLACK_TOKENS,
    TrialResult,
    generate_answers,
    generation_prompt,
    run_trial,
    trial_due,
    trial_seed,
)


@pytest.fixture(scope="module")
def hero(tmp_path_factory):
    path = create_default_hero(tmp_path_factory.mktemp("hero") / "base", "nano", seed=3)
    return load_model(path, HeroConfig()), load_tokenizer(path, HeroConfig())


def test_a_trial_scores_every_answer_with_the_skill(hero):
    model, tokenizer = hero
    skill = BinarySkill()
    seed = trial_seed("hero", "BIN", 5, 40)
    batches = []
    result = run_trial(model, tokenizer, skill, 5, n=40, seed=seed, batch_size=16,
                       on_batch=lambda: batches.append(1))
    assert len(batches) == 3  # 16 + 16 + 8: the daemon keeps its heartbeat between batches
    assert result.n == len(result.answers) == 40 and result.level == 5 and result.seed == seed
    assert result.items == generate_items(skill, 5, 40, seed, TRIAL)
    assert all(prompt_held_out("BIN", it.prompt, 10) for it in result.items)  # level 5 holds prompts out
    assert result.flags == [skill.score(a, it.answer) == 1.0 for a, it in zip(result.answers, result.items, strict=True)]
    assert result.correct == sum(result.flags) and result.accuracy == result.correct / 40
    assert result.lower_bound == wilson_lower_bound(result.correct, 40)
    longest = max(len(tokenizer(it.answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
                  for it in result.items)
    # byte tokens: each decodes to at most one character (a lone byte of a UTF-8 sequence to one U+FFFD)
    assert all(len(a) <= longest + ANSWER_SLACK_TOKENS for a in result.answers)


MIXED_LENGTHS = [SkillItem("BIN", 0, "1+1", "10"), SkillItem("BIN", 7, "11111111-1", "11111110"),
                 SkillItem("LETTERS", 9, "first ab cd ef gh", "aceg"), SkillItem("BIN", 3, "101+11", "1000")]


def test_batched_greedy_answers_equal_one_at_a_time(hero):
    model, tokenizer = hero
    prompts = [generation_prompt(tokenizer, it) for it in MIXED_LENGTHS]
    together = generate_answers(model, tokenizer, prompts, max_new_tokens=10, batch_size=4)
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=10, batch_size=1)[0] for p in prompts]
    assert together == alone
    assert len(set(together)) > 1  # the prompts matter (left padding did not swamp them)


def test_a_model_training_with_packed_attention_generates_with_padding_masks(hero):
    from core.packing import PACKED_SDPA, register_packed_sdpa

    model, tokenizer = hero
    prompts = [generation_prompt(tokenizer, it) for it in MIXED_LENGTHS]
    plain = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    assert len(set(plain)) > 1
    model.set_attn_implementation(register_packed_sdpa())  # as the engine does on a CPU
    try:  # packed attention ignores the padding mask: the left-padded rows would see their padding
        assert generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=4) == plain
        assert model.config._attn_implementation == PACKED_SDPA
    finally:
        model.set_attn_implementation("sdpa")


def test_a_trial_leaves_model_tokenizer_and_rng_as_they_were(hero):
    model, tokenizer = hero
    model.train()
    tokenizer.padding_side = "right"
    torch.manual_seed(11)
    before = torch.get_rng_state()
    run_trial(model, tokenizer, BinarySkill(), 0, n=30, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training and tokenizer.padding_side == "right"


def _result(correct: int, n: int = 50, level: int = 2) -> TrialResult:
    items = [SkillItem("BIN", level, f"{i:b}+0", f"{i:b}") for i in range(n)]
    answers = [it.answer if i < correct else "x" for i, it in enumerate(items)]
    return TrialResult("BIN", level, 99, items, answers, [i < correct for i in range(n)], 1.5)


@pytest.mark.parametrize("correct,current,promoted,after", [
    (46, 2, True, 3),    # 46/50: lower bound 0.812 >= 0.8
    (45, 2, False, 2),   # 45/50: 0.786
    (50, 1, False, 1),   # a trial at another level measures only
    (50, 3, False, 3),
])
def test_promotion_rule(correct, current, promoted, after):
    record = _result(correct).record(hero="h", current_level=current, threshold=0.8, global_step=300,
                                     checkpoint="step-00000300", sample_answers=4)
    assert record.promoted is promoted and record.level_after == after
    assert record.n == 50 and record.correct == correct and record.lower_bound == wilson_lower_bound(correct, 50)
    assert len(record.samples) == 4 and set(record.samples[0]) == {"prompt", "expected", "answer", "correct"}


def test_trials_in_the_ledger_set_levels_and_are_events(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert ledger.skill_level("h", "BIN") == 0 and ledger.last_trial("h", "BIN") is None
        r0 = _result(50, level=0).record(hero="h", current_level=0, threshold=0.8, global_step=100,
                                         checkpoint="step-00000100", sample_answers=3)
        r1 = _result(30, level=1).record(hero="h", current_level=1, threshold=0.8, global_step=200,
                                         checkpoint="step-00000200", sample_answers=3)
        first = ledger.record_trial(r0)
        second = ledger.record_trial(r1)
        assert ledger.skill_level("h", "BIN") == 1 and ledger.skill_level("other-hero", "BIN") == 0
        trials = ledger.trials("h", "BIN")
        assert [t.id for t in trials] == [first, second] and trials[0].samples == r0.samples
        assert trials[0].promoted and not trials[1].promoted and trials[1].accuracy == 0.6
        summary = ledger.skill_summary("h")
        assert summary["BIN"]["trials"] == 2 and summary["BIN"]["last_trial"].global_step == 200
        events = [e for e in ledger.events() if e["kind"] in ("trial", "promotion")]
        assert [e["kind"] for e in events] == ["trial", "promotion", "trial"]
        assert "50/50 right" in events[0]["message"] and "level 0 -> 1" in events[1]["message"]
        assert json.loads(events[2]["data"])["lower_bound"] == pytest.approx(wilson_lower_bound(30, 50))
        assert ledger.forget_trials_after(150) == 1  # weights after step 150 lost in a crash
        assert ledger.skill_level("h", "BIN") == 1 and len(ledger.trials("h")) == 1
        assert ledger.forget_trials_after(50) == 1 and ledger.skill_level("h", "BIN") == 0
    finally:
        ledger.close()


@pytest.mark.parametrize("steps,every,level,due", [
    (200, 200, 0, True), (199, 200, 0, False), (500, 0, 0, False), (200, 200, 12, False), (200, 200, 11, True),
])
def test_trial_due(steps, every, level, due):
    assert trial_due(steps, every, level, max_level=11) is due
