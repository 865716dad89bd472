"""Schools: the objectives the one engine trains a quest with.

A school is *not* a trainer. :class:`core.engine.Engine` owns the model, optimizer, scheduler, ``global_step``,
RNG, the quest cursor, checkpoints, faults (non-finite rollback, OOM halving, disk guard) and exact resume; a
school supplies only (see :class:`School`):

* how a quest's normalized records become items and optimizer steps (:meth:`School.encode`,
  :meth:`School.steps`),
* the loss of a micro-batch, summed so the engine can normalise it over the whole step (:meth:`School.loss_sum`),
* its per-step metrics (TRL's names: ``rewards/chosen``, ``rewards/margins``, ...), stored by the engine in
  the ledger's ``step_metrics`` with the step.

=================  ===================  =================================================================
school             formats              module
=================  ===================  =================================================================
``sft``            SFT formats          :mod:`core.schools.scribe` (Scribe: today's SFT, unchanged)
``dpo`` ``ipo``    paired preferences   :mod:`core.schools.judge` (Judge: DPO sigmoid / IPO)
``orpo``           paired preferences   :mod:`core.schools.judge` (reference-free ORPO)
``kto``            unpaired ratings     :mod:`core.schools.kto` (Judge: KTO)
``fortune_teller`` SFT formats          :mod:`core.schools.fortune_teller` (surprise-weighted SFT)
``grpo``           prompts + columns    :mod:`core.schools.champion` (Champion: GRPO, sampled on the fly)
``distill``        SFT formats          :mod:`core.schools.whisper` (Whisper: distillation from a teacher)
=================  ===================  =================================================================

**Which school trains a quest** (:func:`school_for`): the first glob of ``config.schools`` matching the
file name (as ``validation.field_map`` matches it: base name, without ``.gz`` or a ``high_``/``low_``
prefix) gives a :class:`core.config.QuestRule`; its ``school`` (null: by format) decides. By format:
SFT formats -> ``sft``, paired preferences -> ``dpo``, unpaired ratings -> ``kto``. The chosen school is
stored with the quest (ledger column ``quests.school``) when validation queues it. A school that cannot
train the file's format makes validation reject it (:func:`school_problem`).

This module imports no torch: validation and the Tavern use it; :func:`make_school` imports the school.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.checkpoint_layout import EXAMPLE_NAME
from core.config import QuestRule, RealmConfig, quest_rule_for
from core.formats import PREFERENCE_FORMATS, PROMPT_FORMATS, SFT_FORMATS, UNPAIRED_FORMATS

if TYPE_CHECKING:
    from core.schools.base import School

#: The sidecar beside a quest's stored file holding its reference log-probs (:mod:`core.schools.reference`).
REFERENCE_SUFFIX = ".reference.safetensors"
#: school name -> what it trains ("sft", "paired", "unpaired")
SCHOOL_DATA = {"sft": "sft", "fortune_teller": "sft", "dpo": "paired", "ipo": "paired", "orpo": "paired",
               "kto": "unpaired", "grpo": "prompts", "distill": "sft"}
#: Names the Tavern shows (tavern/game.py maps schools to the original's RPG names).
SCHOOL_TITLES = {"sft": "Scribe", "fortune_teller": "Fortune Teller", "dpo": "Judge", "ipo": "Judge",
                 "orpo": "Judge", "kto": "Judge", "grpo": "Champion", "distill": "Whisper"}
_DATA_WORDS = {"sft": "SFT records (text, messages, prompt/completion, alpaca, sharegpt)",
               "paired": "paired preferences (prompt/chosen/rejected)",
               "unpaired": "unpaired ratings (prompt/completion/label)"}
_DATA_WORDS["prompts"] = "prompts (prompt + columns for the rewards, format prompt_only)"


def rule_for(file_name: str, config: RealmConfig) -> QuestRule:
    """The :class:`QuestRule` of the first ``config.schools`` glob matching ``file_name`` (fnmatch on the
    base name, also without ``.gz`` and a ``high_``/``low_`` prefix); the defaults when none matches
    (:func:`core.config.quest_rule_for`: one matching rule for schools, epochs and order)."""
    return quest_rule_for(file_name, config.schools)


def school_by_format(fmt: str | None) -> str:
    """The default school of a format: ``dpo`` for paired preferences, ``kto`` for unpaired ratings,
    ``sft`` for anything else."""
    if fmt in PREFERENCE_FORMATS:
        return "dpo"
    if fmt in UNPAIRED_FORMATS:
        return "kto"
    if fmt in PROMPT_FORMATS:
        return "grpo"
    return "sft"


def school_for(file_name: str, fmt: str | None, config: RealmConfig) -> tuple[str, QuestRule]:
    """``(school name, its settings)`` for a quest file: the matching rule's ``school`` (``dpo`` with
    ``loss_type: ipo`` is ``ipo``), else :func:`school_by_format`."""
    rule = rule_for(file_name, config)
    name = rule.school or school_by_format(fmt)
    if name == "dpo" and rule.loss_type == "ipo":
        name = "ipo"
    return name, rule


def school_problem(school: str, fmt: str | None, rule: QuestRule | None = None) -> str | None:
    """Why ``school`` cannot train a file of format ``fmt`` with the settings ``rule`` (None when it can;
    a teacher that does not resolve is checked by :func:`core.schools.teacher.teacher_problem`)."""
    data = SCHOOL_DATA.get(school)
    if data is None:
        return f"unknown school {school!r}; schools are {', '.join(SCHOOL_DATA)}"
    have = "sft" if fmt in SFT_FORMATS else "paired" if fmt in PREFERENCE_FORMATS else \
        "unpaired" if fmt in UNPAIRED_FORMATS else "prompts" if fmt in PROMPT_FORMATS else None
    if fmt is None or have == data:
        if school == "distill" and rule is not None and not rule.teacher:
            return ("school distill (Whisper) needs a teacher: set schools.<glob>.teacher in config.json to a "
                    f"model folder, a checkpoint of the hero ({EXAMPLE_NAME}), a named version or a cached hub id")
        return None
    return (f"school {school} trains {_DATA_WORDS[data]}, but this file is format {fmt} ({_DATA_WORDS[have]}); "
            f"change config.json schools for this file name, or drop it without a rule (format {fmt} goes to "
            f"school {school_by_format(fmt)})") if have else f"school {school} cannot train format {fmt}"


def make_school(name: str, rule: QuestRule | None = None) -> School:
    """An instance of school ``name`` with ``rule``'s settings. Raises ``ValueError`` for an unknown name."""
    rule = rule or QuestRule()
    if name == "sft":
        from core.schools.scribe import Scribe
        return Scribe(rule)
    if name == "fortune_teller":
        from core.schools.fortune_teller import FortuneTeller
        return FortuneTeller(rule)
    if name in ("dpo", "ipo", "orpo"):
        from core.schools.judge import Judge
        return Judge(rule, "ipo" if name == "ipo" else "orpo" if name == "orpo" else "sigmoid")
    if name == "kto":
        from core.schools.kto import KTO
        return KTO(rule)
    if name == "grpo":
        from core.schools.champion import Champion
        return Champion(rule)
    if name == "distill":
        from core.schools.whisper import Whisper
        return Whisper(rule)
    raise ValueError(f"unknown school {name!r}; schools are {', '.join(SCHOOL_DATA)}")
