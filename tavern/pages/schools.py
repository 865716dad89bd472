"""Schools (blueprint ``schools``): the six schools, what each has trained, and each school's own metrics.

- ``GET /schools`` — the page (``static/js/schools.js``: fills it from ``/api/schools``, draws the chart from
  ``/api/schools/metrics`` and refetches both when a quest completes).
- ``GET /api/schools`` — :func:`schools_view`.
- ``GET /api/schools/metrics?school=<title>&name=<metric>`` — ``{"school", "name", "points": [[global_step,
  value], ...]}`` (at most 4,096 points, every k-th beyond), the step metric ``name`` over the steps of that
  school's quests (e.g. ``rewards/margins`` and ``rewards/accuracies`` for the Judge, ``kl`` for the
  Whisper). 400 for an unknown school, or a metric it has not recorded.

The schools' names, icons and mottos and the XP rule are in :mod:`tavern.game`; which schools exist is read
from :data:`core.schools.SCHOOL_DATA` (a school lights up once its module is there); quests and steps from
the ledger's quests table (``quests.school``, ``quests.steps``).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, render_template, request

from core.ledger import Ledger
from core.schools import SCHOOL_DATA
from tavern import game
from tavern.context import current_ledger
from tavern.security import refuse

bp = Blueprint("schools", __name__)

MAX_POINTS = 4096


def _by_title(title: str) -> game.SchoolInfo | None:
    return next((s for s in game.SCHOOLS if s.title == title), None)


def schools_view(ledger: Ledger, school_data: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"schools": [...], "total_steps"}``. Each school: ``title``, ``icon``, ``motto``, ``what``,
    ``schools`` (the ``quests[].school`` names it trains with), ``available`` (one of them is in
    ``school_data``, default :data:`core.schools.SCHOOL_DATA`; the Mirror: sparring writes SFT quests),
    ``quests`` and ``steps`` (quests that trained steps and their optimizer steps; the Mirror's quests are
    ``spar-*``, the Scribe's the other ``sft`` ones), ``xp`` (:func:`tavern.game.school_xp`), ``metrics``
    (the step metric names its quests recorded)."""
    school_data = SCHOOL_DATA if school_data is None else school_data
    counts = ledger.school_step_counts()
    names = ledger.step_metric_names()
    own = {info.title: ledger.step_counts_of_quests_named(info.quest_glob) for info in game.SCHOOLS
           if info.quest_glob is not None}  # the Mirror's correction quests (spar-*) are its own, not the Scribe's
    out = []
    for info in game.SCHOOLS:
        got = own.get(info.title)
        if got is None:
            got = {k: sum(counts.get(s, {}).get(k, 0) for s in info.schools) for k in ("quests", "steps")}
            if "sft" in info.schools:
                got = {k: max(0, got[k] - sum(o[k] for o in own.values())) for k in got}
        metrics = sorted({m for s in info.schools for m in names.get(s, [])})
        out.append({"title": info.title, "icon": info.icon, "motto": info.motto, "what": info.what,
                    "schools": list(info.schools),
                    "available": any(s in school_data for s in info.schools),
                    "quests": got["quests"], "steps": got["steps"], "xp": game.school_xp(got["steps"]),
                    "metrics": metrics})
    return {"schools": out, "total_steps": sum(s["steps"] for s in out)}


@bp.get("/schools")
def index():
    return render_template("schools.html")


@bp.get("/api/schools")
def api_schools():
    return jsonify(schools_view(current_ledger()))


@bp.get("/api/schools/metrics")
def api_metrics():
    info = _by_title(request.args.get("school", ""))
    if info is None:
        return refuse(400, "school must be one of " + ", ".join(s.title for s in game.SCHOOLS))
    name = request.args.get("name", "")
    ledger = current_ledger()
    known = {m for s in info.schools for m in ledger.step_metric_names().get(s, [])}
    if name not in known:
        return refuse(400, f"the {info.title} has recorded no step metric {name[:80]!r}"
                      + (f"; it has {', '.join(sorted(known))}" if known else ""))
    points = ledger.step_metric_series(name, info.schools, MAX_POINTS)
    return jsonify(school=info.title, name=name, points=[[s, v] for s, v in points])
