"""Promotion trials: the hero answers fresh items of a skill at its level, greedily; promoted on evidence.

A trial draws ``n`` items (``skills.trial_samples``, at least 30) of the skill's current level from the
seed ``derive_seed("trial", hero, skill, level, global_step, attempt)`` (:func:`trial_seed`), never from
the ``"train"`` stream that makes training items, and, where the level is large enough, only from
trial-only prompts (:mod:`core.skills.base`). Nothing of a trial is written to a quest: its items are
never trained.

The hero answers with greedy decoding (:func:`generate_answers`: batched, left-padded, the hero
tokenizer's chat template with the generation prompt — the very text that precedes the answer in a
training record, :mod:`core.skills.quests`), stopping at EOS or the template's end-of-turn marker. Each
answer is scored by the skill's exact scorer. With ``k`` right of ``n``, accuracy ``k / n`` and the
Wilson 95 % lower bound ``L`` (:func:`core.skills.stats.wilson_lower_bound`, Wilson 1927), the hero is
**promoted** (level + 1) when the trial was at its current level and ``L ≥ skills.promotion_threshold``.

A skill's level is the number of levels passed: it practises and is tried at ``level`` while
``level <= max_level``; ``max_level + 1`` means mastered (no trial is due; ``--level`` re-tests any level
without changing anything).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core.ledger import TrialRecord
from core.packing import PACKED_SDPA
from core.skills.base import TRIAL, Skill, SkillItem, derive_seed, generate_items
from core.skills.quests import prompt_messages
from core.skills.stats import wilson_lower_bound

ANSWER_SLACK_TOKENS = 8
"""Generation stops this many tokens after the longest reference answer (and its end-of-turn marker)."""


def trial_seed(hero: str, skill: str, level: int, global_step: int, attempt: int = 0) -> int:
    """The seed of a trial's items: ``derive_seed("trial", hero, skill, level, global_step, attempt)``."""
    return derive_seed(TRIAL, hero, skill, level, global_step, attempt)


def trial_due(steps_since_last_trial: int, every_steps: int, level: int, max_level: int) -> bool:
    """Whether a skill trained for ``steps_since_last_trial`` optimizer steps (steps whose batches held
    its items) since its last trial is due for one: ``every_steps`` > 0 (``skills.trial_every_steps``; 0
    means on demand only), that many steps done, and the skill not mastered (``level <= max_level``)."""
    return every_steps > 0 and steps_since_last_trial >= every_steps and level <= max_level


def end_of_turn_marker(tokenizer) -> str:
    """What the chat template puts after an assistant turn, stripped (``<|im_end|>`` for ChatML); "" if none."""
    probe = "\x00answer\x00"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text[text.index(probe) + len(probe):].strip() if probe in text else ""


def generation_prompt(tokenizer, item: SkillItem) -> str:
    """The text the hero continues: :func:`core.skills.quests.prompt_messages` rendered by the chat template
    with the generation prompt (tokenized without added special tokens, as training renders chats)."""
    return tokenizer.apply_chat_template(prompt_messages(item), tokenize=False, add_generation_prompt=True)


def _cut(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                     on_batch: Callable[[], None] | None = None) -> list[str]:
    """Greedy completions of ``prompts`` (rendered chat texts), ``batch_size`` at a time, left-padded.

    Each completion stops at EOS or the end-of-turn marker (cut from the text) or after ``max_new_tokens``.
    The model's training mode, attention implementation, the tokenizer's padding side and the torch RNG are
    left as they were. ``on_batch()`` is called after each batch (the daemon keeps its heartbeat with it).
    A model training with the engine's packed attention (:data:`core.packing.PACKED_SDPA`,
    which ignores padding masks) generates with plain ``sdpa`` meanwhile.
    """
    from transformers import GenerationConfig

    marker = end_of_turn_marker(tokenizer)
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    if len(marker_ids) == 1:
        stop_ids.append(marker_ids[0])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=stop_ids or None, pad_token_id=tokenizer.pad_token_id,
                              stop_strings=[marker] if len(marker_ids) > 1 else None)
    stops = [s for s in (marker, tokenizer.eos_token, tokenizer.pad_token) if s]
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    attn = getattr(model.config, "_attn_implementation", None)
    model.eval()
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        if attn == PACKED_SDPA:
            model.set_attn_implementation("sdpa")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[i:i + batch_size], add_special_tokens=False, padding=True,
                                return_tensors="pt").to(device)
                out = model.generate(**enc, generation_config=config,
                                     tokenizer=tokenizer if config.stop_strings else None)
                for row in out[:, enc["input_ids"].shape[1]:]:
                    answers.append(_cut(tokenizer.decode(row, skip_special_tokens=False), stops))
                if on_batch is not None:
                    on_batch()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        if attn == PACKED_SDPA:
            model.set_attn_implementation(attn)
    return answers


