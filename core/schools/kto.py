"""Judge on unpaired ratings: KTO (Ethayarajh et al. 2024, eq. 7-8; TRL's ``KTOTrainer``, ``loss_type="kto"``).

Records: ``prompt``/``completion``/``label`` (TRL's unpaired preference type) or ``messages`` whose last
assistant message is rated by a boolean ``label`` (LLaMA-Factory's KTO data). For record *i* let ``z_i`` be
the policy's summed log-probability (nats) of its completion tokens, ``z_i^ref`` the reference model's, and
``beta`` the rule's ``beta``. The KL estimate of a step is TRL's: each record's prompt is paired with the
previous record's completion within the step, the *mismatched* completions
``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})``, and

    ``KL = max(0, mean_j (w_j - w_j^ref))``   (no gradient; ``w`` the mismatched log-probs)

    ``loss_i = desirable_weight * (1 - sigmoid(beta (z_i - z_i^ref - KL)))``  for a good (``true``) record,
    ``loss_i = undesirable_weight * (1 - sigmoid(beta (KL - (z_i - z_i^ref))))``  for a bad one;

the step's loss is the mean over its records. The KL pairs are formed over the whole optimizer step (TRL:
over each device batch; the same with ``gradient_accumulation_steps`` 1). Metrics: ``rewards/chosen`` and
``rewards/rejected`` (mean ``beta (z - z^ref)`` over the good / bad records), ``rewards/margins`` (their
difference), ``kl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from core.chat import IGNORE_INDEX, TokenizedExample, tokenize_example
from core.schools.base import School, collate_sequences, keep_last_runs, sequence_logps

if TYPE_CHECKING:
    from core.engine import Engine

METRICS = ("rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected")


@dataclass
class RatedItem:
    """One rated record: ``example`` (prompt + completion, labels on the completion), ``split``: the index
    of the completion's first token, ``label``; ``kl``: the mismatched sequence (set per step group);
    ``ref``: ``(z^ref, w^ref)`` once attached."""

    example: TokenizedExample
    split: int
    label: bool
    line: int
    max_length: int
    kl: TokenizedExample | None = None
    ref: torch.Tensor | None = None

    @property
    def sequences(self) -> tuple[TokenizedExample, ...]:
        return (self.example,)


@dataclass
class RatedBatch:
    items: list[Any]
    batch: Any
    index: torch.Tensor
    labels: torch.Tensor  # (n,) bool
    ref: torch.Tensor | None  # (n, 2)


def kto_loss(beta: float, logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-record KTO losses and rewards ``beta (z - z^ref)`` (detached), both ``(n,)``; ``logps``,
    ``ref_logps``: ``(n,)`` summed completion log-probs (nats); ``labels``: ``(n,)`` bool; ``kl``: scalar."""
    ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(labels, good, bad), beta * ratio.detach()


def mismatched(prompt_of: RatedItem, completion_of: RatedItem) -> TokenizedExample:
    """``prompt_of``'s prompt tokens followed by ``completion_of``'s completion tokens (labels on the
    completion), cut from the prompt's start to ``max_length`` (at least one prompt token kept)."""
    prompt = prompt_of.example.input_ids[:prompt_of.split]
    completion = completion_of.example.input_ids[completion_of.split:]
    room = prompt_of.max_length - len(completion)
    prompt = prompt[-max(room, 1):] if prompt else prompt
    ids = (prompt + completion)[:prompt_of.max_length]
    labels = [IGNORE_INDEX] * len(prompt) + completion[:len(ids) - len(prompt)]
    labels[0] = IGNORE_INDEX
    return TokenizedExample(ids, labels, prompt_of.line)


