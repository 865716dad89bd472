"""Skill items as SFT quest records, and the prompt the hero sees in a trial.

A skill item becomes TRL's *conversational prompt-completion* record::

    {"prompt": [{"role": "user", "content": "101+11"}],
     "completion": [{"role": "assistant", "content": "1000"}],
     "skill": "BIN", "level": 2}

(``skill`` and ``level`` ride along for traceability; training ignores them). The engine renders it with
the hero tokenizer's chat template, loss on the assistant turn and its end-of-turn marker
(:func:`core.chat.tokenize_example`). A trial renders :func:`prompt_messages` with the same template and
``add_generation_prompt=True`` — exactly the text that precedes the answer in training — and the hero
continues from there (:mod:`core.skills.trials`). Short user turns and no system prompt keep an item
to about 20 tokens of template around a few tokens of answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from core.fsutil import atomic_write
from core.skills.base import TRAIN, Skill, SkillItem, derive_seed, generate_items


def prompt_messages(item: SkillItem) -> list[dict[str, str]]:
    """The conversation the hero is asked: one user turn holding the item's prompt."""
    return [{"role": "user", "content": item.prompt}]


def quest_record(item: SkillItem) -> dict:
    """The SFT record of an item (see the module doc)."""
    return {"prompt": prompt_messages(item), "completion": [{"role": "assistant", "content": item.answer}],
            "skill": item.skill, "level": item.level}


def prompt_record(item: SkillItem) -> dict:
    """The prompt record of an item for GRPO (TRL's prompt-only type, :mod:`core.schools.champion`): the
    prompt, the ``answer`` the skill's scorer checks, ``skill`` and ``level``."""
    return {"prompt": prompt_messages(item), "answer": item.answer, "skill": item.skill, "level": item.level}


def training_items(skill: Skill, level: int, n: int, key: object) -> list[SkillItem]:
    """``n`` training items of ``skill`` at ``level``, from the seed ``derive_seed("train", skill, level,
    key)``: ``key`` (e.g. a quest counter) makes each batch different and reproducible; never a trial item
    where the level holds items out (:mod:`core.skills.base`)."""
    return generate_items(skill, level, n, derive_seed(TRAIN, skill.name, level, key), TRAIN)


def mixed_items(skill: Skill, levels: Sequence[int], n: int, key: object) -> list[SkillItem]:
    """``n`` training items spread evenly over ``levels`` (the first levels get the remainder), shuffled
    with ``random.Random(derive_seed("shuffle", skill, key))``. The engine reads a quest in file order, so
    levels must be interleaved: a quest of blocks (all of level 0, then all of level 1...) trains one level
    at a time and forgets the others meanwhile. Raises :class:`core.skills.base.SkillError` for a bad level."""
    if not levels:
        raise ValueError("levels must not be empty")
    items = [it for i, level in enumerate(levels)
             for it in training_items(skill, level, n // len(levels) + (i < n % len(levels)), key)]
    random.Random(derive_seed("shuffle", skill.name, key)).shuffle(items)
    return items


def quest_file_name(skill: str, level: int, key: object) -> str:
    """``skill-<SKILL>-L<level>-<key>.jsonl``."""
    return f"skill-{skill}-L{level}-{key}.jsonl"


def spar_quest_name(skill: str, level: int, round_number: int, global_step: int) -> str:
    """A sparring round's correction quest (:mod:`core.skills.sparring`):
    ``spar-<SKILL>-L<level>-r<round, 6 digits>-s<global step>.jsonl``."""
    return f"spar-{skill}-L{level}-r{round_number:06d}-s{global_step}.jsonl"


def skill_quest_globs(skill: str) -> tuple[str, str]:
    """The names of the quests that train ``skill`` (SQLite ``GLOB`` / :func:`fnmatch.fnmatchcase`): its skill
    quests ``skill-<SKILL>-L*`` (:func:`quest_file_name`: generated and ``skills quest`` files) and its
    correction quests ``spar-<SKILL>-L*`` (:func:`spar_quest_name`)."""
    return f"skill-{skill}-L*", f"spar-{skill}-L*"


def write_quest(path: Path | str, records: Iterable[dict]) -> Path:
    """Write ``records`` as JSON lines to ``path`` atomically (:func:`core.fsutil.atomic_write`: a hidden
    temporary sibling the ingester ignores, fsync, rename), so a watcher sees the whole file or nothing.
    Raises ``FileExistsError`` rather than replace an existing file, ``OSError`` as the OS reports it (the
    folder must exist)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite a quest")
    with atomic_write(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
