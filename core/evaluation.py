"""Held-out loss of any model folder (a checkpoint, the base model) on a quest file.

Used by ``python -m training eval FILE [--checkpoint NAME]``: the same records, tokenization and loss mask
as training (:mod:`core.formats`, :mod:`core.chat`), one example per row (no packing), fp32.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from core.chat import TokenizedExample, tokenize_example
from core.config import RealmConfig
from core.formats import iter_valid_records
from core.hero import load_model, load_tokenizer
from core.packing import collate, model_attention_mask

EVAL_BATCH_ROWS = 8


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


def evaluate_file(model_dir: Path | str, path: Path, config: RealmConfig, *, max_examples: int = 256,
                  every: int = 1) -> tuple[float, int]:
    """``(mean token loss, examples)`` of the model in ``model_dir`` on the valid records of ``path``,
    truncated to ``training.max_length``: records ``every-1, 2*every-1, ...`` (at most ``max_examples``).
    With ``every`` = ``training.eval_holdout_every`` these are exactly the records training held out.

    Raises :class:`core.hero.HeroError` when the model or tokenizer cannot be loaded.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(model_dir, config.hero)
    model = load_model(model_dir, config.hero)
    examples = []
    for i, (line, ex) in enumerate(iter_valid_records(path, path.name, config.validation)):
        if i % every != every - 1:
            continue
        examples.append(tokenize_example(ex, tokenizer, config.training.max_length, line))
        if len(examples) >= max_examples:
            break
    return mean_token_loss(model, tokenizer, examples), len(examples)