class KTO(School):
    """KTO. Items: :class:`RatedItem`; a step is ``micro_batch_size x gradient_accumulation_steps`` records;
    reference values ``(n, 2)``: ``(z^ref, w^ref)`` (nats)."""

    name = "kto"
    needs_reference = True
    start_step_reads_all_rows = True  # the KL estimate mismatches completions across the whole step
    metric_names = METRICS

    def __init__(self, rule):
        super().__init__(rule)
        self.beta = rule.beta
        self._kl = torch.zeros(())

    def encode(self, example: dict, tokenizer, max_length: int, line: int) -> RatedItem:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str):
            tokens = tokenize_example({"prompt": prompt, "completion": completion}, tokenizer, max_length, line)
        else:
            tokens = tokenize_example({"messages": list(prompt) + list(completion)}, tokenizer, max_length, line)
            runs = max(1, sum(1 for m in completion if m["role"] == "assistant"))
            tokens.labels = keep_last_runs(tokens.labels, runs)
        split = next((t for t, x in enumerate(tokens.labels) if x != IGNORE_INDEX), len(tokens.labels))
        return RatedItem(tokens, split, bool(example["label"]), line, max_length)

    def prepare_items(self, items: list[RatedItem], group: int) -> None:
        """Pair each item's prompt with the previous item's completion within consecutive groups of
        ``group`` items (the optimizer steps), TRL's rotation by one."""
        for start in range(0, len(items), group):
            chunk = items[start:start + group]
            for j, item in enumerate(chunk):
                item.kl = mismatched(item, chunk[j - 1])

    def collate(self, engine: Engine, rows: list[list[RatedItem]]) -> RatedBatch:
        items = [row[0] for row in rows]
        batch, index = collate_sequences(engine, [item.example for item in items])
        labels = torch.tensor([item.label for item in items], dtype=torch.bool)
        ref = torch.stack([item.ref for item in items]) if items and items[0].ref is not None else None
        return RatedBatch(items, batch, index, labels, ref)

    def tokens(self, batches: list[RatedBatch]) -> int:
        return sum(b.batch.num_tokens for b in batches) * 2  # the KL pass runs as many sequences

    def denominator(self, batches: list[RatedBatch]) -> int:
        return sum(len(b.items) for b in batches)

    @torch.no_grad()
    def start_step(self, engine: Engine, batches: list[RatedBatch]) -> None:
        items = [item for b in batches for item in b.items]
        policy = self._logps(engine, [item.kl for item in items])
        ref = torch.stack([item.ref[1] for item in items]).to(policy.device)
        self._kl = (policy - ref).mean().clamp(min=0)

    def _logps(self, engine: Engine, seqs: list[TokenizedExample]) -> torch.Tensor:
        out = []
        for i in range(0, len(seqs), engine.micro_batch_size):
            batch, index = collate_sequences(engine, seqs[i:i + engine.micro_batch_size])
            out.append(sequence_logps(engine, batch, index, len(seqs[i:i + engine.micro_batch_size]))[0])
        return torch.cat(out)

    def loss_sum(self, engine: Engine, b: RatedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        (logps,) = sequence_logps(engine, b.batch, b.index, len(b.items))
        device = logps.device
        labels, ref = b.labels.to(device), b.ref.to(device)
        losses, rewards = kto_loss(self.beta, logps, ref[:, 0], labels, self._kl.to(device),
                                   self.rule.desirable_weight, self.rule.undesirable_weight)
        good, bad = labels.float(), (~labels).float()
        n = torch.tensor(float(len(b.items)), device=device)
        values = torch.stack([
            torch.stack([(rewards * good).sum(), good.sum()]), torch.stack([(rewards * bad).sum(), bad.sum()]),
            torch.stack([self._kl.to(device) * n, n]),
            torch.stack([(logps.detach() * good).sum(), good.sum()]),
            torch.stack([(logps.detach() * bad).sum(), bad.sum()])])
        return losses.sum(), values

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics

    @torch.no_grad()
    def reference_values(self, engine: Engine, items: list[RatedItem]) -> torch.Tensor:
        z = self._logps(engine, [item.example for item in items]) if items else torch.zeros(0)
        w = self._logps(engine, [item.kl for item in items]) if items else torch.zeros(0)
        return torch.stack([z, w], dim=1).float().cpu()
