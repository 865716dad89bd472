"""Held-out loss of any model folder (a checkpoint, the base model) on a quest file; on a preference file,
preference accuracy and mean margin (:func:`evaluate_preferences`); on a file of prompts (a Champion quest),
the mean reward of greedy completions (:func:`evaluate_prompts`).

Used by ``python -m training eval FILE [--checkpoint NAME]``: the same records, tokenization and loss mask
as training (:mod:`core.records`, :mod:`core.chat`), one example per row (no packing), fp32.

Which records: those validation kept, read through :func:`core.records.held_out_records` -- the stream the
engine's held-out split indexes. For a file the realm has validated (any quest with the same SHA-256, in
any state) its stored verdict is used; for another file validation runs now, with the model's tokenizer
and the realm's config, exactly as the daemon would.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from core.chat import TokenizedExample, measure_batch, tokenize_example
from core.config import RealmConfig
from core.formats import PREFERENCE_FORMATS, PROMPT_FORMATS, SFT_FORMATS, UNPAIRED_FORMATS
from core.fsutil import sha256_file
from core.hero import load_model, load_tokenizer
from core.ledger import Ledger
from core.packing import collate, model_attention_mask
from core.quest_queue import QuestQueue
from core.realm import Realm
from core.records import RecordVerdicts, VerdictsError, held_out_records, load_verdicts
from core.validation import validate_file

EVAL_BATCH_ROWS = 8


class EvaluationError(ValueError):
    """The file cannot be evaluated this way (e.g. unpaired ratings have no pairs to compare)."""


@torch.no_grad()
def mean_token_loss(model, tokenizer, examples: list[TokenizedExample], batch_rows: int = EVAL_BATCH_ROWS) -> float:
    """Mean next-token cross-entropy (nats per trainable token) over ``examples``; NaN if none is trainable."""
    model.eval()
    impl = getattr(model.config, "_attn_implementation", None)
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_rows):
        batch = collate([[ex] for ex in examples[i:i + batch_rows]], tokenizer.pad_token_id)
        mask = model_attention_mask(batch.attention_mask, impl, next(model.parameters()).dtype)
        logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                       use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.labels[:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        n += batch.num_trainable
    return total / n if n else math.nan


def stored_verdicts(realm: Realm, path: Path) -> RecordVerdicts | None:
    """The verdict stored with the realm's quest whose file has the same SHA-256 as ``path``, if any
    (the newest such quest with a readable verdict). Raises ``OSError`` when ``path`` cannot be read."""
    if not realm.ledger_path.exists():
        return None
    digest = sha256_file(path)
    ledger = Ledger(realm.ledger_path)
    try:
        queue = QuestQueue(realm, ledger)
        for quest in reversed(ledger.query("SELECT * FROM quests WHERE content_hash=? ORDER BY id", (digest,))):
            try:
                verdicts = load_verdicts(queue.verdicts_path_of(quest))
            except VerdictsError:
                continue
            if verdicts.content_hash == digest:
                return verdicts
    finally:
        ledger.close()
    return None


def file_verdicts(path: Path, config: RealmConfig, tokenizer, realm: Realm | None = None) -> RecordVerdicts:
    """The records of ``path`` validation keeps: the realm's stored verdict for the same content, else
    validated now with ``tokenizer`` and the realm's config (as the daemon would). Raises
    :class:`EvaluationError` with validation's reason when it rejects the file."""
    verdicts = stored_verdicts(realm, path) if realm is not None else None
    if verdicts is None:
        verdicts = RecordVerdicts()
        max_length = config.training.max_length
        report = validate_file(path, display_name=path.name, config=config, verdicts=verdicts,
                               count_tokens_batch=lambda exs: measure_batch(exs, tokenizer, max_length))
        if not report.accepted:
            raise EvaluationError(f"{path.name} does not pass validation: {report.reason}")
    return verdicts


