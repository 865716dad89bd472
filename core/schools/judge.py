"""Judge: preference optimisation on paired data (``prompt``/``chosen``/``rejected``), TRL's formulas.

For pair *i* let ``c_i``, ``r_i`` be the policy's summed log-probabilities (nats) of the chosen and rejected
response tokens (only the response: the prompt's tokens, and the earlier turns of a multi-turn prompt,
carry no label; the chat template renders message lists, :mod:`core.chat`), ``c_i^ref``, ``r_i^ref`` the
reference model's, ``n^c_i``, ``n^r_i`` their token counts, and ``beta`` the rule's ``beta``:

* ``sigmoid`` -- DPO (Rafailov et al. 2023, eq. 7; TRL ``loss_type="sigmoid"``):
  ``loss_i = -log sigmoid(beta * ((c_i - c_i^ref) - (r_i - r_i^ref)))``
* ``ipo`` -- IPO (Azar et al. 2023, eq. 17, with TRL's per-token normalisation):
  ``loss_i = ((c_i - c_i^ref) / n^c_i - (r_i - r_i^ref) / n^r_i - 1 / (2 beta))^2``
* ``orpo`` -- ORPO (Hong et al. 2024, eq. 6-7; TRL's ``ORPOTrainer``), reference-free, on average
  log-probabilities ``a = c / n^c``, ``b = r / n^r``:
  ``loss_i = -a_i - beta * log sigmoid((a_i - b_i) - (log(1 - e^a_i) - log(1 - e^b_i)))``
  (the SFT term is the pair's mean token NLL; TRL averages it over the batch's tokens instead).

The step's loss is the mean over its pairs. Metrics (TRL's names, means over the step's pairs):
``rewards/chosen = beta (c - c^ref)``, ``rewards/rejected = beta (r - r^ref)``, ``rewards/margins`` (their
difference), ``rewards/accuracies`` (share with chosen reward > rejected reward); for ORPO the rewards are
``beta a`` and ``beta b`` (TRL's ORPO).

Pairs in the implicit-prompt form (hh-rlhf: the prompt is inside both answers) are split at their longest
common prefix (TRL's ``extract_prompt``: strings at the first differing character, moved back before a
space; message lists at the first differing message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from core.chat import TokenizedExample, tokenize_example
from core.config import QuestRule
from core.schools.base import School, collate_sequences, keep_last_runs, sequence_logps, trained_tokens

if TYPE_CHECKING:
    from core.engine import Engine

LOSS_TYPES = ("sigmoid", "ipo", "orpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@dataclass
class PairItem:
    """One preference record, tokenized: ``chosen`` and ``rejected`` are prompt + answer with labels on the
    answer only; ``ref``: ``(c^ref, r^ref)`` (nats) once attached."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    line: int
    ref: torch.Tensor | None = None

    @property
    def sequences(self) -> tuple[TokenizedExample, TokenizedExample]:
        return self.chosen, self.rejected