@dataclass
class AnsweredItems:
    """Items of a skill the hero answered (a trial, a sparring round): per item its ``answers`` and ``flags``
    (right or wrong, by the skill's scorer); ``correct`` of ``n``, ``accuracy`` = correct / n (0 when n is 0);
    ``duration_seconds``: wall time of generation + scoring."""

    skill: str
    level: int
    seed: int
    items: list[SkillItem]
    answers: list[str]
    flags: list[bool]
    duration_seconds: float
    n: int = field(init=False)
    correct: int = field(init=False)
    accuracy: float = field(init=False)

    def __post_init__(self) -> None:
        self.n = len(self.items)
        self.correct = sum(self.flags)
        self.accuracy = self.correct / self.n if self.n else 0.0


@dataclass
class TrialResult(AnsweredItems):
    """The outcome of :func:`run_trial` (:class:`AnsweredItems`); ``lower_bound``: Wilson 95 % lower bound."""

    lower_bound: float = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lower_bound = wilson_lower_bound(self.correct, self.n)

    def samples(self, k: int) -> list[dict]:
        """The first ``k`` items as ``{"prompt", "expected", "answer", "correct"}`` (answers cut to 500 chars)."""
        return [{"prompt": it.prompt[:500], "expected": it.answer[:500], "answer": a[:500], "correct": ok}
                for it, a, ok in list(zip(self.items, self.answers, self.flags, strict=True))[:k]]

    def record(self, *, hero: str, current_level: int, threshold: float, global_step: int,
               checkpoint: str | None, sample_answers: int) -> TrialRecord:
        """The ledger row: promoted when ``level == current_level`` and ``lower_bound >= threshold``."""
        promoted = self.level == current_level and self.lower_bound >= threshold
        return TrialRecord(hero=hero, skill=self.skill, level=self.level,
                           level_after=current_level + 1 if promoted else current_level, n=self.n,
                           correct=self.correct, accuracy=self.accuracy, lower_bound=self.lower_bound,
                           threshold=threshold, promoted=promoted, global_step=global_step,
                           checkpoint=checkpoint, seed=self.seed, duration_seconds=self.duration_seconds,
                           samples=self.samples(sample_answers), time=time.time())


def run_trial(model, tokenizer, skill: Skill, level: int, *, n: int, seed: int, max_new_tokens: int = 64,
              batch_size: int = 64, on_batch: Callable[[], None] | None = None) -> TrialResult:
    """Draw ``n`` trial items of ``skill`` at ``level`` from ``seed``, let the model answer greedily, score.

    ``max_new_tokens`` caps each answer; generation also stops :data:`ANSWER_SLACK_TOKENS` tokens after the
    longest reference answer with its end-of-turn marker. Raises :class:`core.skills.base.SkillError` for
    a level the skill does not have or a scorer that fails. ``on_batch``: see :func:`generate_answers`.
    """
    started = time.perf_counter()
    items = generate_items(skill, level, n, seed, TRIAL)
    answers, flags = answer_items(model, tokenizer, skill, items, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, on_batch=on_batch)
    return TrialResult(skill.name, level, seed, items, answers, flags, time.perf_counter() - started)


def answer_items(model, tokenizer, skill: Skill, items: list[SkillItem], *, max_new_tokens: int = 64,
                 batch_size: int = 64, on_batch: Callable[[], None] | None = None) -> tuple[list[str], list[bool]]:
    """The hero's greedy answers to ``items`` and, per item, whether ``skill`` scores it right (score >= 1):
    the answering and scoring of a trial, shared by sparring (:mod:`core.skills.sparring`).

    ``max_new_tokens`` caps each answer; generation also stops :data:`ANSWER_SLACK_TOKENS` tokens after the
    longest reference answer with its end-of-turn marker. Raises :class:`core.skills.base.SkillError` for a
    scorer that fails. ``on_batch``: see :func:`generate_answers`.
    """
    if not items:
        return [], []
    marker = end_of_turn_marker(tokenizer)
    longest = max(len(tokenizer(it.answer + marker, add_special_tokens=False)["input_ids"]) for it in items)
    budget = max(1, min(max_new_tokens, longest + ANSWER_SLACK_TOKENS))
    prompts = [generation_prompt(tokenizer, it) for it in items]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size,
                               on_batch=on_batch)
    flags = [skill.score(a, it.answer) >= 1.0 for a, it in zip(answers, items, strict=True)]
    return answers, flags
