"""The Mirror (sparring): the hero answers items with known answers; each wrong answer becomes a correction.

A **sparring round** on a skill at a level (:func:`spar_round`):

1. draws ``sparring.samples`` items of the level from the seed ``derive_seed("spar", hero, skill, level,
   global_step, round)`` (:func:`spar_seed`; ``round`` from the ledger's atomic counter
   :meth:`core.ledger.Ledger.next_spar_round`), a random stream of its own — never the trials' ``"trial"``
   stream — and from the *training* split: a prompt held out for trials (:mod:`core.skills.base`, the rule
   that keeps trial prompts out of every training quest) is never asked, so no correction ever teaches a
   trial's question;
2. lets the hero answer them exactly as a promotion trial does (:func:`core.skills.trials.answer_items`:
   greedy, batched, the chat template's generation prompt) and scores each answer with the skill's exact
   scorer, so right and wrong mean what they mean in a trial;
3. turns each **wrong** answer into one SFT correction example (:func:`correction_record`): the item's
   prompt with the right answer as the completion (TRL's conversational prompt-completion, as skill quests);
   with ``sparring.feedback_turn`` the prompt also shows the wrong answer — ``user: prompt``, ``assistant:
   <wrong answer>``, ``user:`` :data:`FEEDBACK_TEMPLATE` — and the completion is the right answer (loss on
   the completion only: :mod:`core.formats` keeps a prompt with an assistant turn apart from its completion);
4. writes them, in the order asked, as one quest ``inbox/<sparring.priority>/spar-<SKILL>-L<level>-r<round>-
   s<global_step>.jsonl`` (:func:`spar_quest_name`) with the skill quests' atomic writer
   (:func:`core.skills.quests.write_quest`), so it is validated, queued (high priority by default), trained
   and traced like any quest; right answers produce nothing, and a round with no wrong answer writes no file;
5. records the round as a ``spar`` event (:meth:`core.ledger.Ledger.record_spar_round`).

Everything runs in-process on the weights given (the daemon's live model or a loaded checkpoint); the model
is only read (see :func:`core.skills.trials.generate_answers`). Training on ``spar-<SKILL>-L*`` quests counts
as training on the skill for the trial schedule (:mod:`core.skills.loop`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.config import SkillsConfig, SparringConfig
from core.ledger import Ledger, SparRecord
from core.skills.base import TRAIN, Skill, SkillItem, derive_seed, generate_items
from core.skills.quests import prompt_messages, spar_quest_name, write_quest
from core.skills.trials import AnsweredItems, answer_items

SPAR = "spar"
"""The seed purpose of sparring items (trials use ``"trial"``, training quests ``"train"``)."""
FEEDBACK_TEMPLATE = 'Your answer "{answer}" was wrong. Try again.'
"""The user turn after the wrong answer when ``sparring.feedback_turn`` is on."""
MAX_SHOWN_ANSWER_CHARS = 500
"""A wrong answer is cut to this many characters where it is shown (the feedback turn, the record)."""


def spar_seed(hero: str, skill: str, level: int, global_step: int, round_number: int) -> int:
    """The seed of a round's items: ``derive_seed("spar", hero, skill, level, global_step, round_number)``."""
    return derive_seed(SPAR, hero, skill, level, global_step, round_number)


def correction_record(item: SkillItem, answer: str, feedback_turn: bool = False) -> dict:
    """The SFT correction example of ``item`` answered wrongly with ``answer`` (see the module doc).
    ``wrong_answer`` rides along for traceability (training ignores it, like ``skill`` and ``level``)."""
    shown = answer[:MAX_SHOWN_ANSWER_CHARS]
    prompt = prompt_messages(item)
    if feedback_turn:
        prompt = [*prompt, {"role": "assistant", "content": shown},
                  {"role": "user", "content": FEEDBACK_TEMPLATE.format(answer=shown)}]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": item.answer}],
            "skill": item.skill, "level": item.level, "wrong_answer": shown}


@dataclass
class SparResult(AnsweredItems):
    """The answers of one round (:class:`core.skills.trials.AnsweredItems`); ``wrong`` = n - correct."""

    wrong: int = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.wrong = self.n - self.correct

    def corrections(self, feedback_turn: bool = False) -> list[dict]:
        """One :func:`correction_record` per wrong answer, in the order asked."""
        return [correction_record(it, a, feedback_turn)
                for it, a, ok in zip(self.items, self.answers, self.flags, strict=True) if not ok]


def spar(model, tokenizer, skill: Skill, level: int, *, n: int, seed: int, max_new_tokens: int = 64,
         batch_size: int = 64, on_batch: Callable[[], None] | None = None) -> SparResult:
    """Draw ``n`` training-split items of ``skill`` at ``level`` from ``seed`` and let the model answer them
    as in a trial (:func:`core.skills.trials.answer_items`). Raises :class:`core.skills.base.SkillError`
    (a level the skill does not have, a scorer that fails)."""
    started = time.perf_counter()
    items = generate_items(skill, level, n, seed, TRAIN)
    answers, flags = answer_items(model, tokenizer, skill, items, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, on_batch=on_batch)
    return SparResult(skill.name, level, seed, items, answers, flags, time.perf_counter() - started)


def spar_round(ledger: Ledger, model, tokenizer, skill: Skill, *, hero: str, level: int, global_step: int,
               checkpoint: str | None, inbox: Path, sparring: SparringConfig, skills: SkillsConfig,
               samples: int | None = None, on_batch: Callable[[], None] | None = None
               ) -> tuple[SparRecord, SparResult, Path | None]:
    """One sparring round (the module doc): answer, write the correction quest of the wrong answers into
    ``inbox/<sparring.priority>/`` (none when all are right), record the ``spar`` event. ``samples``
    overrides ``sparring.samples``; generation uses ``skills.max_new_tokens`` and ``skills.trial_batch_size``.
    Returns the record, the answers and the quest's path (None: no file). Raises
    :class:`core.skills.base.SkillError`, ``OSError`` while writing (nothing is recorded then)."""
    number = ledger.next_spar_round()
    seed = spar_seed(hero, skill.name, level, global_step, number)
    result = spar(model, tokenizer, skill, level, n=samples or sparring.samples, seed=seed,
                  max_new_tokens=skills.max_new_tokens, batch_size=skills.trial_batch_size, on_batch=on_batch)
    path = None
    corrections = result.corrections(sparring.feedback_turn)
    if corrections:
        folder = Path(inbox) / sparring.priority
        folder.mkdir(parents=True, exist_ok=True)
        path = write_quest(folder / spar_quest_name(skill.name, level, number, global_step), corrections)
    record = SparRecord(hero=hero, skill=skill.name, level=level, round=number, n=result.n,
                        correct=result.correct, wrong=result.wrong, accuracy=result.accuracy,
                        global_step=global_step, checkpoint=checkpoint, seed=seed,
                        quest=path.name if path else None, examples=len(corrections),
                        feedback_turn=sparring.feedback_turn, duration_seconds=result.duration_seconds,
                        time=time.time())
    ledger.record_spar_round(record)
    return record, result, path
