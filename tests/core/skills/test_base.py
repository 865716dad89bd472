"""Items are deterministic per seed; trial and training streams never share a seed; held-out prompts."""

import random

import pytest

from core.skills.base import (
    HOLDOUT_EVERY,
    TRAIN,
    TRIAL,
    SkillError,
    derive_seed,
    generate_items,
    prompt_held_out,
)
from core.skills.binary import BinarySkill
from core.skills.letters import LettersSkill
from core.skills.quests import training_items
from core.skills.trials import trial_seed


def test_same_seed_same_items_other_seed_other_items():
    skill = BinarySkill()
    assert generate_items(skill, 6, 40, 123) == generate_items(skill, 6, 40, 123)
    assert generate_items(skill, 6, 40, 123) != generate_items(skill, 6, 40, 124)


def test_derived_seeds_separate_purposes_and_fit_sqlite():
    seeds = {derive_seed(TRAIN, "BIN", 3, k) for k in range(1000)} | {trial_seed("hero", "BIN", 3, k) for k in range(1000)}
    assert len(seeds) == 2000
    assert all(0 <= s < 2 ** 63 for s in seeds)
    assert derive_seed("a", "bc") != derive_seed("ab", "c")


@pytest.mark.parametrize("skill,level", [(BinarySkill(), 6), (BinarySkill(), 9), (LettersSkill(), 2),
                                         (LettersSkill(), 9)])
def test_large_levels_hold_prompts_out_of_training(skill, level):
    assert skill.holdout_every(level) == HOLDOUT_EVERY
    train = training_items(skill, level, 500, "quest-1")
    trial = generate_items(skill, level, 200, trial_seed("hero", skill.name, level, 100), TRIAL)
    assert not any(prompt_held_out(skill.name, it.prompt, HOLDOUT_EVERY) for it in train)
    assert all(prompt_held_out(skill.name, it.prompt, HOLDOUT_EVERY) for it in trial)
    assert not {it.prompt for it in train} & {it.prompt for it in trial}


def test_small_levels_try_the_whole_table():
    skill = BinarySkill()
    assert skill.space_size(0) == 4 and skill.holdout_every(0) == 0
    trial = generate_items(skill, 0, 200, trial_seed("hero", "BIN", 0, 0), TRIAL)
    assert {it.prompt for it in trial} == {"0+0", "0+1", "1+0", "1+1"}


def test_the_held_out_share_is_about_one_in_ten():
    rng = random.Random(0)
    prompts = {f"{rng.getrandbits(40):b}" for _ in range(20000)}
    share = sum(prompt_held_out("BIN", p, HOLDOUT_EVERY) for p in prompts) / len(prompts)
    assert 0.09 < share < 0.11
    assert not prompt_held_out("BIN", "1+1", 0)


@pytest.mark.parametrize("level", [-1, 12, 1.5, True, "1"])
def test_levels_outside_the_table_raise(level):
    with pytest.raises(SkillError, match="levels 0..11"):
        generate_items(BinarySkill(), level, 1, 0)


def test_an_unknown_split_raises():
    with pytest.raises(ValueError):
        BinarySkill().sample(0, random.Random(0), "eval")


def test_a_skill_of_unknown_size_is_probed():
    from core.skills.base import Skill, SkillItem

    class Tiny(Skill):
        name, max_level = "TINY", 1

        def draw(self, level, rng):
            k = rng.randrange(3 if level == 0 else 10 ** 6)
            return SkillItem(self.name, level, f"q{k}", f"a{k}")

    tiny = Tiny()
    assert tiny.space_size(0) is None
    assert tiny.holdout_every(0) == 0 and tiny.holdout_every(1) == HOLDOUT_EVERY
    assert {it.prompt for it in generate_items(tiny, 0, 50, 1, TRIAL)} == {"q0", "q1", "q2"}
    assert LettersSkill().holdout_every(8) == HOLDOUT_EVERY  # acrostics: unknown size, large
