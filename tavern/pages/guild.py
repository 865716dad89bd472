"""The Guild (blueprint ``guild``): the hero's skills, their levels and promotion trials.

- ``GET /guild`` — the page (``static/js/guild.js``: fills it from ``/api/guild`` and refetches it when a
  ``trial``, ``promotion`` or ``quest_generated`` event or a checkpoint is pushed over Socket.IO).
- ``GET /api/guild`` — :func:`guild_view`.

Every number comes from the ledger through its typed methods (``skill_summary``, ``trials``,
``steps_of_quests_named``, ``events_of_kind``); levels and Total Level by :mod:`tavern.game`.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, render_template

from core.campaigns import campaign_status
from core.config import RealmConfig
from core.ledger import Ledger
from core.skills.loop import steps_trained_on
from core.skills.registry import BUILTIN_SKILLS
from tavern import game
from tavern.context import current_config, current_ledger

bp = Blueprint("guild", __name__)

TRIALS_PER_SKILL = 200
"""Trials per skill in the accuracy chart (the newest)."""
LOG_EVENTS = 50
LOG_KINDS = ("trial", "promotion", "quest_generated", "trial_failed", "quest_generation_failed", "spar",
             "spar_failed", "campaign_started", "campaign_stage", "campaign_finished", "campaign_changed")
BUILTIN_MAX_LEVEL = {cls.name: cls.max_level for cls in BUILTIN_SKILLS}


def _trial_point(t) -> dict[str, Any]:
    return {"id": t.id, "time": t.time, "global_step": t.global_step, "level": t.level,
            "level_after": t.level_after, "n": t.n, "correct": t.correct, "accuracy": t.accuracy,
            "lower_bound": t.lower_bound, "threshold": t.threshold, "promoted": t.promoted,
            "checkpoint": t.checkpoint}


def guild_view(ledger: Ledger, config: RealmConfig, hero: str | None = None) -> dict[str, Any]:
    """``{"hero", "total_level", "trial_every_steps", "skills": [...], "log": [...], "campaign"}``
    (``campaign``: :func:`core.campaigns.campaign_status`, None without a campaign).

    Each skill (those of ``skills.priorities``, then any other with a trial): ``name``, ``priority``,
    ``level`` (``level_after`` of its newest trial, 0 before any), ``max_level`` (built-in skills; None for
    others), ``mastered``, ``trials`` (count), ``history`` (its newest :data:`TRIALS_PER_SKILL` trials, oldest
    first: ``global_step``, ``level``, ``n``, ``correct``, ``accuracy``, ``lower_bound``, ``threshold``,
    ``promoted``...), ``last_trial`` (the same plus ``samples``: ``{prompt, expected, answer, correct}``),
    ``steps_since_trial`` (optimizer steps of quests named ``skill-<SKILL>-L*`` or ``spar-<SKILL>-L*``
    after its newest trial) and
    ``steps_until_trial`` (``max(0, skills.trial_every_steps - steps_since_trial)``; None when the loop does
    not try it: ``trial_every_steps`` 0, or mastered). ``log``: the newest trial, promotion, generation and sparring
    events, newest first.
    """
    hero = hero or config.hero.name
    every = config.skills.trial_every_steps
    summary = ledger.skill_summary(hero)
    names = list(config.skills.priorities) + [n for n in summary if n not in config.skills.priorities]
    skills = []
    for name in names:
        info = summary.get(name, {})
        level = info.get("level", 0)
        max_level = BUILTIN_MAX_LEVEL.get(name)
        mastered = max_level is not None and level > max_level
        last = info.get("last_trial")
        since = steps_trained_on(ledger, name, last.global_step if last else -1)
        skills.append({
            "name": name, "priority": config.skills.priorities.get(name, 0.0), "level": level,
            "max_level": max_level, "mastered": mastered, "trials": info.get("trials", 0),
            "history": [_trial_point(t) for t in ledger.trials(hero, name, limit=TRIALS_PER_SKILL)],
            "last_trial": None if last is None else {**_trial_point(last), "samples": last.samples},
            "steps_since_trial": since,
            "steps_until_trial": None if every <= 0 or mastered else max(0, every - since),
        })
    log = sorted((row for kind in LOG_KINDS for row in ledger.events_of_kind(kind, LOG_EVENTS)),
                 key=lambda r: r["id"], reverse=True)[:LOG_EVENTS]
    return {"hero": hero, "total_level": game.total_level({s["name"]: s["level"] for s in skills}),
            "trial_every_steps": every, "promotion_threshold": config.skills.promotion_threshold,
            "skills": skills, "log": log, "campaign": campaign_status(config.campaign, ledger)}


@bp.get("/guild")
def index():
    return render_template("guild.html")


@bp.get("/api/guild")
def api_guild():
    ledger = current_ledger()
    hero = ledger.daemon_status().get("hero")
    name = (hero if isinstance(hero, dict) else {}).get("name")
    return jsonify(guild_view(ledger, current_config(), name))

