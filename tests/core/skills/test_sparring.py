"""The Mirror (sparring) on a real (nano) hero: only wrong answers become corrections, scored as a trial
scores them; the correction quest is valid, atomic, high priority and traceable; trial-held-out prompts are
never asked; the feedback turn trains only the right answer; the daemon loop's hook after a failed trial."""

from __future__ import annotations

import json
import random

import pytest

from core.chat import measure_batch, tokenize_example
from core.config import HeroConfig, SkillsConfig, SparringConfig
from core.formats import detect_format, normalize
from core.hero import create_default_hero, load_model, load_tokenizer
from core.ledger import Ledger
from core.realm import init_realm
from core.skills.base import TRIAL, Skill, SkillItem, generate_items, prompt_held_out
from core.skills.binary import BinarySkill
from core.skills.letters import LettersSkill
from core.skills.loop import HeroLoop, steps_trained_on
from core.skills.sparring import FEEDBACK_TEMPLATE, correction_record, spar, spar_round, spar_seed
from core.skills.trials import generate_answers, generation_prompt, trial_seed
from core.validation import validate_file
from tests.conftest import FAST_CONFIG, deep_update

PROMPTS = [f"{a}+{b}" for a in ("0", "1", "10", "11") for b in ("0", "1", "10")]


@pytest.fixture(scope="module")
def hero(tmp_path_factory):
    path = create_default_hero(tmp_path_factory.mktemp("hero") / "base", "nano", seed=3)
    return load_model(path, HeroConfig()), load_tokenizer(path, HeroConfig())


class HalfKnown(Skill):
    """A skill whose reference answers are the hero's own greedy answers for half its prompts (so the real
    hero is right exactly there) and something else for the others."""

    name, description, max_level = "HALF", "test skill", 0

    def __init__(self, answers: dict[str, str], known: set[str]):
        self.answers = {p: a if p in known else a + "#not-it" for p, a in answers.items()}

    def space_size(self, level: int) -> int:
        return len(self.answers)

    def draw(self, level: int, rng: random.Random) -> SkillItem:
        prompt = rng.choice(sorted(self.answers))
        return SkillItem(self.name, level, prompt, self.answers[prompt])


def _half_known(model, tokenizer, known_share: float = 0.5) -> HalfKnown:
    items = [SkillItem("HALF", 0, p, "x") for p in PROMPTS]
    own = generate_answers(model, tokenizer, [generation_prompt(tokenizer, it) for it in items],
                           max_new_tokens=12, batch_size=16)
    answers = {p: a.strip() for p, a in zip(PROMPTS, own, strict=True)}
    known = set(PROMPTS[:round(len(PROMPTS) * known_share)])
    return HalfKnown(answers, known)


def test_only_wrong_answers_become_corrections_scored_as_a_trial_scores_them(hero):
    model, tokenizer = hero
    skill = _half_known(model, tokenizer)
    result = spar(model, tokenizer, skill, 0, n=40, seed=7, max_new_tokens=12, batch_size=16)
    # the trial's machinery on the same items: the same answers, the same verdicts
    same = generate_answers(model, tokenizer, [generation_prompt(tokenizer, it) for it in result.items],
                            max_new_tokens=result_budget(tokenizer, result.items), batch_size=16)
    assert result.answers == same
    assert result.flags == [skill.score(a, it.answer) >= 1.0 for a, it in zip(same, result.items, strict=True)]
    assert 0 < result.correct < result.n and result.wrong == result.n - result.correct  # a real mix
    corrections = result.corrections()
    wrong = [(it, a) for it, a, ok in zip(result.items, result.answers, result.flags, strict=True) if not ok]
    assert len(corrections) == result.wrong
    for record, (item, answer) in zip(corrections, wrong, strict=True):
        assert record == {"prompt": [{"role": "user", "content": item.prompt}],
                          "completion": [{"role": "assistant", "content": item.answer}],
                          "skill": "HALF", "level": 0, "wrong_answer": answer}
    right_prompts = {it.prompt for it, ok in zip(result.items, result.flags, strict=True) if ok}
    assert not right_prompts & {r["prompt"][0]["content"] for r in corrections}


