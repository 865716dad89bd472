"""Campaigns (a curriculum): stages the daemon goes through in order, each until its stop condition holds.

A stage (:class:`core.config.CampaignStage`) names **skills** (weights: while the stage lasts they replace
``skills.priorities`` for idle generation, :mod:`core.skills.loop`) and/or **quest globs** (file names,
``fnmatch`` rules), a **school** (validated against :data:`core.config.SCHOOL_NAMES` and shown; which school
trains a quest is still decided by its ``schools`` rule) and a stop condition (:class:`core.config.StageUntil`, exactly one):

- ``steps``: ``global_step - started_step >= steps`` (optimizer steps since the stage began);
- ``skill_level``: every named skill has reached its level (:meth:`core.ledger.Ledger.skill_level`);
- ``accuracy``: each of the stage's skills has a trial newer than the stage's start whose accuracy is at
  least the value;
- ``eval_loss_patience`` K: among the held-out evaluations after the stage's start, the best (lowest) loss is
  K or more evaluations old (no improvement over the last K).

A stage also ends when it has **nothing left to train**: it names no skills, and no quest matching its globs
is waiting (a file in the inbox, validating, queued or training) — so a warm-up stage without warm-up data
passes at once instead of blocking the campaign.

While a stage lasts, the daemon trains **its quests first** (those matching its globs, and the skill and
correction quests of its skills, :func:`core.skills.quests.skill_quest_globs`; generated quests are not
moved up: they stay last), then other quests, then generated ones (:meth:`core.quest_queue.QuestQueue.next_trainable` with ``first``). The daemon calls
:meth:`Campaign.check` between quests (at most once a second) and after every checkpoint (after its trials),
so a stage ends at the next quest boundary or checkpoint after its condition holds.

**State** (:class:`CampaignState`) is one ledger value (:meth:`core.ledger.Ledger.campaign_state`), written
with its event (``campaign_started``, ``campaign_stage``, ``campaign_finished``, ``campaign_changed``) in one
transaction, so a restarted daemon continues the stage it was in. The state keeps a signature of the stages
(SHA-256 of their JSON): after a config change the campaign goes on at the same stage when a stage of that
name is still there at that position, and starts over at the first stage otherwise (a ``campaign_changed``
warning).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from core.config import CampaignConfig, CampaignStage
from core.ledger import Ledger, QuestState
from core.skills.quests import skill_quest_globs

PENDING_STATES = (QuestState.VALIDATING, QuestState.QUEUED, QuestState.PROCESSING)
CHECK_INTERVAL_SECONDS = 1.0


def stages_signature(stages: list[CampaignStage]) -> str:
    """SHA-256 (hex) of the stages' JSON (sorted keys)."""
    text = json.dumps([st.model_dump() for st in stages], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CampaignState:
    """Where the campaign is: ``stage`` (index; ``len(stages)`` once finished), when it began
    (``started_step``, ``started_at`` Unix seconds, ``started_trial_id``: the newest trial then), and
    ``history``: the stages done, ``{"stage", "name", "started_step", "ended_step", "reason"}``."""

    signature: str
    stage: int
    stage_name: str | None
    started_step: int
    started_at: float
    started_trial_id: int
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Campaign:
    """The campaign of one daemon (see the module doc). ``inbox``: the realm's inbox (files waiting there
    count as a stage's quests)."""

    def __init__(self, config: CampaignConfig, ledger: Ledger, hero: str, inbox: Path | None = None):
        self.stages = config.resolved_stages()
        self.ledger, self.hero, self.inbox = ledger, hero, inbox
        self.signature = stages_signature(self.stages)
        self.state: CampaignState | None = None
        self._last_check = -math.inf

    # lifecycle ----------------------------------------------------------------------------------------
    def start(self, global_step: int) -> CampaignState:
        """Load the state from the ledger (a restart continues), or begin at the first stage."""
        stored = self.ledger.campaign_state()
        if stored is not None:
            state = CampaignState(**{k: v for k, v in stored.items() if k in CampaignState.__dataclass_fields__})
            if state.signature == self.signature:
                self.state = state
                return state
            i = state.stage
            if state.finished and i >= len(self.stages) and [h["name"] for h in state.history] == \
                    [st.name for st in self.stages]:
                state.signature = self.signature
                self._save(state, "campaign_changed", "campaign: stages changed; the campaign was finished "
                           "and stays finished", "warning")
                return state
            if i < len(self.stages) and self.stages[i].name == state.stage_name:
                state.signature = self.signature
                self._save(state, "campaign_changed", f"campaign: stages changed; continuing at stage {i + 1} "
                           f"({state.stage_name})", "warning")
                return state
            self._begin(0, global_step, [], "campaign_changed", "campaign: stages changed and stage "
                        f"{state.stage_name!r} is no longer at position {i + 1}: starting over", "warning")
            return self.state  # type: ignore[return-value]
        self._begin(0, global_step, [], "campaign_started", f"campaign started: stage 1 of {len(self.stages)} "
                    f"({self.stages[0].name})")
        return self.state  # type: ignore[return-value]

    def _save(self, state: CampaignState, kind: str, message: str, level: str = "info") -> None:
        self.state = state
        self.ledger.set_campaign_state(state.to_dict(), kind, message, level)

    def _begin(self, index: int, global_step: int, history: list[dict[str, Any]], kind: str, message: str,
               level: str = "info") -> None:
        finished = index >= len(self.stages)
        state = CampaignState(signature=self.signature, stage=index,
                              stage_name=None if finished else self.stages[index].name, started_step=global_step,
                              started_at=time.time(), started_trial_id=self.ledger.max_trial_id(),
                              finished=finished, history=history)
        self._save(state, kind, message, level)

    # the current stage --------------------------------------------------------------------------------
    @property
    def current(self) -> CampaignStage | None:
        """The stage in progress (None before :meth:`start` and once finished)."""
        if self.state is None or self.state.finished:
            return None
        return self.stages[self.state.stage]

    def skill_priorities(self) -> dict[str, float] | None:
        """The current stage's skills (its weights), None when no stage is in progress."""
        stage = self.current
        return None if stage is None else dict(stage.skills)

    def stage_globs(self, stage: CampaignStage) -> list[str]:
        """The quest-name globs of ``stage``: its ``quests`` and its skills' quests."""
        return [*stage.quests, *(g for name in stage.skills for g in skill_quest_globs(name))]

    def is_stage_quest(self, quest: dict[str, Any]) -> bool:
        """Whether a ledger quest row belongs to the current stage (trained first)."""
        stage = self.current
        name = str(quest.get("name", ""))
        return stage is not None and any(fnmatchcase(name, g) for g in self.stage_globs(stage))

    # advancing ----------------------------------------------------------------------------------------
    def reason_done(self, stage: CampaignStage, global_step: int) -> str | None:
        """Why ``stage`` (the current one) is over, or None while it goes on."""
        assert self.state is not None
        until = stage.until
        if until.steps is not None and global_step - self.state.started_step >= until.steps:
            return f"{global_step - self.state.started_step} steps (until {until.steps})"
        if until.skill_level is not None and all(self.ledger.skill_level(self.hero, s) >= lvl
                                                 for s, lvl in until.skill_level.items()):
            return "levels reached: " + ", ".join(f"{s} {lvl}" for s, lvl in until.skill_level.items())
        if until.accuracy is not None:
            newest = [self.ledger.trials(self.hero, s, limit=1) for s in stage.skills]
            if all(t and t[-1].id > self.state.started_trial_id and t[-1].accuracy >= until.accuracy for t in newest):
                return "trial accuracy reached: " + ", ".join(f"{t[-1].skill} {t[-1].accuracy:.2f}" for t in newest)
        if until.eval_loss_patience is not None:
            k = until.eval_loss_patience
            losses = [e["eval_loss"] for e in self.ledger.evals() if e["global_step"] > self.state.started_step
                      and e["eval_loss"] is not None and math.isfinite(e["eval_loss"])]
            if len(losses) > k and min(losses[:-k]) <= min(losses[-k:]):
                return f"held-out loss not improved over {k} evaluation(s) (best {min(losses):.4f})"
        if not stage.skills and not self._waiting(stage):
            return "nothing left to train (no quest matching " + ", ".join(stage.quests) + " waiting)"
        return None

    def _waiting(self, stage: CampaignStage) -> bool:
        """A quest of ``stage`` is waiting: in the inbox, validating, queued or training."""
        globs = self.stage_globs(stage)
        if any(self.ledger.count_quests_named(g, PENDING_STATES) for g in globs):
            return True
        if self.inbox is None or not self.inbox.is_dir():
            return False
        return any(fnmatchcase(p.name, g) for p in self.inbox.rglob("*") if p.is_file() for g in globs)

    def check(self, global_step: int, force: bool = False) -> bool:
        """End the current stage if it is over (and the following ones that are over at once); at most once
        per :data:`CHECK_INTERVAL_SECONDS` unless ``force``. Returns whether the stage changed."""
        if self.current is None or (not force and time.monotonic() - self._last_check < CHECK_INTERVAL_SECONDS):
            return False
        self._last_check = time.monotonic()
        changed = False
        while (stage := self.current) is not None:
            reason = self.reason_done(stage, global_step)
            if reason is None:
                break
            assert self.state is not None
            i = self.state.stage
            history = [*self.state.history, {"stage": i, "name": stage.name, "started_step": self.state.started_step,
                                             "ended_step": global_step, "reason": reason}]
            if i + 1 < len(self.stages):
                nxt = self.stages[i + 1]
                self._begin(i + 1, global_step, history, "campaign_stage", f"campaign: stage {i + 1} ({stage.name}) "
                            f"done at step {global_step}: {reason}; stage {i + 2} of {len(self.stages)} ({nxt.name}) "
                            "begins")
            else:
                self._begin(i + 1, global_step, history, "campaign_finished", f"campaign finished at step "
                            f"{global_step}: the last stage ({stage.name}) is done: {reason}")
            changed = True
        return changed


def campaign_status(config: CampaignConfig, ledger: Ledger | None) -> dict[str, Any] | None:
    """``status --json`` ``campaign``: None when no campaign is enabled; else ``{"stage"`` (1-based, None once
    finished), ``"stages"`` (count), ``"name"``, ``"school"``, ``"skills"``, ``"quests"``, ``"until"``,
    ``"started_step"``, ``"finished"``, ``"history"}`` from the ledger's state (before the daemon starts it:
    stage 1, not started)."""
    if not config.enabled:
        return None
    stages = config.resolved_stages()
    raw = ledger.campaign_state() if ledger is not None else None
    index, started, finished, history = 0, None, False, []
    if raw is not None and raw.get("signature") == stages_signature(stages):
        index, started = int(raw["stage"]), raw.get("started_step")
        finished, history = bool(raw.get("finished")), raw.get("history") or []
    stage = None if finished or index >= len(stages) else stages[index]
    return {"stage": None if stage is None else index + 1, "stages": len(stages),
            "name": stage.name if stage else None, "school": stage.school if stage else None,
            "skills": dict(stage.skills) if stage else {}, "quests": list(stage.quests) if stage else [],
            "until": stage.until.model_dump(exclude_none=True) if stage else None,
            "started_step": started, "finished": finished, "history": history,
            "preset": config.preset}
