"""The skill interface, deterministic seeds, and the rule that keeps trial items out of training.

**Items.** ``skill.sample(level, rng, split)`` draws one :class:`SkillItem` from ``rng`` (a
``random.Random``); :func:`generate_items` draws ``n`` of them from ``random.Random(seed)``, so the same
``(skill, level, n, seed, split)`` always gives the same items. Draws are independent (with
replacement): a trial's right answers are then a binomial sample of the level's accuracy, which is what
the Wilson bound assumes.

**Seeds.** :func:`derive_seed` hashes a purpose and a key (SHA-256, first 8 bytes): training items use
``derive_seed("train", ...)``, trials ``derive_seed("trial", ...)`` (:mod:`core.skills.trials`), so the
two never share a random stream.

**Held-out items.** Where a level has at least :data:`HOLDOUT_MIN_SPACE` distinct prompts (a skill
that does not know its number is probed: :data:`PROBE_DRAWS` draws from a fixed seed giving at least
:data:`PROBE_MIN_DISTINCT` distinct prompts count as that many), about one prompt in :data:`HOLDOUT_EVERY` — those whose SHA-256 of
``"<skill>\\0<prompt>"`` is 0 modulo ``HOLDOUT_EVERY`` — is *trial-only*: training items never use it and
trials use nothing else, so a trial measures answers to prompts never trained. Smaller levels (BIN level
0 has 4 prompts) cannot hold any out without losing part of the skill: there a trial draws from all of
the level's prompts, freshly seeded, and measures whether the hero has the level's whole table. Dataset
skills always hold out (``holdout_every`` records of the file).
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

TRAIN, TRIAL = "train", "trial"
SPLITS = (TRAIN, TRIAL)
HOLDOUT_MIN_SPACE = 1000
HOLDOUT_EVERY = 10
PROBE_DRAWS = 2000
PROBE_MIN_DISTINCT = 800
"""A level of unknown size is large when PROBE_DRAWS draws give this many distinct prompts (a space of
1,000 gives about 865)."""
MAX_DRAWS_PER_ITEM = 10_000
"""Rejection-sampling budget per item (a split that would need more raises :class:`SkillError`)."""


class SkillError(ValueError):
    """Raised for a level a skill does not have, a split with no items, or a custom skill that fails."""


@dataclass(frozen=True)
class SkillItem:
    """One exercise: the ``prompt`` shown to the hero and the reference ``answer`` (both strings)."""

    skill: str
    level: int
    prompt: str
    answer: str

    def to_dict(self) -> dict:
        return asdict(self)


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2**63) from ``parts`` (joined with ``\\x1f``; SHA-256, first 8 bytes, big-endian, the
    top bit dropped so it fits a SQLite integer)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def prompt_held_out(skill: str, prompt: str, every: int) -> bool:
    """Whether ``prompt`` of ``skill`` is trial-only: SHA-256 of ``"<skill>\\0<prompt>"`` (first 8 bytes) is
    0 modulo ``every`` (about one prompt in ``every``). ``every`` <= 0: never."""
    if every <= 0:
        return False
    digest = hashlib.sha256(f"{skill}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % every == 0


class Skill(ABC):
    """A skill: levels ``0..max_level``, items drawn per level, an exact scorer.

    Subclasses set ``name``, ``description``, ``max_level`` and implement :meth:`draw`; they may override
    :meth:`normalize` (documenting it), :meth:`space_size` and :meth:`holdout_every`.
    """

    name: str = ""
    description: str = ""
    max_level: int = 0

    @abstractmethod
    def draw(self, level: int, rng: random.Random) -> SkillItem:
        """One item of ``level`` from ``rng`` (any prompt of the level, ignoring the held-out rule)."""

    def space_size(self, level: int) -> int | None:
        """Distinct prompts of ``level`` (None: unknown or very large)."""
        return None

    def holdout_every(self, level: int) -> int:
        """One prompt in N of ``level`` is trial-only (0: none; see the module doc)."""
        size = self.space_size(level)
        if size is None:
            size = self._probed_space(level)
        return HOLDOUT_EVERY if size >= HOLDOUT_MIN_SPACE else 0

    def _probed_space(self, level: int) -> int:
        """HOLDOUT_MIN_SPACE when PROBE_DRAWS draws (a fixed seed) give PROBE_MIN_DISTINCT distinct
        prompts, else the number seen (cached per level)."""
        cache = self.__dict__.setdefault("_probe_cache", {})
        if level not in cache:
            rng = random.Random(derive_seed("probe", self.name, level))
            seen: set[str] = set()
            for _ in range(PROBE_DRAWS):
                seen.add(self.draw(level, rng).prompt)
                if len(seen) >= PROBE_MIN_DISTINCT:
                    break
            cache[level] = HOLDOUT_MIN_SPACE if len(seen) >= PROBE_MIN_DISTINCT else len(seen)
        return cache[level]

    def check_level(self, level: int) -> None:
        """Raise :class:`SkillError` unless ``0 <= level <= max_level``."""
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= self.max_level:
            raise SkillError(f"skill {self.name} has levels 0..{self.max_level}, not {level!r}")

    def sample(self, level: int, rng: random.Random, split: str = TRAIN) -> SkillItem:
        """One item of ``level`` for ``split`` (``"train"`` or ``"trial"``), honouring the held-out rule."""
        self.check_level(level)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        every = self.holdout_every(level)
        for _ in range(MAX_DRAWS_PER_ITEM):
            item = self.draw(level, rng)
            if every <= 0 or prompt_held_out(self.name, item.prompt, every) == (split == TRIAL):
                return item
        raise SkillError(f"skill {self.name} level {level}: no {split} item in {MAX_DRAWS_PER_ITEM} draws")

    def normalize(self, text: str) -> str:
        """The normalisation both sides go through before comparing: surrounding whitespace removed."""
        return text.strip()

    def score(self, completion: str, answer: str) -> float:
        """1.0 when ``normalize(completion) == normalize(answer)``, else 0.0."""
        return float(self.normalize(completion) == self.normalize(answer))

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "max_level": self.max_level,
                "kind": type(self).__name__}


def generate_items(skill: Skill, level: int, n: int, seed: int, split: str = TRAIN) -> list[SkillItem]:
    """``n`` items of ``skill`` at ``level`` for ``split``, drawn from ``random.Random(seed)``:
    deterministic for the same arguments. Raises :class:`SkillError` (bad level, no items)."""
    rng = random.Random(seed)
    return [skill.sample(level, rng, split) for _ in range(n)]
