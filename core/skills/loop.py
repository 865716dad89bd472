"""The hero loop: idle generation of skill quests, and promotion trials on the daemon's schedule.

The daemon (:mod:`core.daemon`) owns one :class:`HeroLoop` and calls it at three points only:

- :meth:`HeroLoop.start` after the engine loaded its weights: builds the skill registry (errors reported,
  never fatal) and forgets trials of weights newer than the ones loaded (a corrupt latest checkpoint fell
  back to an older one: no level rests on weights that no longer exist);
- :meth:`HeroLoop.when_idle` when nothing trainable is queued and validation is idle (never with
  ``daemon --until-idle``): writes one generated quest into the inbox (below);
- :meth:`HeroLoop.after_checkpoint` right after each checkpoint is saved (every ``training.save_steps``,
  ``save_interval_minutes`` and at each quest end — between optimizer steps, never inside one): runs the
  trials that are due.

**Idle generation.** With ``idle_generation.enabled``, fewer than ``idle_generation.max_pending_quests``
generated quests waiting (files in the inbox, quests validating, queued or training), the newest generated
quest not failed (a skill whose items fail validation would otherwise fill ``queue/failed/``: a
``quest_generation_paused`` warning instead) and a skill of ``skills.priorities`` not yet mastered, the loop
writes ``idle_generation.examples_per_quest`` items of one
skill as a quest ``inbox/<idle_generation.priority>/skill-<SKILL>-L<level>-idle<n>.jsonl`` (in the records of
the campaign stage's school, which trains it: :mod:`core.campaigns`)
(:func:`core.skills.quests.write_quest`: atomic, so the watcher sees all of it or nothing); from there it is
validated, queued, trained and traced like any dropped quest. The skill is picked by weight, deterministically:
the one with the fewest generated quests per unit of weight (``(count + 1) / weight``, ties by name), so
``{"BIN": 2, "LETTERS": 1}`` writes BIN, LETTERS, BIN, BIN, LETTERS, BIN... Items: a share
``idle_generation.review_share`` drawn evenly from levels ``0..L-1`` (against forgetting; none at level 0),
the rest at the hero's current level ``L`` (:func:`core.skills.quests.training_items`), shuffled together,
seeded by the quest counter ``n`` (kept in the ledger), so every generated quest differs and each one is
reproducible. Generated quests are *last in line*: the daemon trains every other queued quest first
(:meth:`core.quest_queue.QuestQueue.next_trainable` with :func:`is_generated`), so a user quest dropped while
a generated one trains starts at its end, the next quest boundary.

**Trial schedule.** A skill's *steps since its last trial* are the optimizer steps of quests named
``skill-<SKILL>-L*`` (generated quests and ``skills quest`` files) or ``spar-<SKILL>-L*`` (sparring's
correction quests, :mod:`core.skills.sparring`) after the global step of its newest trial
(:func:`steps_trained_on`). When they reach ``skills.trial_every_steps`` (:func:`core.skills.trials.trial_due`)
the next checkpoint runs a promotion trial (:func:`core.skills.trials.run_trial`) on the live weights, which
are exactly the checkpoint just saved (its name is stored with the trial, so ``python -m training trial
SKILL --checkpoint step-…`` repeats it). A trial only reads the model (eval mode, the torch RNG forked and
restored, training mode put back), so the optimizer, the cursor and every RNG the training uses are untouched:
a run that trials resumes and continues exactly as one that does not. A trial that raises (a custom skill's
scorer) is a ``trial_failed`` warning event; the daemon goes on.

**Sparring after a failed trial.** With ``sparring.after_failed_trial`` (off by default), a trial that did
not promote is followed, on the same weights, by a sparring round of the same skill and level
(:meth:`HeroLoop.spar`): fresh training-split items, each wrong answer a correction example in a quest
queued at ``sparring.priority`` (high by default), trained before the generated quests.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.campaigns import record_stage_school
from core.config import RealmConfig
from core.ledger import Ledger, QuestState
from core.realm import PRIORITIES, Realm
from core.skills.base import Skill, derive_seed
from core.skills.quests import (
    mixed_items,
    prompt_record,
    quest_file_name,
    quest_record,
    skill_quest_globs,
    training_items,
    write_quest,
)
from core.skills.registry import SkillLoadError, SkillRegistry, build_registry, report_errors

GENERATED_GLOB = "skill-*-L*-idle*.jsonl"
"""Names of generated quests (SQLite ``GLOB`` / :meth:`pathlib.Path.glob`)."""
COUNTER_KEY = "skills/idle_generated"
"""Ledger key: ``{"total": n, "<SKILL>": quests written}``."""
PENDING_STATES = (QuestState.VALIDATING, QuestState.QUEUED, QuestState.PROCESSING)
IDLE_CHECK_INTERVAL_SECONDS = 1.0


def skill_quest_glob(skill: str) -> str:
    """The names of the skill quests of ``skill``: ``skill-<SKILL>-L*``
    (:func:`core.skills.quests.quest_file_name`)."""
    return f"skill-{skill}-L*"


def steps_trained_on(ledger: Ledger, skill: str, after_step: int) -> int:
    """Optimizer steps after ``after_step`` of the quests that train ``skill``
    (:func:`core.skills.quests.skill_quest_globs`: skill quests and sparring corrections)."""
    return sum(ledger.steps_of_quests_named(glob, after_step) for glob in skill_quest_globs(skill))


def is_generated(quest: dict[str, Any]) -> bool:
    """Whether a ledger quest row was written by idle generation (its name matches :data:`GENERATED_GLOB`)."""
    return Path(str(quest.get("name", ""))).match(GENERATED_GLOB)


def generated_items(skill: Skill, level: int, n: int, review_share: float, key: object) -> list:
    """``n`` training items of ``skill``: ``round(n * review_share)`` spread evenly over levels
    ``0..level-1`` (none when ``level`` is 0), the rest at ``level``, shuffled with
    ``random.Random(derive_seed("shuffle", skill, "idle", key))``."""
    n_review = round(n * review_share) if level > 0 else 0
    items = training_items(skill, level, n - n_review, key)
    if n_review:
        items += mixed_items(skill, list(range(level)), n_review, key)
    random.Random(derive_seed("shuffle", skill.name, "idle", key)).shuffle(items)
    return items


def pick_skill(weights: dict[str, float], counts: dict[str, int]) -> str | None:
    """The skill of ``weights`` (all > 0) with the smallest ``(counts[skill] + 1) / weight``; ties by name.
    None when ``weights`` is empty."""
    if not weights:
        return None
    return min(sorted(weights), key=lambda s: (counts.get(s, 0) + 1) / weights[s])


class HeroLoop:
    """Idle generation and the trial schedule of one daemon (see the module doc)."""

    def __init__(self, realm: Realm, config: RealmConfig, ledger: Ledger, logger: logging.Logger | None = None,
                 idle_check_interval_seconds: float = IDLE_CHECK_INTERVAL_SECONDS):
        """``idle_check_interval_seconds``: :meth:`when_idle` looks at most this often (an idle daemon asks
        every 0.1 s)."""
        self.realm, self.config, self.ledger = realm, config, ledger
        self.idle_check_interval_seconds = idle_check_interval_seconds
        self._last_idle_check = -math.inf
        self.log = logger or logging.getLogger("realm.skills")
        self.hero = config.hero.name
        self.registry: SkillRegistry = SkillRegistry()
        self.campaign: Any = None
        """A :class:`core.campaigns.Campaign` whose current stage's skills replace ``skills.priorities``."""
        self._warned_failed: int | None = None

    def start(self, global_step: int) -> None:
        """Build the registry (load errors reported in the ledger) and forget trials after ``global_step``."""
        self.registry = build_registry(self.realm.root, self.config.skills)
        if self.campaign is not None:  # a stage that names a skill nobody has would never end
            for i, stage in enumerate(self.campaign.stages):
                for name in {*stage.skills, *(stage.until.skill_level or {})} - set(self.registry.skills):
                    self.registry.errors.append(SkillLoadError(f"campaign stage {i + 1} ({stage.name})",
                                                               f"no skill named {name!r}"))
        report_errors(self.ledger, self.registry)
        removed = self.ledger.forget_trials_after(global_step)
        if removed:
            self.ledger.event("trials_forgotten", f"{removed} trial(s) of weights after global step {global_step} "
                              "were lost with their checkpoint and are forgotten", level="warning",
                              global_step=global_step)

    # idle generation ------------------------------------------------------------------------------------
    def pending_generated(self) -> int:
        """Generated quests waiting: files in the inbox plus quests validating, queued or training."""
        inbox = self.realm.inbox
        files = sum(1 for folder in (inbox, *(inbox / p for p in PRIORITIES)) if folder.is_dir()
                    for _ in folder.glob(GENERATED_GLOB))
        return files + self.ledger.count_quests_named(GENERATED_GLOB, PENDING_STATES)

    def _last_failed(self) -> bool:
        """True while the newest generated quest failed (validation or training): generating more would
        only fill ``queue/failed/``. One ``quest_generation_paused`` warning per failed quest; generation
        resumes once that quest is retried or removed (or a newer one exists)."""
        newest = self.ledger.newest_quest_named(GENERATED_GLOB)
        if newest is None or newest["state"] != QuestState.FAILED.value:
            return False
        if self._warned_failed != newest["id"]:
            self._warned_failed = newest["id"]
            self.ledger.event("quest_generation_paused", f"idle generation paused: the generated quest "
                              f"{newest['name']} failed ({newest.get('error') or 'see its report'}); retry or "
                              "remove it to resume", level="warning", quest_id=newest["id"])
        return True

    def priorities(self) -> dict[str, float]:
        """The skills practised and their weights: the campaign stage's skills while a campaign stage is in
        progress (those the registry has), else ``skills.priorities`` (the registry's)."""
        stage = self.campaign.skill_priorities() if self.campaign is not None else None
        if stage is None:
            return dict(self.registry.priorities)
        return {name: w for name, w in stage.items() if name in self.registry.skills}

    def stage_school(self) -> str | None:
        """The school of the campaign stage in progress (it trains the quests generated now), else None."""
        stage = self.campaign.current if self.campaign is not None else None
        return None if stage is None else stage.school

    def levels(self) -> dict[str, int]:
        """The hero's level of each skill practised (:meth:`priorities`; 0 before any trial)."""
        return {name: self.ledger.skill_level(self.hero, name) for name in self.priorities()}

    def when_idle(self) -> Path | None:
        """Write one generated quest when enabled, under the pending cap, and a skill is left to practise.
        Returns its path (None: nothing written). ``OSError`` while writing is logged, never raised."""
        idle = self.config.idle_generation
        if not idle.enabled or time.monotonic() - self._last_idle_check < self.idle_check_interval_seconds:
            return None
        self._last_idle_check = time.monotonic()
        if self.pending_generated() >= idle.max_pending_quests or self._last_failed():
            return None
        levels = self.levels()
        weights = {name: w for name, w in self.priorities().items()
                   if levels[name] <= self.registry.skills[name].max_level}
        counts: dict[str, int] = self.ledger.get_value(COUNTER_KEY, {}) or {}
        name = pick_skill(weights, counts)
        if name is None:
            return None
        skill, level = self.registry.skills[name], levels[name]
        number = int(counts.get("total", 0)) + 1
        key = f"idle{number:06d}"
        path = self.realm.inbox / idle.priority / quest_file_name(name, level, key)
        school = self.stage_school()
        record = prompt_record if school == "grpo" else quest_record
        try:
            items = generated_items(skill, level, idle.examples_per_quest, idle.review_share, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            if school is not None:  # before the file appears: validation reads it (core.campaigns)
                record_stage_school(self.ledger, path.name, school)
            write_quest(path, (record(it) for it in items))
        except Exception as exc:  # a custom skill that raises, a full disk: reported, the daemon lives
            self.log.error("idle generation of %s level %d failed: %s", name, level, exc)
            self.ledger.event("quest_generation_failed", f"idle generation of {name} level {level} failed: "
                              f"{type(exc).__name__}: {exc}", level="error", skill=name)
            return None
        self.ledger.set_value(COUNTER_KEY, {**counts, "total": number, name: int(counts.get(name, 0)) + 1})
        self.ledger.event("quest_generated", f"idle: generated {len(items)} {name} items at level {level} "
                          f"({round(100 * idle.review_share) if level else 0}% from lower levels) -> {path.name}",
                          skill=name, level=level, examples=len(items), name=path.name)
        return path

    # trials ---------------------------------------------------------------------------------------------
    def steps_since_trial(self, skill: str) -> int:
        """Optimizer steps trained on ``skill`` since its newest trial (all of them before the first)."""
        last = self.ledger.last_trial(self.hero, skill)
        return steps_trained_on(self.ledger, skill, last.global_step if last else -1)

    def due(self) -> list[str]:
        """Skills whose trial is due (:func:`core.skills.trials.trial_due`)."""
        from core.skills.trials import trial_due

        every = self.config.skills.trial_every_steps
        if every <= 0:
            return []
        return [name for name, skill in self.registry.skills.items()
                if trial_due(self.steps_since_trial(name), every, self.ledger.skill_level(self.hero, name),
                             skill.max_level)]

    def after_checkpoint(self, model, tokenizer, global_step: int, checkpoint: Path,
                         on_progress: Callable[[], None] | None = None) -> list[int]:
        """Run the due trials on ``model`` (the weights of ``checkpoint``, global step ``global_step``);
        ``on_progress()`` is called after each generation batch (the daemon's heartbeat). Returns the ids of
        the trials recorded."""
        names = self.due()
        if not names:
            return []
        from core.skills.trials import run_trial, trial_seed

        s = self.config.skills
        ids = []
        for name in names:
            skill, level = self.registry.skills[name], self.ledger.skill_level(self.hero, name)
            seed = trial_seed(self.hero, name, level, global_step,
                              self.ledger.count_trials(self.hero, name, level, global_step))
            try:
                result = run_trial(model, tokenizer, skill, level, n=s.trial_samples, seed=seed,
                                   max_new_tokens=s.max_new_tokens, batch_size=s.trial_batch_size,
                                   on_batch=on_progress)
            except Exception as exc:  # a custom scorer that raises: reported, training goes on
                self.log.error("trial of %s level %d failed: %s", name, level, exc)
                self.ledger.event("trial_failed", f"trial of {name} level {level} at step {global_step} failed: "
                                  f"{type(exc).__name__}: {exc}", level="warning", skill=name,
                                  global_step=global_step)
                continue
            record = result.record(hero=self.hero, current_level=level, threshold=s.promotion_threshold,
                                   global_step=global_step, checkpoint=Path(checkpoint).name,
                                   sample_answers=s.sample_answers)
            ids.append(self.ledger.record_trial(record))
            self.log.info("trial %s level %d at step %d: %d/%d right, lower bound %.3f%s", name, level,
                          global_step, result.correct, result.n, result.lower_bound,
                          " -> promoted" if record.promoted else "")
            if not record.promoted and self.config.sparring.after_failed_trial:
                self.spar(model, tokenizer, name, level, global_step, checkpoint, on_progress)
        return ids

    def spar(self, model, tokenizer, name: str, level: int, global_step: int, checkpoint: Path,
             on_progress: Callable[[], None] | None = None) -> Path | None:
        """A sparring round (:func:`core.skills.sparring.spar_round`) of skill ``name`` at ``level`` on
        ``model``, its correction quest written into the inbox. Returns the quest's path (None: every answer
        right, or the round failed: a ``spar_failed`` warning event, training goes on)."""
        from core.skills.sparring import spar_round

        try:
            record, _, path = spar_round(self.ledger, model, tokenizer, self.registry.skills[name], hero=self.hero,
                                         level=level, global_step=global_step, checkpoint=Path(checkpoint).name,
                                         inbox=self.realm.inbox, sparring=self.config.sparring,
                                         skills=self.config.skills, on_batch=on_progress)
        except Exception as exc:  # a custom scorer that raises, a full disk: reported, training goes on
            self.log.error("sparring on %s level %d failed: %s", name, level, exc)
            self.ledger.event("spar_failed", f"sparring on {name} level {level} at step {global_step} failed: "
                              f"{type(exc).__name__}: {exc}", level="warning", skill=name, global_step=global_step)
            return None
        self.log.info("sparring %s level %d at step %d: %d/%d wrong%s", name, level, global_step, record.wrong,
                      record.n, f" -> {path.name}" if path else "")
        return path
