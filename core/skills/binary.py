"""``BIN``: binary arithmetic. Level N uses (N+1)-bit operands: add, then subtract, then multiply.

=========  ===================  ==============================  =================================
level N    operation            operands a, b                   distinct prompts
=========  ===================  ==============================  =================================
0 – 3      ``a+b``              uniform in [0, 2^(N+1))         4, 16, 64, 256
4 – 7      ``a-b`` (a ≥ b)      uniform in [0, 2^(N+1)), a ≥ b  528, 2,080, 8,256, 32,896
8 – 11     ``a*b``              uniform in [0, 2^(N+1))         4^(N+1): 262,144 ... 16,777,216
=========  ===================  ==============================  =================================

Numbers are written in binary without leading zeros (zero is ``0``). The prompt is the bare expression,
e.g. ``101+11``, and the answer the result, ``1000``: short prompts, one token per character with a
byte-level tokenizer. Subtraction draws ``a`` and ``b`` and swaps them when ``a < b``, so results are
never negative.

**Scoring** (:meth:`BinarySkill.normalize`): surrounding whitespace, inner spaces and ``_`` removed, a
``0b`` prefix dropped, leading zeros dropped (``0010`` = ``10``); anything else must match exactly.
"""

from __future__ import annotations

import random

from core.skills.base import Skill, SkillItem

OPERATIONS = ("+", "-", "*")
LEVELS_PER_OPERATION = 4


def operation_of(level: int) -> str:
    """``+`` for levels 0-3, ``-`` for 4-7, ``*`` for 8-11."""
    return OPERATIONS[level // LEVELS_PER_OPERATION]


class BinarySkill(Skill):
    """Binary arithmetic (see the module doc for the level table)."""

    name = "BIN"
    description = "binary arithmetic: add (levels 0-3), subtract (4-7), multiply (8-11); level N uses N+1-bit operands"
    max_level = len(OPERATIONS) * LEVELS_PER_OPERATION - 1

    def draw(self, level: int, rng: random.Random) -> SkillItem:
        top = 1 << (level + 1)
        a, b = rng.randrange(top), rng.randrange(top)
        op = operation_of(level)
        if op == "+":
            result = a + b
        elif op == "-":
            a, b = max(a, b), min(a, b)
            result = a - b
        else:
            result = a * b
        return SkillItem(self.name, level, f"{a:b}{op}{b:b}", f"{result:b}")

    def space_size(self, level: int) -> int:
        top = 1 << (level + 1)
        return top * (top + 1) // 2 if operation_of(level) == "-" else top * top

    def normalize(self, text: str) -> str:
        """Whitespace and ``_`` removed, ``0b`` prefix and leading zeros dropped (see the module doc)."""
        text = "".join(text.split()).replace("_", "")
        if text[:2].lower() == "0b":
            text = text[2:]
        stripped = text.lstrip("0")
        return stripped if stripped or not text else "0"
