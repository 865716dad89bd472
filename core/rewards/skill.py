"""A skill's scorer as a reward (for GRPO, sparring, combined rewards)."""

from __future__ import annotations

from collections.abc import Callable


def skill_reward(skill) -> Callable[..., float]:
    """``reward(prompt, completion, *, answer, **refs) -> float``: ``skill.score(completion, answer)``, the
    skill's exact scorer with its documented normalisation (1.0 right, 0.0 wrong). ``skill``: any object of
    :class:`core.skills.base.Skill`'s interface."""

    def reward(prompt: str, completion: str, *, answer: str, **_) -> float:
        return float(skill.score(completion, answer))

    reward.__name__ = f"skill_{skill.name}"
    reward.__doc__ = f"1.0 when the answer is right by skill {skill.name}'s scorer, else 0.0."
    return reward
