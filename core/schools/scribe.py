"""Scribe: supervised fine-tuning, the engine's original objective, unchanged.

Loss: next-token cross-entropy summed over the step's trainable tokens (labels != -100, :mod:`core.chat`)
divided by their number (exact gradient accumulation), packed rows (:func:`core.packing.iter_steps`). The
school only routes the engine's own SFT code (:meth:`core.engine.Engine._loss_sum`, ``_collate``,
``evaluate``), so SFT quests train exactly as before, at the same speed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from core.chat import TokenizedExample, tokenize_example
from core.packing import Batch, iter_steps
from core.schools.base import School

if TYPE_CHECKING:
    from core.engine import Engine


class Scribe(School):
    """SFT. Items: :class:`core.chat.TokenizedExample`; batches: :class:`core.packing.Batch` (B, L);
    :meth:`loss_sum`: summed token cross-entropy (nats), divided by the step's trainable tokens."""

    name = "sft"
    unit = "tokens"

    def encode(self, example: dict, tokenizer, max_length: int, line: int) -> TokenizedExample:
        return tokenize_example(example, tokenizer, max_length, line)

    def steps(self, items: Iterable[TokenizedExample], rows_per_step: int, max_length: int,
              packing: bool) -> Iterator[list[list[TokenizedExample]]]:
        return iter_steps(items, rows_per_step, max_length, packing)

    def collate(self, engine: Engine, rows: list[list[TokenizedExample]]) -> Batch:
        return engine._collate(rows)

    def denominator(self, batches: list[Batch]) -> int:
        return sum(b.num_trainable for b in batches)

    def tokens(self, batches: list[Batch]) -> int:
        return sum(b.num_tokens for b in batches)

    def loss_sum(self, engine: Engine, batch: Batch) -> tuple[torch.Tensor, None]:
        return engine._loss_sum(batch), None

    def evaluate(self, engine: Engine, items: list[TokenizedExample]) -> float:
        return engine.evaluate(items)
