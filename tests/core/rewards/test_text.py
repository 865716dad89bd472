"""Text rewards: exact match (with its normalisation), regex format, length penalty, JSON validity."""

import re

import pytest

from core.rewards.text import exact_match, json_valid, length_penalty, normalize_text, regex_format


def test_exact_match_normalises_whitespace_only():
    assert exact_match("q", "  Paris \n", answer="Paris") == 1.0
    assert exact_match("q", "New   York", answer="New York") == 1.0
    assert exact_match("q", "paris", answer="Paris") == 0.0
    assert exact_match("q", "paris", answer="Paris", ignore_case=True) == 1.0
    assert exact_match("q", "Paris.", answer="Paris") == 0.0
    assert normalize_text("cafe\u0301") == normalize_text("caf\u00e9")  # NFC


def test_regex_format_fullmatch_and_search():
    gsm = r".*#### -?\d+"
    assert regex_format("q", "so 3+4=7\n#### 7\n", pattern=gsm) == 1.0
    assert regex_format("q", "#### 7 and more", pattern=gsm) == 0.0
    assert regex_format("q", "#### 7 and more", pattern=r"#### \d+", mode="search") == 1.0
    assert regex_format("q", "no answer", pattern=r"#### \d+", mode="search") == 0.0
    with pytest.raises(ValueError):
        regex_format("q", "x", pattern="x", mode="prefix")
    with pytest.raises(re.error):
        regex_format("q", "x", pattern="(")


def test_length_penalty_is_zero_within_budget_then_linear_to_minus_one():
    assert length_penalty("q", "x" * 100, max_chars=100) == 0.0
    assert length_penalty("q", "x" * 150, max_chars=100) == pytest.approx(-0.5)
    assert length_penalty("q", "x" * 200, max_chars=100) == -1.0
    assert length_penalty("q", "x" * 5000, max_chars=100) == -1.0
    with pytest.raises(ValueError):
        length_penalty("q", "x", max_chars=0)


@pytest.mark.parametrize("text,require,expected", [
    ('{"a": 1}', "any", 1.0), ("[1, 2]", "any", 1.0), ("42", "any", 1.0),
    ('```json\n{"a": [1, 2]}\n```', "object", 1.0), ('{"a": 1}', "array", 0.0), ("[1]", "array", 1.0),
    ('{"a": 1', "any", 0.0), ("{'a': 1}", "any", 0.0), ("NaN", "any", 0.0), ('{"a": Infinity}', "any", 0.0),
    ("", "any", 0.0), ("[" * 100000, "any", 0.0),
])
def test_json_valid(text, require, expected):
    assert json_valid("q", text, require=require) == expected


def test_json_valid_rejects_an_unknown_requirement():
    with pytest.raises(ValueError):
        json_valid("q", "{}", require="dict")
