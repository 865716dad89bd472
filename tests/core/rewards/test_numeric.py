"""Numeric answers: GSM8K's `#### N`, the last number otherwise, normalisation of commas and decimals."""

from fractions import Fraction

import pytest

from core.rewards.numeric import final_number, numeric_answer, parse_number
from tests.conftest import SHARED_DATA, needs_shared


@pytest.mark.parametrize("text,value", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", 72),
    ("#### 1,234", 1234),
    ("#### -5", -5),
    ("#### \u22125", -5),
    ("The answer is $2.50.", Fraction(5, 2)),
    ("it is 18.00", 18),
    ("first 3 then 4 then 5", 5),
    ("v2 of the plan costs 7", 7),
    ("5-3 is two", 3),
    ("no number here", None),
    ("#### none", None),
])
def test_final_number(text, value):
    assert final_number(text) == value


def test_parse_number_normalises_formatting():
    assert parse_number(" 1,000.50 ") == Fraction(20010, 20)
    assert parse_number("$3.") == 3
    assert parse_number("3 apples") is None


def test_numeric_answer_compares_final_numbers_exactly():
    ref = "48 + 24 = 72\n#### 72"
    assert numeric_answer("q", "so the total is 72.", answer=ref) == 1.0
    assert numeric_answer("q", "#### 72.0", answer=ref) == 1.0
    assert numeric_answer("q", "72 clips, or 73?", answer=ref) == 0.0
    assert numeric_answer("q", "I do not know", answer=ref) == 0.0
    assert numeric_answer("q", "#### 1,000", answer="#### 1000") == 1.0
    with pytest.raises(ValueError, match="no number"):
        numeric_answer("q", "72", answer="seventy-two")


@needs_shared(SHARED_DATA / "gsm8k_train.jsonl")
def test_every_gsm8k_reference_has_a_final_number_and_scores_itself():
    import json

    with open(SHARED_DATA / "gsm8k_train.jsonl", encoding="utf-8") as f:
        answers = [json.loads(line)["answer"] for line in f]
    assert len(answers) > 7000
    assert all(final_number(a) is not None for a in answers)
    assert all(numeric_answer("q", a, answer=a) == 1.0 for a in answers[:500])
    assert numeric_answer("q", answers[0].replace("#### 72", "#### 71"), answer=answers[0]) == 0.0