@torch.no_grad()
def sequence_logprobs(model, tokenizer, seqs: list[TokenizedExample], batch_rows: int = EVAL_BATCH_ROWS
                      ) -> list[float]:
    """Summed log-probability (nats, fp32) of each sequence's labelled tokens (its response), one sequence
    per row, padded, with the model's own attention."""
    model.eval()
    impl = getattr(model.config, "_attn_implementation", None)
    out: list[float] = []
    for i in range(0, len(seqs), batch_rows):
        batch = collate([[s] for s in seqs[i:i + batch_rows]], tokenizer.pad_token_id or 0)
        param = next(model.parameters())
        mask = model_attention_mask(batch.attention_mask.to(param.device), impl, param.dtype)
        logits = model(input_ids=batch.input_ids.to(param.device), attention_mask=mask,
                       position_ids=batch.position_ids.to(param.device), use_cache=False).logits[:, :-1].float()
        targets = batch.labels[:, 1:].to(param.device)
        token = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                                 reduction="none").view(targets.shape)
        out.extend(token.sum(dim=1).tolist())
    return out


def evaluate_preferences(model_dir: Path | str, path: Path, config: RealmConfig, *, max_examples: int = 256,
                         every: int = 1, realm: Realm | None = None) -> dict[str, float | int]:
    """Preference accuracy of the model in ``model_dir`` on the pairs of ``path`` (records chosen as in
    :func:`evaluate_file`): ``{"preference_accuracy": share of pairs with log p(chosen) > log p(rejected),
    "mean_margin": mean of log p(chosen) - log p(rejected) (nats), "pairs": n}``, each log p summed over
    the response tokens only, tokenized as the Judge trains (:mod:`core.schools.judge`, truncated to
    ``training.max_length``) -- the same rule for every checkpoint and the base model.

    Raises :class:`EvaluationError` when ``path`` holds no paired preferences, :class:`core.hero.HeroError`
    when the model cannot be loaded, ``OSError`` when the file cannot be read."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(model_dir, config.hero)
    items = preference_items(path, config, tokenizer, max_examples=max_examples, every=every, realm=realm)
    return preference_metrics(load_model(model_dir, config.hero), tokenizer, items)


def preference_items(path: Path, config: RealmConfig, tokenizer, *, max_examples: int = 256, every: int = 1,
                     realm: Realm | None = None) -> list:
    """The pairs of ``path`` that :func:`evaluate_preferences` scores, encoded as the Judge trains them
    (:class:`core.schools.judge.PairItem`). Raises :class:`EvaluationError` when ``path`` holds no paired
    preferences, ``OSError`` when it cannot be read."""
    from core.schools import make_school

    verdicts = file_verdicts(path, config, tokenizer, realm)
    if verdicts.format not in PREFERENCE_FORMATS:
        raise EvaluationError(f"{path.name} holds {verdicts.format or 'no valid'} records, not paired preferences")
    judge = make_school("dpo")
    return [judge.encode(ex, tokenizer, config.training.max_length, line)
            for line, ex in held_out_records(path, verdicts, every, max_examples)]


def preference_metrics(model, tokenizer, items: list) -> dict[str, float | int]:
    """``{"preference_accuracy", "mean_margin", "pairs"}`` of ``model`` on encoded pairs
    (:func:`preference_items`; see :func:`evaluate_preferences`). NaN accuracy and margin when there is
    no pair."""
    logps = sequence_logprobs(model, tokenizer, [s for item in items for s in item.sequences])
    margins = [c - r for c, r in zip(logps[0::2], logps[1::2], strict=True)]
    n = len(margins)
    return {"preference_accuracy": sum(m > 0 for m in margins) / n if n else math.nan,
            "mean_margin": sum(margins) / n if n else math.nan, "pairs": n}


def file_kind(path: Path, config: RealmConfig, model_dir: Path | str, realm: Realm | None = None) -> str:
    """``"preference"`` for a file of paired preferences, ``"unpaired"`` for ratings, ``"prompts"`` for
    prompt-only records, else ``"sft"``."""
    verdicts = file_verdicts(path, config, load_tokenizer(model_dir, config.hero), realm)
    if verdicts.format in PREFERENCE_FORMATS:
        return "preference"
    if verdicts.format in PROMPT_FORMATS:
        return "prompts"
    return "unpaired" if verdicts.format in UNPAIRED_FORMATS else "sft"


def evaluate_prompts(model_dir: Path | str, path: Path, config: RealmConfig, realm: Realm, *,
                     max_examples: int = 256, every: int = 1) -> dict[str, float | int]:
    """``{"mean_reward", "prompts"}``: the mean reward of one greedy completion per prompt of a prompt-only
    file (records chosen as :func:`evaluate_file` chooses them), scored by the reward of the ``schools`` rule
    matching the file's name, or each record's ``skill`` scorer when the rule names none -- what a Champion
    quest's held-out evaluation measures (:meth:`core.schools.champion.Champion.greedy_reward`; completions of
    at most the rule's ``max_completion_length`` tokens). Raises :class:`EvaluationError` for another format
    or a reward that cannot score the records, :class:`core.hero.HeroError` when the model cannot be loaded.
    """
    from transformers.utils import logging as hf_logging

    from core.config import quest_rule_for
    from core.formats import RecordError
    from core.rewards import RewardSpecError
    from core.schools import make_school
    from core.schools.champion import rule_reward

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(model_dir, config.hero)
    verdicts = file_verdicts(path, config, tokenizer, realm)
    if verdicts.format not in PROMPT_FORMATS:
        raise EvaluationError(f"{path.name} holds {verdicts.format or 'no valid'} records, not prompts")
    rule = quest_rule_for(path.name, config.schools)
    champion = make_school("grpo", rule)
    items = [champion.encode(ex, tokenizer, config.training.max_length, line)
             for line, ex in held_out_records(path, verdicts, every, max_examples)]
    if not items:
        raise EvaluationError(f"{path.name} has no prompt to evaluate")
    try:
        reward = rule_reward(rule, realm.root, config.skills)
        try:
            value = champion.greedy_reward(load_model(model_dir, config.hero), tokenizer, items, reward)
        finally:
            close = getattr(reward, "close", None)
            if close is not None:
                close()
    except (RecordError, RewardSpecError) as exc:
        raise EvaluationError(str(exc)) from None
    return {"mean_reward": value, "prompts": len(items)}


def evaluate_file(model_dir: Path | str, path: Path, config: RealmConfig, *, max_examples: int = 256,
                  every: int = 1, realm: Realm | None = None) -> tuple[float, int]:
    """``(mean token loss, examples)`` of the model in ``model_dir`` on the records of ``path`` that
    validation keeps (see the module doc; ``realm``: where to look for a stored verdict), truncated to
    ``training.max_length`` as training truncates them: records ``every-1, 2*every-1, ...`` of that stream
    (at most ``max_examples``). With ``every`` = ``training.eval_holdout_every`` and ``max_examples`` =
    ``training.eval_max_examples`` these are exactly the records training held out and evaluated.

    Raises :class:`core.hero.HeroError` when the model or tokenizer cannot be loaded, ``OSError`` when the
    file cannot be read.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(model_dir, config.hero)
    max_length = config.training.max_length
    verdicts = file_verdicts(path, config, tokenizer, realm)
    if verdicts.format not in SFT_FORMATS and verdicts.format is not None:
        raise EvaluationError(f"{path.name} holds {verdicts.format} records: no SFT loss to evaluate")
    examples = [tokenize_example(ex, tokenizer, max_length, line)
                for line, ex in held_out_records(path, verdicts, every, max_examples)]
    model = load_model(model_dir, config.hero)
    return mean_token_loss(model, tokenizer, examples), len(examples)
