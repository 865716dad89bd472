"""``LETTERS``: letter-string puzzles in the spirit of the original realm's SY skill (no word list).

Each task has four levels; within a task the size k = 2 + 2·(N mod 4) is 2, 4, 6, 8.

- levels 0-3, **reverse**: ``rev S`` → S reversed, S k random letters: ``rev dbca`` → ``acbd``;
- levels 4-7, **sort**: ``sort S`` → S's letters in alphabetical order: ``sort dbca`` → ``abcd``;
- levels 8-11, **acrostic**: ``first W1 ... Wk`` → the words' first letters, the Wi k random words of 2-5
  letters: ``first ox hat me ic`` → ``ohmi``.

Letters are lowercase ASCII, so a byte-level tokenizer sees one token per letter.

**Scoring** (:meth:`LettersSkill.normalize`): surrounding whitespace removed, spaces inside removed,
lowercased; anything else must match exactly.
"""

from __future__ import annotations

import random
import string

from core.skills.base import Skill, SkillItem

TASKS = ("rev", "sort", "first")
LEVELS_PER_TASK = 4
ALPHABET = string.ascii_lowercase


def task_of(level: int) -> str:
    """``rev`` for levels 0-3, ``sort`` for 4-7, ``first`` (acrostic) for 8-11."""
    return TASKS[level // LEVELS_PER_TASK]


def size_of(level: int) -> int:
    """Letters (reverse, sort) or words (acrostic) at ``level``: 2, 4, 6, 8 within each task."""
    return 2 + 2 * (level % LEVELS_PER_TASK)


class LettersSkill(Skill):
    """Reverse, sort and acrostic of random letter strings (see the module doc for the level table)."""

    name = "LETTERS"
    description = "letter strings: reverse (levels 0-3), sort (4-7), acrostic (8-11) of 2-8 letters or words"
    max_level = len(TASKS) * LEVELS_PER_TASK - 1

    def draw(self, level: int, rng: random.Random) -> SkillItem:
        task, k = task_of(level), size_of(level)
        if task == "first":
            words = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 5))) for _ in range(k)]
            return SkillItem(self.name, level, "first " + " ".join(words), "".join(w[0] for w in words))
        letters = "".join(rng.choice(ALPHABET) for _ in range(k))
        answer = letters[::-1] if task == "rev" else "".join(sorted(letters))
        return SkillItem(self.name, level, f"{task} {letters}", answer)

    def space_size(self, level: int) -> int | None:
        k = size_of(level)
        if task_of(level) == "first":
            return None  # 26^k first letters times the other letters: very large (probed)
        return 26 ** k

    def normalize(self, text: str) -> str:
        """Whitespace removed (inside too), lowercased."""
        return "".join(text.split()).lower()
