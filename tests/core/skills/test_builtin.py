"""The built-in skills' level tables and scorers (BIN and LETTERS), checked on many draws."""

import random

import pytest

from core.skills.base import generate_items
from core.skills.binary import BinarySkill, operation_of
from core.skills.letters import LettersSkill, size_of, task_of


@pytest.mark.parametrize("level", range(12))
def test_bin_level_table(level):
    skill = BinarySkill()
    op = "+" if level < 4 else "-" if level < 8 else "*"
    assert operation_of(level) == op
    for item in generate_items(skill, level, 300, level):
        a_text, b_text = item.prompt.split(op)
        a, b = int(a_text, 2), int(b_text, 2)
        assert a < 2 ** (level + 1) and b < 2 ** (level + 1)
        assert a_text == f"{a:b}" and b_text == f"{b:b}"  # no leading zeros
        expected = a + b if op == "+" else a - b if op == "-" else a * b
        assert expected >= 0 and item.answer == f"{expected:b}"
        assert item.level == level and item.skill == "BIN"


def test_bin_operands_use_the_whole_range():
    seen = {it.prompt for it in generate_items(BinarySkill(), 1, 400, 0)}
    assert len(seen) == BinarySkill().space_size(1) == 16
    assert BinarySkill().space_size(4) == 32 * 33 // 2


@pytest.mark.parametrize("answer,reference,right", [
    ("1000", "1000", True), (" 1000\n", "1000", True), ("0b1000", "1000", True), ("001000", "1000", True),
    ("1 000", "1000", True), ("1_000", "1000", True), ("0", "0", True), ("000", "0", True),
    ("100", "1000", False), ("1000.", "1000", False), ("8", "1000", False), ("", "0", False), ("10000", "1000", False),
])
def test_bin_scorer_normalisation(answer, reference, right):
    assert BinarySkill().score(answer, reference) == float(right)


@pytest.mark.parametrize("level", range(12))
def test_letters_level_table(level):
    skill = LettersSkill()
    task, k = task_of(level), size_of(level)
    assert k == 2 + 2 * (level % 4)
    for item in generate_items(skill, level, 200, level):
        word, _, rest = item.prompt.partition(" ")
        assert word == task
        if task == "first":
            words = rest.split(" ")
            assert len(words) == k and all(2 <= len(w) <= 5 and w.isalpha() and w.islower() for w in words)
            assert item.answer == "".join(w[0] for w in words)
        else:
            assert len(rest) == k and rest.isalpha() and rest.islower()
            assert item.answer == (rest[::-1] if task == "rev" else "".join(sorted(rest)))


def test_letters_scorer_normalisation():
    s = LettersSkill()
    assert s.score(" ACbd ", "acbd") == 1.0 and s.score("a c b d", "acbd") == 1.0
    assert s.score("acb", "acbd") == 0.0 and s.score("acbd.", "acbd") == 0.0


def test_draws_come_only_from_the_rng_given():
    a = BinarySkill().draw(5, random.Random(9))
    random.seed(1)
    b = BinarySkill().draw(5, random.Random(9))
    assert a == b
