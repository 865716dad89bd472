"""The game: the one module where RPG words meet training metrics.

Every number the Tavern shows as a game stat is computed here, from ledger metrics, by a documented
formula. Nothing here is random or stored: reload the page and the same metrics give the same hero.

============  ===========================================================================================
stat          formula (inputs are the ledger's metrics)
============  ===========================================================================================
XP            ``global_step`` (1 XP per optimizer step; the global step never resets, so neither does XP)
level L       the largest L with ``XP >= 25 * L * (L - 1)`` (a quadratic curve: level 2 at 50 XP, level 10
              at 2,250, level 20 at 9,500, level 50 at 61,250; the D&D 3.5 XP table ``1000 * L(L-1)/2``
              scaled by 1/40 so that levels come every few minutes early and every few hours later)
XP bar        ``(XP - xp_for_level(L)) / (xp_for_level(L + 1) - xp_for_level(L))`` in [0, 1]
ATK           ``round(100 * exp(-loss))`` with ``loss`` the mean training loss of the last 20 steps.
              ``exp(-loss)`` is the geometric-mean probability the model gives the correct next token
              (``1 / perplexity``), so ATK is "percent of a perfect guess": 0 for a hopeless model, 100 for
              a perfect one; loss 2.0 → 14, loss 0.5 → 61
DEF           ``round(100 * exp(-eval_loss))`` with the latest validation loss (held-out examples, never
              trained on): how well the skill holds up on unseen data. DEF far below ATK = overfitting
title         by level: 1 Newborn, 5 Apprentice, 10 Squire, 20 Knight, 35 Champion, 50 Hero of the Realm,
              75 Legend
strain        ``grad_norm / training.max_grad_norm`` (pre-clipping global L2 norm of the gradient over the
              clipping threshold) of the latest step; zones: calm < 0.5 <= focused < 1 <= strained < 4 <=
              overwhelmed, and overwhelmed whenever loss or grad_norm is not finite. Above 1 the optimizer
              clips every step (the update is scaled down); a lasting overwhelmed zone means a too-high
              learning_rate or bad data
skill level   per skill, ``level_after`` of its newest promotion trial (0 before any): the levels it passed
              with the Wilson 95 % lower bound of its trial accuracy >= ``skills.promotion_threshold``
Total Level   the sum of the skill levels (skills with a trial; the others are at 0). Shown beside the step
              level: the step level counts effort, the Total Level counts what trials proved
blessing      the Temple's blessing: effort (optimizer steps) becomes experience only when an evaluation
              confirms it. A step is judged by the first evaluation at or after it *of what it trained*
              (coverage): a promotion trial of its quest's skill (quests named ``skill-<SKILL>-L*`` or
              ``spar-<SKILL>-L*``) or the held-out loss of its quest. That evaluation's quality is
              ``q = (score + trend) / 2`` in [0, 1], with score the trial's accuracy or
              ``exp(-eval_loss)``, and ``trend = clamp(0.5 + 5 * (score - previous score), 0, 1)`` against
              the previous evaluation of the same kind (same skill and level / same quest; none: 0.5), so
              +10 points of accuracy give trend 1 and -10 points give 0. Several evaluations of one step
              at the same global step: the best q. Blessed XP = sum over judged steps of q (effort x
              quality); unblessed effort = steps no evaluation has judged yet (shown on the hero card)
school XP     per school (:data:`SCHOOLS`), the optimizer steps of its quests x 1: every optimizer step is 1
              XP whatever the school (a Scribe step of packed rows, a Judge step of ``micro_batch_size x
              gradient_accumulation_steps`` pairs or ratings): XP counts effort, not examples. A school's
              steps are blessed like any others: a Judge or Fortune Teller quest's held-out evaluation is its
              school's own loss (``eval_loss`` = the DPO / KTO / weighted loss, score ``exp(-eval_loss)``), a
              Mirror quest's (``spar-<SKILL>-L*``) a promotion trial of its skill
============  ===========================================================================================

:func:`formula_table_markdown` renders this table for the README; :data:`GLOSSARY` maps each RPG word to
the field's term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

XP_PER_STEP = 1


@dataclass(frozen=True)
class SchoolInfo:
    """One school of the Tavern's Schools section: its RPG ``title``, ``icon`` and ``motto``; ``schools``:
    the ``quests[].school`` names it trains with (:mod:`core.schools`); ``quest_glob``: its quests are the
    ones so named (the Mirror's correction quests; they are Scribe steps otherwise); ``what``: the field's
    terms."""

    title: str
    icon: str
    motto: str
    schools: tuple[str, ...]
    what: str
    quest_glob: str | None = None


SCHOOLS: tuple[SchoolInfo, ...] = (
    SchoolInfo("Scribe", "✎", "Every word, copied true.", ("sft",),
               "supervised fine-tuning: next-token cross-entropy on the answers"),
    SchoolInfo("Mirror", "◑", "Look at your mistakes, and mend them.", ("sft",),
               "sparring: the hero's wrong answers become correction quests (SFT)", "spar-*"),
    SchoolInfo("Judge", "⚖", "Of two answers, know the better.", ("dpo", "ipo", "orpo", "kto"),
               "preference optimisation: DPO / IPO / ORPO on pairs, KTO on ratings"),
    SchoolInfo("Champion", "♛", "Try many roads; keep the one that wins.", ("grpo",),
               "GRPO: sampled answers scored by rewards, group-relative advantages"),
    SchoolInfo("Whisper", "☁", "A master's voice, softly learned.", ("distill",),
               "distillation: match a teacher's token distribution (KL)"),
    SchoolInfo("Fortune Teller", "☾", "Study hardest what surprises you.", ("fortune_teller",),
               "surprise-weighted SFT"),
)
"""The six schools, in the order the Tavern shows them."""


def school_xp(steps: int) -> int:
    """A school's XP: the optimizer steps of its quests x :data:`XP_PER_STEP` (the same for every school)."""
    return XP_PER_STEP * int(steps)
LEVEL_XP_FACTOR = 25  # XP to reach level L = LEVEL_XP_FACTOR * L * (L - 1)
ATK_LOSS_WINDOW_STEPS = 20  # ATK uses the mean training loss of this many latest steps
STAT_SCALE = 100  # ATK/DEF = STAT_SCALE * exp(-loss)

TITLES: tuple[tuple[int, str], ...] = (
    (1, "Newborn"), (5, "Apprentice"), (10, "Squire"), (20, "Knight"), (35, "Champion"),
    (50, "Hero of the Realm"), (75, "Legend"),
)
STRAIN_ZONES: tuple[tuple[float, str], ...] = (  # (upper bound of strain, zone), checked in order
    (0.5, "calm"), (1.0, "focused"), (4.0, "strained"), (math.inf, "overwhelmed"),
)

GLOSSARY: dict[str, str] = {
    "realm": "the working folder: config.json, inbox/, queue/, models/, logs, ledger.sqlite",
    "hero": "the model being fine-tuned (config hero.name; weights under models/<hero>/)",
    "newborn hero": "a randomly initialised default model (no base_model configured)",
    "quest": "one training data file (.jsonl, .json, .csv, .parquet, .txt...) dropped into inbox/; a row of the ledger's quests table",
    "XP": "global_step: optimizer steps since the model was created, never reset",
    "level": "a function of global_step (quadratic curve, see the formula table)",
    "ATK": "100 * exp(-training loss), loss averaged over the last 20 steps",
    "DEF": "100 * exp(-validation loss), the latest eval_loss on held-out examples",
    "title": "a name for a level range",
    "strain": "grad_norm / training.max_grad_norm of the latest step (gradient clipping ratio)",
    "battle": "the running training loop, shown on the Home page",
    "battle log": "the ledger's events table",
    "vault": "the checkpoints folder models/<hero>/checkpoints/",
    "oracle": "inference: a chat with a checkpoint or the live model",
    "tavern": "this web dashboard",
    "guild": "the Tavern page of the hero's skills: levels, promotion trials, accuracy over trials",
    "skill level": "levels of a skill passed in promotion trials (the ledger's trials table)",
    "trial": "a promotion trial: skills.trial_samples fresh items answered greedily, scored exactly",
    "promotion": "a trial whose Wilson 95% lower bound of accuracy reached skills.promotion_threshold",
    "Total Level": "the sum of the skill levels",
    "blessing": "effort (optimizer steps) confirmed by a later evaluation of what they trained",
    "blessed XP": "sum over judged steps of the judging evaluation's quality in [0, 1] (effort x quality)",
    "unblessed effort": "optimizer steps no evaluation has judged yet",
    "school": "a training objective on the one engine (quests[].school: sft, dpo, ipo, orpo, kto, ...)",
    "Judge quest": "a preference quest (DPO on pairs, KTO on ratings) the daemon writes from Oracle feedback",
}


def xp_from_global_step(global_step: int) -> int:
    """XP = ``XP_PER_STEP * global_step``. Raises ``ValueError`` for a negative step."""
    if global_step < 0:
        raise ValueError(f"global_step must be >= 0, got {global_step}")
    return XP_PER_STEP * int(global_step)


def xp_for_level(level: int) -> int:
    """Total XP needed to reach ``level`` (>= 1): ``25 * L * (L - 1)``; level 1 needs 0."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    return LEVEL_XP_FACTOR * level * (level - 1)


def level_for_xp(xp: int) -> int:
    """The largest level L with ``xp_for_level(L) <= xp`` (inverse of the quadratic, integer-exact)."""
    if xp < 0:
        raise ValueError(f"xp must be >= 0, got {xp}")
    level = int((1 + math.sqrt(1 + 4 * xp / LEVEL_XP_FACTOR)) / 2)
    while xp_for_level(level + 1) <= xp:  # guard float rounding both ways
        level += 1
    while level > 1 and xp_for_level(level) > xp:
        level -= 1
    return max(1, level)


def stat_from_loss(loss: float | None) -> int | None:
    """``round(100 * exp(-loss))`` (0..100); None when the loss is unknown or not finite."""
    if loss is None or not math.isfinite(loss):
        return None
    return round(STAT_SCALE * math.exp(-max(0.0, loss)))


def attack(recent_losses: Sequence[float | None]) -> int | None:
    """ATK from the training losses of the latest steps (oldest first; the last 20 finite ones count)."""
    finite = [x for x in recent_losses if x is not None and math.isfinite(x)][-ATK_LOSS_WINDOW_STEPS:]
    return stat_from_loss(sum(finite) / len(finite)) if finite else None


def defense(eval_loss: float | None) -> int | None:
    """DEF from the latest validation loss."""
    return stat_from_loss(eval_loss)


def title_for_level(level: int) -> str:
    title = TITLES[0][1]
    for min_level, name in TITLES:
        if level >= min_level:
            title = name
    return title


def strain(grad_norm: float | None, max_grad_norm: float) -> float | None:
    """``grad_norm / max_grad_norm`` (dimensionless); None when unknown, inf when not finite."""
    if grad_norm is None:
        return None
    if not math.isfinite(grad_norm):
        return math.inf
    return grad_norm / max_grad_norm


def strain_zone(strain_ratio: float | None, loss: float | None = None) -> str | None:
    """calm / focused / strained / overwhelmed (see the module table); None when there is no step yet."""
    if loss is not None and not math.isfinite(loss):
        return "overwhelmed"
    if strain_ratio is None:
        return None
    for bound, zone in STRAIN_ZONES:
        if strain_ratio < bound:
            return zone
    return "overwhelmed"


@dataclass(frozen=True)
class HeroStats:
    """The game view of the hero at one global step."""

    level: int
    xp: int
    xp_level_start: int  # XP at which the current level began
    xp_next_level: int  # XP at which the next level begins
    xp_progress: float  # 0..1 along the current level
    atk: int | None
    defense: int | None
    title: str
    strain: float | None
    strain_zone: str | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["def"] = d.pop("defense")
        if d["strain"] is not None and not math.isfinite(d["strain"]):
            d["strain"] = None  # JSON has no infinity; the zone says "overwhelmed"
        return d


def hero_stats(global_step: int, recent_losses: Sequence[float | None], eval_loss: float | None,
               grad_norm: float | None, max_grad_norm: float) -> HeroStats:
    """All game stats from the ledger's metrics.

    ``recent_losses``: training losses of the latest steps, oldest first; ``grad_norm``: the latest step's.
    """
    xp = xp_from_global_step(global_step)
    level = level_for_xp(xp)
    start, nxt = xp_for_level(level), xp_for_level(level + 1)
    ratio = strain(grad_norm, max_grad_norm)
    last_loss = recent_losses[-1] if recent_losses else None
    return HeroStats(
        level=level, xp=xp, xp_level_start=start, xp_next_level=nxt, xp_progress=(xp - start) / (nxt - start),
        atk=attack(recent_losses), defense=defense(eval_loss), title=title_for_level(level),
        strain=ratio, strain_zone=strain_zone(ratio, last_loss),
    )


def total_level(skill_levels: Mapping[str, int]) -> int:
    """Total Level = the sum of the skill levels (``{skill: level}``, levels >= 0). Raises ``ValueError``
    for a negative level."""
    if any(level < 0 for level in skill_levels.values()):
        raise ValueError(f"skill levels must be >= 0, got {dict(skill_levels)}")
    return sum(int(level) for level in skill_levels.values())


BLESSING_TREND_GAIN = 5.0
"""trend = clamp(0.5 + BLESSING_TREND_GAIN * (score - previous score), 0, 1)."""


def clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def evaluation_quality(score: float, previous_score: float | None) -> float:
    """``(score + trend) / 2`` with ``trend = clamp(0.5 + 5 * (score - previous_score), 0, 1)`` (0.5 without
    a previous score); ``score`` in [0, 1] (a trial's accuracy, or ``exp(-eval_loss)``). In [0, 1]."""
    trend = 0.5 if previous_score is None else clamp01(0.5 + BLESSING_TREND_GAIN * (score - previous_score))
    return (clamp01(score) + trend) / 2


@dataclass(frozen=True)
class Evaluation:
    """One evaluation for the blessing: at ``global_step``, judging the steps of the quests ``covers`` (ids),
    with ``score`` in [0, 1] and the ``previous_score`` of the same kind (None: the first)."""

    global_step: int
    covers: frozenset[int]
    score: float
    previous_score: float | None

    @property
    def quality(self) -> float:
        return evaluation_quality(self.score, self.previous_score)


@dataclass(frozen=True)
class Blessing:
    """``effort``: optimizer steps (global_step); ``judged_effort``: steps an evaluation judged;
    ``blessed_xp``: the sum of their qualities (effort x quality); ``unblessed_effort`` = effort - judged;
    ``quality`` = blessed_xp / judged_effort (None before any judged step)."""

    effort: int
    judged_effort: int
    blessed_xp: float
    unblessed_effort: int
    quality: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def blessing(step_quests: Sequence[tuple[int, int | None]], evaluations: Sequence[Evaluation],
             effort: int) -> Blessing:
    """The Temple's blessing (see the module table). ``step_quests``: ``(global_step, quest_id)`` of every
    optimizer step; ``effort``: the global step (at least the number of steps given)."""
    import bisect

    by_quest: dict[int, dict[int, float]] = {}  # quest -> {evaluation step: best quality}
    for ev in evaluations:
        q = ev.quality
        for quest in ev.covers:
            steps = by_quest.setdefault(quest, {})
            steps[ev.global_step] = max(q, steps.get(ev.global_step, 0.0))
    index = {quest: (sorted(v), [v[k] for k in sorted(v)]) for quest, v in by_quest.items()}
    judged, xp = 0, 0.0
    for step, quest in step_quests:
        found = index.get(quest) if quest is not None else None
        if not found:
            continue
        i = bisect.bisect_left(found[0], step)
        if i < len(found[0]):
            judged += 1
            xp += found[1][i]
    effort = max(effort, len(step_quests))
    return Blessing(effort=effort, judged_effort=judged, blessed_xp=xp, unblessed_effort=effort - judged,
                    quality=xp / judged if judged else None)


def formula_table_markdown() -> str:
    """The formula table and glossary as Markdown (for the README)."""
    rows = [
        ("XP", "`global_step` × 1", "steps.global_step", "one XP per optimizer step; never reset"),
        ("level L", "largest L with `XP ≥ 25·L·(L−1)`", "XP",
         "D&D 3.5 XP table `1000·L(L−1)/2` scaled by 1/40: level 2 at 50, 10 at 2,250, 20 at 9,500"),
        ("XP bar", "`(XP − 25·L·(L−1)) / (50·L)`", "XP", "progress through the current level"),
        ("ATK", "`round(100·exp(−mean loss of last 20 steps))`", "steps.loss",
         "`exp(−loss)` = 1/perplexity, the geometric-mean probability of the right next token"),
        ("DEF", "`round(100·exp(−eval_loss))`", "evals.eval_loss",
         "same scale on held-out examples; DEF well below ATK means overfitting"),
        ("title", ", ".join(f"{lvl} {name}" for lvl, name in TITLES), "level", "names for level ranges"),
        ("strain", "`grad_norm / training.max_grad_norm`", "steps.grad_norm",
         "calm < 0.5 ≤ focused < 1 ≤ strained < 4 ≤ overwhelmed (or loss/grad_norm not finite); "
         "above 1 every step is clipped"),
        ("skill level", "`level_after` of the skill's newest trial (0 before any)", "trials.level_after",
         "a level counts only when a trial proved it: Wilson 95% lower bound ≥ `skills.promotion_threshold`"),
        ("Total Level", "Σ skill levels", "trials.level_after",
         "what trials proved, beside the step level (effort)"),
        ("blessing quality q", "`(score + clamp(0.5 + 5·(score − previous score), 0, 1)) / 2`",
         "trials.accuracy, evals.eval_loss",
         "score = a trial's accuracy or `exp(−eval_loss)`; the trend is against the previous evaluation of "
         "the same skill and level / quest (none: 0.5): steps that made the hero worse earn little"),
        ("blessed XP", "Σ over judged steps of q (effort × quality)", "steps.quest_id, trials, evals",
         "a step is judged by the first evaluation at or after it of what it trained (coverage: a trial of "
         "its quest's skill, or its quest's held-out loss); several at one step: the best q"),
        ("unblessed effort", "`global_step` − judged steps", "steps", "effort no evaluation has confirmed yet"),
        ("school XP", "steps of the school's quests × 1", "quests.steps, quests.school",
         "every optimizer step is 1 XP whatever the school (a Scribe step of packed rows, a Judge step of "
         "`micro_batch_size × gradient_accumulation_steps` pairs): XP counts effort; Mirror = quests `spar-*`, "
         "the rest of `sft` = Scribe; a Judge / Fortune Teller quest is blessed by its held-out loss in its "
         "own school's loss"),
    ]
    lines = ["| stat | formula | from | why |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | `{c}` | {d} |" for a, b, c, d in rows]
    lines += ["", "| game word | field term |", "|---|---|"]
    lines += [f"| {k} | {v.replace('<', '&lt;').replace('>', '&gt;')} |" for k, v in GLOSSARY.items()]
    return "\n".join(lines) + "\n"
