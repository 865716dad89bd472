"""The Temple's blessing from the ledger: the evaluations (:class:`tavern.game.Evaluation`) built from the
``trials`` and ``evals`` rows, and :func:`tavern.game.blessing` over the ``steps`` rows.

A trial covers the quests that train its skill, ``skill-<SKILL>-L*`` and ``spar-<SKILL>-L*``
(:func:`core.skills.quests.skill_quest_globs`), and scores
its accuracy, against the previous trial of the same skill and level; a held-out evaluation covers its quest
and scores ``exp(-eval_loss)``, against the previous evaluation of that quest. The judged part only changes
when an evaluation is written or removed, so it is cached per ledger on
:meth:`core.ledger.Ledger.evaluation_marks`; each call then only adds the steps since (unblessed effort).
"""

from __future__ import annotations

import math
import threading
from fnmatch import fnmatchcase

from core.ledger import Ledger
from core.skills.quests import skill_quest_globs
from tavern import game

_cache: dict[tuple[str, str], tuple[tuple, game.Blessing]] = {}
_lock = threading.Lock()


def evaluations(ledger: Ledger, hero: str) -> list[game.Evaluation]:
    """Every trial of ``hero`` and every held-out evaluation as :class:`tavern.game.Evaluation`."""
    names = {q["id"]: q["name"] for q in ledger.list_quests(limit=10**9)}
    out: list[game.Evaluation] = []
    previous: dict[tuple, float] = {}
    for t in ledger.trials(hero, limit=10**9):
        globs = skill_quest_globs(t.skill)
        covers = frozenset(qid for qid, name in names.items() if any(fnmatchcase(name, g) for g in globs))
        key = ("trial", t.skill, t.level)
        out.append(game.Evaluation(t.global_step, covers, t.accuracy, previous.get(key)))
        previous[key] = t.accuracy
    for e in ledger.evals():
        if e["quest_id"] is None or e["eval_loss"] is None or not math.isfinite(e["eval_loss"]):
            continue
        score = math.exp(-max(0.0, e["eval_loss"]))
        key = ("eval", e["quest_id"])
        out.append(game.Evaluation(e["global_step"], frozenset([e["quest_id"]]), score, previous.get(key)))
        previous[key] = score
    return out


def hero_blessing(ledger: Ledger, hero: str, global_step: int) -> game.Blessing:
    """:func:`tavern.game.blessing` of ``hero`` at ``global_step`` (see the module doc for the cache)."""
    marks = ledger.evaluation_marks()
    key = (str(ledger.path), hero)
    with _lock:
        cached = _cache.get(key)
    if cached is None or cached[0] != marks:
        judged = game.blessing(ledger.step_quests(), evaluations(ledger, hero), 0)
        with _lock:
            _cache[key] = (marks, judged)
    else:
        judged = cached[1]
    effort = max(global_step, judged.effort)
    return game.Blessing(effort=effort, judged_effort=judged.judged_effort, blessed_xp=judged.blessed_xp,
                         unblessed_effort=effort - judged.judged_effort, quality=judged.quality)
