"""Rewards combined with weights from a spec: built-ins with settings, a skill's scorer, a sandboxed file."""

import pytest

from core.rewards.combine import BUILTIN_REWARDS, RewardSpecError, build_reward
from core.skills.binary import BinarySkill


def test_weighted_sum_of_builtins_with_settings():
    reward = build_reward({"numeric_answer": 1.0,
                           "regex_format": {"weight": 0.5, "pattern": r".*#### -?\d+"},
                           "length_penalty": {"weight": 0.1, "max_chars": 10}})
    scores = reward.scores("q", "It is 8.\n#### 8", answer="#### 8")
    assert scores["numeric_answer"] == 1.0 and scores["regex_format"] == 1.0
    assert scores["length_penalty"] == pytest.approx(-0.5)
    assert scores["total"] == pytest.approx(1.0 + 0.5 - 0.05)
    assert reward("q", "It is 8.\n#### 8", answer="#### 8") == pytest.approx(1.45)


def test_skill_scorer_and_file_reward(tmp_path):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "short.py").write_text("def reward(prompt, completion, **refs):\n"
                                                   "    return 1.0 if len(completion) < 5 else 0.0\n")
    reward = build_reward({"skill:BIN": 2.0, "file:rewards/short.py": 1.0}, realm_root=tmp_path,
                          skills={"BIN": BinarySkill()})
    try:
        assert reward("101+11", " 0b1000 ", answer="1000") == 2.0  # BIN's normalisation; 8 chars: not short
        assert reward("1+1", "10", answer="10") == 3.0
        assert reward("1+1", "11", answer="10") == 1.0
        assert reward.failures == []
    finally:
        reward.close()


def test_every_problem_of_a_spec_is_reported(tmp_path):
    outside = tmp_path.parent / "evil.py"
    outside.write_text("def reward(p, c, **r):\n    return 1\n")
    with pytest.raises(RewardSpecError) as exc:
        build_reward({"nope": 1.0, "exact_match": {"weight": "x"}, "regex_format": {"patern": "x"},
                      "skill:GHOST": 1.0, f"file:../{outside.name}": 1.0, "length_penalty": float("inf")},
                     realm_root=tmp_path, skills={})
    text = str(exc.value)
    for needle in ("nope: unknown reward", "exact_match: weight must be", "regex_format: unknown settings ['patern']",
                   "skill:GHOST: no skill named 'GHOST'", "outside the realm", "length_penalty: weight"):
        assert needle in text


def test_every_builtin_has_a_docstring_and_the_reward_signature():
    import inspect

    for name, fn in BUILTIN_REWARDS.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:2]] == ["prompt", "completion"], name
        assert params[-1].kind == inspect.Parameter.VAR_KEYWORD, name
        assert fn.__doc__ and len(fn.__doc__) > 40, name