@dataclass
class PairBatch:
    """A micro-batch of ``n`` pairs: sequences ``[c_1, r_1, c_2, r_2, ...]`` collated (``batch``, ``index``:
    sequence of each position), their response token counts ``lengths`` (2n,) and ``ref`` (n, 2) or None."""

    items: list[Any]
    batch: Any
    index: torch.Tensor
    lengths: torch.Tensor
    ref: torch.Tensor | None


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[Any, Any, Any]:
    """``(prompt, chosen answer, rejected answer)`` of an implicit-prompt pair: the longest common prefix
    is the prompt (TRL's ``trl.data_utils.extract_prompt``). Strings split at the first differing
    character (a space just before it goes with the answers); message lists at the first differing message."""
    n = min(len(chosen), len(rejected))
    idx = n
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i
            if isinstance(chosen, str) and i > 0 and chosen[i - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def side_examples(example: dict) -> tuple[dict, dict, int]:
    """The chosen and rejected sides of a normalized preference example as SFT-shaped examples whose
    labels fall on the answer, and how many assistant turns the answer has (the trained runs to keep)."""
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if isinstance(chosen, str):
        if not prompt:
            return {"text": chosen}, {"text": rejected}, 1
        return {"prompt": prompt, "completion": chosen}, {"prompt": prompt, "completion": rejected}, 1
    turns = max(1, sum(1 for m in chosen if m["role"] == "assistant"))
    runs = max(turns, sum(1 for m in rejected if m["role"] == "assistant"))
    return {"messages": list(prompt) + list(chosen)}, {"messages": list(prompt) + list(rejected)}, runs


def pair_loss(loss_type: str, beta: float, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
              chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """Per-pair losses and rewards (see the module doc). All inputs ``(n,)`` fp32: summed response
    log-probs (nats) and response token counts. Returns ``(losses, chosen_rewards, rejected_rewards)``,
    each ``(n,)``; rewards are detached. Raises ``ValueError`` for an unknown ``loss_type``."""
    if loss_type == "orpo":
        a, b = chosen_logps / chosen_tokens.clamp(min=1), rejected_logps / rejected_tokens.clamp(min=1)
        log_odds = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
        return -a - beta * F.logsigmoid(log_odds), beta * a.detach(), beta * b.detach()
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; one of {LOSS_TYPES}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class Judge(School):
    """Paired preferences: DPO (``sigmoid``), IPO (``ipo``) or ORPO (``orpo``, no reference).

    Items: :class:`PairItem`; a step is ``micro_batch_size x gradient_accumulation_steps`` pairs (no packing);
    :meth:`loss_sum` sums the per-pair losses (divided by the step's pairs); reference values ``(n, 2)``:
    ``(c^ref, r^ref)`` in nats."""

    metric_names = METRICS

    def __init__(self, rule: QuestRule, loss_type: str = "sigmoid"):
        super().__init__(rule)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; one of {LOSS_TYPES}")
        self.loss_type = loss_type
        self.name = {"sigmoid": "dpo", "ipo": "ipo", "orpo": "orpo"}[loss_type]
        self.needs_reference = loss_type != "orpo"
        self.beta = rule.beta

    def encode(self, example: dict, tokenizer, max_length: int, line: int) -> PairItem:
        chosen, rejected, runs = side_examples(example)
        sides = []
        for side in (chosen, rejected):
            tokens = tokenize_example(side, tokenizer, max_length, line)
            if "messages" in side:
                tokens.labels = keep_last_runs(tokens.labels, runs)
            sides.append(tokens)
        return PairItem(sides[0], sides[1], line)

    def collate(self, engine: Engine, rows: list[list[PairItem]]) -> PairBatch:
        items = [row[0] for row in rows]
        seqs = [s for item in items for s in item.sequences]
        batch, index = collate_sequences(engine, seqs)
        lengths = torch.tensor([trained_tokens(s) for s in seqs], dtype=torch.float32)
        ref = torch.stack([item.ref for item in items]) if self.needs_reference else None
        return PairBatch(items, batch, index, lengths, ref)

    def denominator(self, batches: list[PairBatch]) -> int:
        return sum(len(b.items) for b in batches)

    def tokens(self, batches: list[PairBatch]) -> int:
        return sum(b.batch.num_tokens for b in batches)

    def _logps(self, engine: Engine, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        (logps,) = sequence_logps(engine, b.batch, b.index, 2 * len(b.items))
        return logps[0::2], logps[1::2]

    def loss_sum(self, engine: Engine, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = self._logps(engine, b)
        device = chosen.device
        lengths = b.lengths.to(device)
        ref = b.ref.to(device) if b.ref is not None else None
        losses, chosen_rewards, rejected_rewards = pair_loss(
            self.loss_type, self.beta, chosen, rejected, None if ref is None else ref[:, 0],
            None if ref is None else ref[:, 1], lengths[0::2], lengths[1::2])
        n = torch.tensor(float(len(b.items)), device=device)
        values = torch.stack([chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards - rejected_rewards).sum(),
                              (chosen_rewards > rejected_rewards).float().sum(), chosen.detach().sum(),
                              rejected.detach().sum()])
        return losses.sum(), torch.stack([values, n.expand(len(values))], dim=1)

    @torch.no_grad()
    def reference_values(self, engine: Engine, items: list[PairItem]) -> torch.Tensor:
        out = []
        for i in range(0, len(items), engine.micro_batch_size):
            b = self.collate_without_ref(engine, items[i:i + engine.micro_batch_size])
            chosen, rejected = self._logps(engine, b)
            out.append(torch.stack([chosen, rejected], dim=1).float().cpu())
        return torch.cat(out) if out else torch.zeros((0, 2))

    def collate_without_ref(self, engine: Engine, items: list[PairItem]) -> PairBatch:
        seqs = [s for item in items for s in item.sequences]
        batch, index = collate_sequences(engine, seqs)
        lengths = torch.tensor([trained_tokens(s) for s in seqs], dtype=torch.float32)
        return PairBatch(items, batch, index, lengths, None)
