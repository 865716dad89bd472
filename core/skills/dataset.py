"""Dataset skills: any prompt/completion file, checked by a verifier from the reward library.

Configured under ``skills.datasets`` (:class:`core.config.DatasetSkillConfig`), e.g. GSM8K::

    "skills": {"datasets": {"GSM8K": {"path": "../shared/data/gsm8k_train.jsonl",
                                      "field_map": {"question": "prompt", "answer": "completion"},
                                      "verifier": "numeric_answer"}}}

The file (read in place: JSON Lines, a JSON array, CSV/TSV with a header row or Parquet, as quests are read by
:mod:`core.containers`, gzip'd too except Parquet) is read once when the skill is built. After
``field_map`` each record needs ``prompt`` and ``completion`` strings (and, with ``level_key``, a
non-negative integer level; a CSV cell of digits counts); other records are skipped and counted (:attr:`DatasetSkill.skipped`, shown
as a load problem). An item's answer is the record's completion; the hero's answer is right when the
verifier scores it 1.0 against it (``numeric_answer``: the same final number; ``exact_match``: the same
normalised text).

**Held out, deterministically:** a record is trial-only when the SHA-256 of ``"<skill>\\0<prompt>"`` is 0
modulo ``holdout_every`` (:func:`core.skills.base.prompt_held_out`): independent of file order, the same
on every machine. Training items come from the other records only; trials from these only. (A copy of
the file dropped into the inbox as an ordinary quest trains on every record: the skill cannot prevent
that.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from core.config import DatasetSkillConfig
from core.containers import CSV, JSON, JSONL, PARQUET, TSV, Unsupported, detect, iter_items
from core.formats import CorruptFileError, apply_field_map
from core.rewards.combine import BUILTIN_REWARDS
from core.rewards.numeric import final_number
from core.rewards.text import normalize_text
from core.skills.base import TRAIN, TRIAL, Skill, SkillError, SkillItem, prompt_held_out

MAX_LINE_BYTES = 8 * 1024 * 1024
RECORD_CONTAINERS = (JSONL, JSON, CSV, TSV, PARQUET)


class DatasetSkill(Skill):
    """A skill over the records of a file (see the module doc). Raises :class:`SkillError` when the file
    cannot be read or holds no usable record."""

    def __init__(self, name: str, config: DatasetSkillConfig, realm_root: Path | str):
        self.name, self.config = name, config
        path = Path(config.path).expanduser()
        self.path = path if path.is_absolute() else (Path(realm_root) / path).resolve()
        self.description = f"dataset {self.path.name}, verified by {config.verifier}"
        self.skipped: list[str] = []  # "line N: reason", at most 20 kept
        self.skipped_count = 0
        self._items: dict[int, dict[str, list[SkillItem]]] = {}
        self._load()
        self.max_level = max(self._items)

    def _skip(self, number: int, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < 20:
            self.skipped.append(f"line {number}: {reason}")

    def _load(self) -> None:
        c = self.config
        try:
            container = detect(self.path, self.path.name)
            if container not in RECORD_CONTAINERS:
                raise SkillError(f"dataset skill {self.name}: {self.path.name} is {container} text; a dataset skill "
                                 "needs prompt/completion records (.jsonl, .json, .csv, .tsv or .parquet)")
            for number, record, error, _size in iter_items(self.path, container, max_line_bytes=MAX_LINE_BYTES):
                if error is not None:
                    self._skip(number, error)
                    continue
                item = self._parse(number, record)
                if item is not None:
                    split = TRIAL if prompt_held_out(self.name, item.prompt, c.holdout_every) else TRAIN
                    self._items.setdefault(item.level, {TRAIN: [], TRIAL: []})[split].append(item)
        except (OSError, CorruptFileError, Unsupported) as exc:
            raise SkillError(f"dataset skill {self.name}: cannot read {self.path}: {exc}") from None
        if not self._items:
            raise SkillError(f"dataset skill {self.name}: no usable record in {self.path} "
                             f"({self.skipped_count} skipped; first: {'; '.join(self.skipped[:3]) or '-'})")

    def _parse(self, number: int, record: str | dict) -> SkillItem | None:
        """A record (a JSON line's text, or a JSON/CSV/Parquet record) as a :class:`SkillItem`; None, counted
        as skipped with the reason, when it is not one."""
        c = self.config
        try:
            record = json.loads(record) if isinstance(record, str) else dict(record)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            record = apply_field_map(record, c.field_map)
        except ValueError as exc:
            self._skip(number, str(exc)[:200])
            return None
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt or not completion:
            self._skip(number, "needs prompt and completion strings (after field_map)")
            return None
        level = 0
        if c.level_key is not None:
            level = record.get(c.level_key)
            if isinstance(level, str) and level.strip().isdigit():  # a CSV/TSV cell
                level = int(level)
            if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 1000:
                self._skip(number, f"{c.level_key} must be an integer 0..1000, got {level!r}")
                return None
        if c.verifier == "numeric_answer" and final_number(completion) is None:
            self._skip(number, "the completion has no number for numeric_answer")
            return None
        return SkillItem(self.name, level, prompt, completion)

    def levels(self) -> dict[int, dict[str, int]]:
        """Items per level and split: ``{level: {"train": n, "trial": m}}``."""
        return {lv: {s: len(v) for s, v in splits.items()} for lv, splits in sorted(self._items.items())}

    def draw(self, level: int, rng: random.Random) -> SkillItem:
        pool = self._items.get(level) or {TRAIN: [], TRIAL: []}
        items = pool[TRAIN] + pool[TRIAL]
        if not items:
            raise SkillError(f"dataset skill {self.name} has no record of level {level}")
        return rng.choice(items)

    def sample(self, level: int, rng: random.Random, split: str = TRAIN) -> SkillItem:
        """A record of ``level`` from the training or the held-out records (uniform, with replacement)."""
        self.check_level(level)
        if split not in (TRAIN, TRIAL):
            raise ValueError(f"split must be train or trial, got {split!r}")
        items = (self._items.get(level) or {}).get(split) or []
        if not items:
            raise SkillError(f"dataset skill {self.name} has no {split} record of level {level}")
        return rng.choice(items)

    def space_size(self, level: int) -> int:
        return sum(len(v) for v in (self._items.get(level) or {}).values())

    def holdout_every(self, level: int) -> int:
        return self.config.holdout_every

    def normalize(self, text: str) -> str:
        """:func:`core.rewards.text.normalize_text` (whitespace collapsed); :meth:`score` uses the verifier."""
        return normalize_text(text)

    def score(self, completion: str, answer: str) -> float:
        """The verifier's value (1.0 right, 0.0 wrong) of ``completion`` against the reference ``answer``:
        the reward ``skills.datasets.<name>.verifier`` of :data:`core.rewards.combine.BUILTIN_REWARDS`."""
        return float(BUILTIN_REWARDS[self.config.verifier]("", completion, answer=answer))