def result_budget(tokenizer, items, max_new_tokens: int = 12) -> int:
    """A trial's generation budget (:func:`core.skills.trials.answer_items`)."""
    from core.skills.trials import ANSWER_SLACK_TOKENS

    return min(max_new_tokens, max(len(tokenizer(it.answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
                                   for it in items) + ANSWER_SLACK_TOKENS)


def _realm_and_ledger(tmp_path, **sections):
    # answers of at most 12 tokens, as HalfKnown's reference answers were generated
    realm = init_realm(tmp_path / "realm", overrides=deep_update(FAST_CONFIG, {"skills": {"max_new_tokens": 12},
                                                                               **sections}))
    return realm, realm.load_config(), Ledger(realm.ledger_path)


def test_a_round_writes_a_valid_high_priority_quest_and_a_spar_event(hero, tmp_path):
    model, tokenizer = hero
    realm, config, ledger = _realm_and_ledger(tmp_path)
    skill = _half_known(model, tokenizer)
    try:
        record, result, path = spar_round(ledger, model, tokenizer, skill, hero="hero", level=0, global_step=12,
                                          checkpoint="step-00000012", inbox=realm.inbox, sparring=config.sparring,
                                          skills=config.skills, samples=30)
        assert path == realm.inbox / "high" / "spar-HALF-L0-r000001-s12.jsonl"
        assert not [p for p in path.parent.iterdir() if p != path]  # no temporary left beside it
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines == result.corrections() and len(lines) == record.examples == record.wrong == result.wrong
        assert record.seed == spar_seed("hero", "HALF", 0, 12, 1) and record.round == 1
        report = validate_file(path, display_name=path.name, config=config,
                               count_tokens_batch=lambda exs: measure_batch(exs, tokenizer, 64))
        assert report.accepted and report.examples == record.wrong and report.records_bad == 0
        (event,) = ledger.events_of_kind("spar", 5)
        assert event["data"]["quest"] == path.name and event["data"]["wrong"] == record.wrong
        assert f"{record.wrong}/30 wrong" in event["message"]
        assert ledger.spar_rounds("hero") == [record] and ledger.spar_rounds("hero", "BIN") == []
        # the next round has its own number, seed and file
        again, _, second = spar_round(ledger, model, tokenizer, skill, hero="hero", level=0, global_step=12,
                                      checkpoint=None, inbox=realm.inbox, sparring=config.sparring,
                                      skills=config.skills, samples=30)
        assert again.round == 2 and second.name == "spar-HALF-L0-r000002-s12.jsonl" and again.seed != record.seed
    finally:
        ledger.close()


def test_a_round_with_no_wrong_answer_writes_no_file(hero, tmp_path):
    model, tokenizer = hero
    realm, config, ledger = _realm_and_ledger(tmp_path)
    try:
        record, result, path = spar_round(ledger, model, tokenizer, _half_known(model, tokenizer, 1.0),
                                          hero="hero", level=0, global_step=0, checkpoint="base",
                                          inbox=realm.inbox, sparring=config.sparring, skills=config.skills,
                                          samples=20)
        assert path is None and record.quest is None and record.wrong == 0 and result.correct == 20
        assert not any(realm.inbox.rglob("*.jsonl"))
        assert ledger.events_of_kind("spar", 5)[0]["data"]["examples"] == 0
    finally:
        ledger.close()


@pytest.mark.parametrize("skill,level", [(BinarySkill(), 5), (LettersSkill(), 6)])
def test_sparring_never_asks_a_trial_held_out_prompt(hero, skill, level):
    model, tokenizer = hero
    every = skill.holdout_every(level)
    assert every > 0  # levels that hold prompts out for trials
    result = spar(model, tokenizer, skill, level, n=48, seed=spar_seed("hero", skill.name, level, 0, 1),
                  max_new_tokens=4, batch_size=48)
    assert not any(prompt_held_out(skill.name, it.prompt, every) for it in result.items)
    trial_items = generate_items(skill, level, 48, trial_seed("hero", skill.name, level, 0), TRIAL)
    assert not {it.prompt for it in trial_items} & {it.prompt for it in result.items}
    assert all(r["prompt"][0]["content"] == it.prompt for r, it in
               zip(result.corrections(), [i for i, ok in zip(result.items, result.flags, strict=True) if not ok],
                   strict=True))


def test_the_feedback_turn_shows_the_wrong_answer_and_trains_only_the_right_one(hero):
    _, tokenizer = hero
    item = SkillItem("BIN", 1, "10+1", "11")
    record = correction_record(item, "101", feedback_turn=True)
    assert [m["role"] for m in record["prompt"]] == ["user", "assistant", "user"]
    assert record["prompt"][1]["content"] == "101"
    assert record["prompt"][2]["content"] == FEEDBACK_TEMPLATE.format(answer="101")
    example = normalize(record, detect_format(record))
    tokenized = tokenize_example(example, tokenizer, None)
    learned = [t for t, label in zip(tokenized.input_ids, tokenized.labels, strict=True) if label != -100]
    assert tokenizer.decode(learned) == "11<|im_end|>"  # never the wrong answer of the prompt
    assert correction_record(item, "101")["prompt"] == [{"role": "user", "content": "10+1"}]


def test_the_loop_spars_after_a_failed_trial_only_when_switched_on(hero, tmp_path):
    model, tokenizer = hero
    for on in (False, True):
        realm, config, ledger = _realm_and_ledger(
            tmp_path / str(on), skills={"trial_samples": 30, "trial_every_steps": 1, "max_new_tokens": 12},
            sparring={"after_failed_trial": on, "samples": 24})
        try:
            loop = HeroLoop(realm, config, ledger)
            loop.start(0)
            loop.due = lambda: ["BIN"]  # the schedule is tested in test_loop.py
            (trial_id,) = loop.after_checkpoint(model, tokenizer, 40, realm.root / "step-00000040")
            assert not ledger.trials("hero", "BIN")[0].promoted  # a random hero fails BIN
            quests = sorted(p.name for p in realm.inbox.rglob("spar-*.jsonl"))
            assert quests == (["spar-BIN-L0-r000001-s40.jsonl"] if on else [])
            assert len(ledger.events_of_kind("spar", 5)) == int(on)
        finally:
            ledger.close()


def test_correction_quests_count_as_training_on_their_skill(tmp_path):
    from core.ledger import QuestState

    realm, config, ledger = _realm_and_ledger(tmp_path)
    try:
        for i, name in enumerate(("skill-BIN-L0-k.jsonl", "spar-BIN-L0-r000001-s2.jsonl",
                                  "spar-BINX-L0-r000002-s2.jsonl"), start=1):
            ledger.execute("INSERT INTO quests(name, stored_name, priority, state, created_at, updated_at) "
                           "VALUES (?,?,?,?,?,?)", (name, f"{i}-{name}", "high", QuestState.COMPLETED.value, 0, 0))
            ledger.record_step(global_step=i, quest_id=i, loss=1.0, learning_rate=1e-3, grad_norm=1.0, tokens=10,
                               tokens_per_second=1.0, example_start=0, example_end=1, example_lines=[1],
                               quest_steps=1)
        assert steps_trained_on(ledger, "BIN", -1) == 2 and steps_trained_on(ledger, "BIN", 1) == 1
    finally:
        ledger.close()


def test_sparring_config_defaults():
    s = SparringConfig()
    assert (s.after_failed_trial, s.samples, s.feedback_turn, s.priority) == (False, 64, False, "high")
    assert SkillsConfig().trial_batch_size >= 1
