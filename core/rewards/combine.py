"""Weighted combinations of rewards, built from a spec such as a config entry.

A spec maps reward names to a weight, or to an object with ``weight`` and the reward's settings::

    {"numeric_answer": 1.0,
     "regex_format": {"weight": 0.2, "pattern": ".*#### -?[0-9]+"},
     "length_penalty": {"weight": 0.1, "max_chars": 400},
     "skill:BIN": 1.0,                          # a skill's scorer (needs a skill registry)
     "file:rewards/brevity.py": 0.5}            # a custom reward in the realm, sandboxed

The total is the weighted sum ``Σ wᵢ · rᵢ(prompt, completion, **refs)`` (weights are not normalised, so
a penalty with weight 0.1 costs at most 0.1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.rewards.numeric import numeric_answer
from core.rewards.sandbox import RewardFailure, SandboxedReward
from core.rewards.skill import skill_reward
from core.rewards.text import exact_match, json_valid, length_penalty, regex_format

Reward = Callable[..., float]
"""``reward(prompt: str, completion: str, **refs) -> float``."""

BUILTIN_REWARDS: dict[str, Reward] = {
    "exact_match": exact_match,
    "numeric_answer": numeric_answer,
    "regex_format": regex_format,
    "length_penalty": length_penalty,
    "json_valid": json_valid,
}
"""The built-in rewards by name (the README groups them by use case)."""


class RewardSpecError(ValueError):
    """Raised for a reward spec naming an unknown reward, a bad weight or setting, or a file outside the realm."""


@dataclass
class WeightedReward:
    """A weighted sum of named rewards. ``components``: ``(name, reward, weight)``."""

    components: list[tuple[str, Reward, float]] = field(default_factory=list)

    def scores(self, prompt: str, completion: str, **refs: Any) -> dict[str, float]:
        """Each component's value by name, and ``"total"`` (the weighted sum)."""
        out = {name: float(fn(prompt, completion, **refs)) for name, fn, _ in self.components}
        out["total"] = sum(w * out[name] for name, _, w in self.components)
        return out

    def __call__(self, prompt: str, completion: str, **refs: Any) -> float:
        return self.scores(prompt, completion, **refs)["total"]

    @property
    def failures(self) -> list[RewardFailure]:
        """Failures of the sandboxed components (see :class:`core.rewards.sandbox.SandboxedReward`)."""
        return [f for _, fn, _ in self.components if isinstance(fn, SandboxedReward) for f in fn.failures]

    def close(self) -> None:
        for _, fn, _ in self.components:
            if isinstance(fn, SandboxedReward):
                fn.close()


def build_reward(spec: Mapping[str, float | Mapping[str, Any]], *, realm_root: Path | str | None = None,
                 skills: Mapping[str, Any] | None = None, timeout_seconds: float = 5.0,
                 on_failure: Callable[[RewardFailure], None] | None = None) -> WeightedReward:
    """A :class:`WeightedReward` from ``spec`` (see the module doc).

    ``realm_root``: where ``file:`` paths are resolved (they must stay inside it); ``skills``: name ->
    skill object, for ``skill:NAME``; ``timeout_seconds`` and ``on_failure``: for sandboxed files.
    Raises :class:`RewardSpecError` naming every problem.
    """
    problems: list[str] = []
    components: list[tuple[str, Reward, float]] = []
    for name, value in spec.items():
        settings = dict(value) if isinstance(value, Mapping) else {"weight": value}
        weight = settings.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            problems.append(f"{name}: weight must be a finite number, got {weight!r}")
            continue
        try:
            components.append((name, _resolve(name, settings, realm_root, skills, timeout_seconds, on_failure),
                               float(weight)))
        except RewardSpecError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        for _, fn, _ in components:
            if isinstance(fn, SandboxedReward):
                fn.close()
        raise RewardSpecError("; ".join(problems))
    return WeightedReward(components)


def _resolve(name: str, settings: dict, realm_root, skills, timeout_seconds, on_failure) -> Reward:
    if name.startswith("file:"):
        if realm_root is None:
            raise RewardSpecError("a file reward needs the realm")
        root = Path(realm_root).resolve()
        path = (root / name[5:]).resolve()
        if root not in path.parents:
            raise RewardSpecError(f"{name[5:]!r} is outside the realm {root}")
        if path.suffix != ".py" or not path.is_file():
            raise RewardSpecError(f"{path} is not a .py file")
        function = settings.pop("function", "reward")
        if settings:
            raise RewardSpecError(f"unknown settings {sorted(settings)} (a file reward takes weight, function)")
        return SandboxedReward(path, timeout_seconds=timeout_seconds, function=function, name=name,
                               on_failure=on_failure)
    if name.startswith("skill:"):
        skill = (skills or {}).get(name[6:])
        if skill is None:
            raise RewardSpecError(f"no skill named {name[6:]!r} (known: {', '.join(sorted(skills or {})) or 'none'})")
        if settings:
            raise RewardSpecError(f"unknown settings {sorted(settings)} (a skill reward takes only a weight)")
        return skill_reward(skill)
    fn = BUILTIN_REWARDS.get(name)
    if fn is None:
        raise RewardSpecError(f"unknown reward (built in: {', '.join(BUILTIN_REWARDS)}; or skill:NAME, "
                              "file:PATH.py)")
    import inspect

    accepted = {p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY}
    unknown = set(settings) - accepted
    if unknown:
        raise RewardSpecError(f"unknown settings {sorted(unknown)} (accepted: {', '.join(sorted(accepted))})")
    return functools.partial(fn, **settings) if settings else fn
