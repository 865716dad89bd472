"""Custom skills: Python files in the realm's ``skills/`` folder (the realm owner's code).

A file ``<realm>/skills/<name>.py`` defines::

    import random

    NAME = "ECHO"                  # optional: default the file name in capitals ("echo.py" -> "ECHO")
    DESCRIPTION = "repeat a word"  # optional
    MAX_LEVEL = 3                  # optional: levels 0..MAX_LEVEL (default 0)

    def generate(level: int, rng: random.Random) -> tuple[str, str]:
        '''One (prompt, answer) of ``level``; draw every random choice from ``rng`` (determinism).'''
        word = "".join(rng.choice("abc") for _ in range(level + 2))
        return f"echo {word}", word

    def score(completion: str, answer: str) -> float:    # optional: default exact after strip()
        return float(completion.strip() == answer)

    def space_size(level: int) -> int | None:            # optional: distinct prompts (held-out rule)
        return 3 ** (level + 2)

Files whose name starts with ``_`` or ``.`` are ignored. Each file is imported in the calling process
(the daemon or the CLI: like ``config.json`` it is trusted, and the Tavern has no way to write it) and
checked by drawing one level-0 item. A file that does not import, lacks ``generate``, returns the wrong
types or takes a taken name is reported (:class:`core.skills.registry.SkillLoadError`) and left out:
never fatal. Errors raised later by ``generate`` or ``score`` become :class:`core.skills.base.SkillError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType

from core.config import SKILL_NAME_PATTERN
from core.skills.base import Skill, SkillError, SkillItem

SKILLS_DIRNAME = "skills"


def custom_skills_dir(realm_root: Path | str) -> Path:
    """``<realm>/skills``."""
    return Path(realm_root) / SKILLS_DIRNAME


def skill_files(realm_root: Path | str) -> list[Path]:
    """The ``.py`` files of ``<realm>/skills`` (sorted; names starting with ``_`` or ``.`` left out)."""
    folder = custom_skills_dir(realm_root)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".py" and not p.name.startswith(("_", "."))
                  and p.is_file())


class CustomSkill(Skill):
    """A skill defined by a module of the realm's ``skills/`` folder (see the module doc)."""

    def __init__(self, module: ModuleType, path: Path):
        self.module, self.path = module, path
        self.name = str(getattr(module, "NAME", path.stem.upper()))
        self.description = str(getattr(module, "DESCRIPTION", f"custom skill from {path.name}"))
        self.max_level = getattr(module, "MAX_LEVEL", 0)
        if not re.fullmatch(SKILL_NAME_PATTERN, self.name):
            raise SkillError(f"NAME {self.name!r}: letters, digits, '_', '.', '-', a letter first, at most 32")
        if isinstance(self.max_level, bool) or not isinstance(self.max_level, int) or not 0 <= self.max_level <= 1000:
            raise SkillError(f"MAX_LEVEL must be an integer 0..1000, got {self.max_level!r}")
        if not callable(getattr(module, "generate", None)):
            raise SkillError("defines no function generate(level, rng) -> (prompt, answer)")
        for name in ("score", "space_size"):
            if hasattr(module, name) and not callable(getattr(module, name)):
                raise SkillError(f"{name} must be a function")

    def draw(self, level: int, rng: random.Random) -> SkillItem:
        try:
            out = self.module.generate(level, rng)
        except Exception as exc:
            raise SkillError(f"custom skill {self.name}: generate({level}) raised {type(exc).__name__}: {exc}") from exc
        if not (isinstance(out, tuple | list) and len(out) == 2 and all(isinstance(x, str) for x in out)):
            raise SkillError(f"custom skill {self.name}: generate({level}) must return (prompt, answer) "
                             f"strings, got {type(out).__name__} {str(out)[:80]!r}")
        return SkillItem(self.name, level, out[0], out[1])

    def space_size(self, level: int) -> int | None:
        fn = getattr(self.module, "space_size", None)
        if fn is None:
            return None
        try:
            size = fn(level)
        except Exception as exc:
            raise SkillError(f"custom skill {self.name}: space_size({level}) raised {type(exc).__name__}: {exc}") from exc
        return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None

    def score(self, completion: str, answer: str) -> float:
        """The file's ``score`` (a bool or a number in [0, 1]), else exact match after ``strip()``."""
        fn = getattr(self.module, "score", None)
        if fn is None:
            return super().score(completion, answer)
        try:
            value = fn(completion, answer)
        except Exception as exc:
            raise SkillError(f"custom skill {self.name}: score raised {type(exc).__name__}: {exc}") from exc
        if isinstance(value, bool | int | float) and 0 <= float(value) <= 1:
            return float(value)
        raise SkillError(f"custom skill {self.name}: score must return a bool or a number in [0, 1], "
                         f"got {value!r}"[:200])


def load_custom_skill(path: Path) -> CustomSkill:
    """Import ``path`` and check it by drawing one level-0 item. Raises :class:`SkillError` with the
    reason (the traceback's last lines for an import error)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"realm_skill_{path.stem}_{digest}", path)
    if spec is None or spec.loader is None:
        raise SkillError(f"{path.name} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as a normal import would (dataclasses and pickle look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, SystemExit...: the owner's file, never fatal
        sys.modules.pop(spec.name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)
        raise SkillError("".join(lines).strip()[-1500:]) from None
    skill = CustomSkill(module, path)
    skill.draw(0, random.Random(0))
    return skill
