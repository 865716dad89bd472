"""The reward library: small documented functions ``reward(prompt, completion, **refs) -> float``.

By use case:

- math: :func:`~core.rewards.numeric.numeric_answer` (final number, GSM8K ``#### N``);
- exact answers: :func:`~core.rewards.text.exact_match`, a skill's scorer (:func:`~core.rewards.skill.skill_reward`);
- format: :func:`~core.rewards.text.regex_format`, :func:`~core.rewards.text.json_valid` (structured output);
- length / brevity: :func:`~core.rewards.text.length_penalty`;
- your own: a Python file in the realm, sandboxed (:class:`~core.rewards.sandbox.SandboxedReward`).

Combine them with weights: :func:`~core.rewards.combine.build_reward`.
"""

from core.rewards.combine import BUILTIN_REWARDS, RewardSpecError, WeightedReward, build_reward
from core.rewards.numeric import final_number, numeric_answer
from core.rewards.sandbox import RewardFailure, SandboxedReward
from core.rewards.skill import skill_reward
from core.rewards.text import exact_match, json_valid, length_penalty, normalize_text, regex_format

__all__ = [
    "BUILTIN_REWARDS", "RewardFailure", "RewardSpecError", "SandboxedReward", "WeightedReward", "build_reward",
    "exact_match", "final_number", "json_valid", "length_penalty", "normalize_text", "numeric_answer",
    "regex_format", "skill_reward",
]
