"""The :class:`School` interface the engine trains with, and the sequence log-probabilities the
preference schools share (:func:`sequence_logps`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from core.chat import IGNORE_INDEX, TokenizedExample
from core.config import QuestRule
from core.packing import PACKED_SDPA, collate, collate_flat

if TYPE_CHECKING:
    from core.engine import Engine


class School:
    """An objective on the one engine (see :mod:`core.schools`). Subclasses set ``name`` and implement
    :meth:`encode`, :meth:`loss_sum` and what differs; the engine calls, per quest and step:

    1. :meth:`encode` for every record (``(line, normalized example)`` -> an item with a ``line``);
    2. :meth:`steps` to group the items of the quest into optimizer steps (lists of rows of items);
       the cursor advances by the step's items, so boundaries must depend only on where it starts;
    3. per step: :meth:`collate` each micro-batch of rows, :meth:`denominator` of the step,
       :meth:`start_step`, then per micro-batch :meth:`loss_sum`; the engine back-propagates
       ``loss_sum / denominator`` (so the step's loss is the mean over the step, exact under gradient
       accumulation and OOM halving) and logs ``sum / count`` of each metric in :attr:`metric_names`.

    ``needs_reference``: the school compares against the hero as it was when the quest started; the engine
    gets :meth:`reference_values` once per quest and stores them (:mod:`core.schools.reference`).
    """

    name = "school"
    needs_reference = False
    #: metrics logged per step (TRL's names), in the order of :meth:`loss_sum`'s metric rows
    metric_names: tuple[str, ...] = ()
    #: what :meth:`denominator` counts, for the docs: "tokens" or "records"
    unit = "records"

    def __init__(self, rule: QuestRule):
        self.rule = rule

    def encode(self, example: dict, tokenizer, max_length: int, line: int) -> Any:
        raise NotImplementedError

    def steps(self, items: Iterable[Any], rows_per_step: int, max_length: int,
              packing: bool) -> Iterator[list[list[Any]]]:
        """Default: ``rows_per_step`` items per step, one item per row (no packing)."""
        step: list[list[Any]] = []
        for item in items:
            step.append([item])
            if len(step) == rows_per_step:
                yield step
                step = []
        if step:
            yield step

    def collate(self, engine: Engine, rows: list[list[Any]]) -> Any:
        return rows

    def denominator(self, batches: list[Any]) -> int:
        """What the step's summed loss is divided by (default: its records)."""
        return sum(len(rows) for rows in batches)

    def tokens(self, batches: list[Any]) -> int:
        """Tokens the step computed (for tokens/s)."""
        return sum(len(seq.input_ids) for rows in batches for row in rows for item in row for seq in item.sequences)

    #: :meth:`start_step` reads the whole step's rows (KTO's KL estimate): in a data-parallel group every rank
    #: then collates all of them for it; otherwise each rank collates only its own rows, once
    #: (:func:`core.distributed.collate_local`), e.g. Champion samples completions for its own prompts only.
    start_step_reads_all_rows = False

    def start_step(self, engine: Engine, batches: list[Any]) -> None:
        """Called before the step's micro-batches with them (with :attr:`start_step_reads_all_rows`, the whole
        step's; else, in a data-parallel group, this rank's)."""

    def loss_sum(self, engine: Engine, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(summed loss, metrics)``: a fp32 scalar with grad, and a ``(len(metric_names), 2)`` fp32 tensor
        of ``[sum, count]`` per metric (None without metrics)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, engine: Engine, items: list[Any]) -> float:
        """Mean loss per :meth:`denominator` unit over ``items`` (eval mode, no grad); NaN when empty."""
        if not items:
            return float("nan")
        engine.model.eval()
        try:
            total, n = 0.0, 0
            rows = [[item] for item in items]
            for i in range(0, len(rows), engine.micro_batch_size):
                batch = self.collate(engine, rows[i:i + engine.micro_batch_size])
                self.start_step(engine, [batch])
                loss, _ = self.loss_sum(engine, batch)
                total += float(loss)
                n += self.denominator([batch])
        finally:
            engine.model.train()
        return total / n if n else float("nan")

    def begin_quest(self, engine: Engine, quest_id: int, reference_path: Any, examples_done: int) -> None:
        """Called once per :meth:`core.engine.Engine.train_quest` before any step, with the quest's reference
        sidecar path (None: in memory only) and its cursor (Champion's quest-start reference weights)."""

    def other_model_bytes(self, engine: Engine) -> int:
        """Bytes of the models this school holds beside the hero during a quest (a teacher, a frozen reference
        copy) and of their per-micro-batch outputs, for the engine's memory estimate (:mod:`core.memory`)."""
        return 0

    def end_quest(self) -> None:
        """Called once when :meth:`core.engine.Engine.train_quest` returns or raises: release what the quest
        held (Champion: its frozen reference copy and sandboxed reward workers)."""

    def prepare_items(self, items: list[Any], group: int) -> None:
        """Called once per quest (reference schools) with the items in train order and the records per step."""

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Derived metrics from the step's means (e.g. KTO's ``rewards/margins``)."""
        return metrics

    def reference_values(self, engine: Engine, items: list[Any]) -> torch.Tensor:
        """``(len(items), k)`` fp32 values of the reference model (the current weights) for ``items``."""
        raise NotImplementedError

    def attach_reference(self, items: list[Any], values: torch.Tensor) -> None:
        for item, row in zip(items, values, strict=True):
            item.ref = row


def keep_last_runs(labels: list[int], runs: int) -> list[int]:
    """``labels`` with only its last ``runs`` contiguous runs of trained tokens kept (the response's
    assistant turns; an earlier assistant turn of a multi-turn prompt is context, not response)."""
    out = list(labels)
    seen = 0
    t = len(out) - 1
    while t >= 0:
        if out[t] != IGNORE_INDEX:
            seen += 1
            while t >= 0 and out[t] != IGNORE_INDEX:
                if seen > runs:
                    out[t] = IGNORE_INDEX
                t -= 1
        t -= 1
    return out


def collate_sequences(engine: Engine, seqs: list[TokenizedExample]) -> tuple[Any, torch.Tensor]:
    """A batch of whole sequences (one per row, no packing across them) for :func:`sequence_logps`, and
    the sequence index of each position (the shape of ``input_ids``, int64). On the CPU with segmented
    attention the sequences are laid end to end without padding (:func:`core.packing.collate_flat`)."""
    rows = [[s] for s in seqs]
    if engine.attn_implementation == PACKED_SDPA:
        batch = collate_flat(rows)
        lengths = torch.tensor([len(s.input_ids) for s in seqs])
        index = torch.repeat_interleave(torch.arange(len(seqs)), lengths)[None]
    else:
        batch = collate(rows, engine.tokenizer.pad_token_id or 0)
        index = torch.arange(len(seqs))[:, None].expand(batch.input_ids.shape)
    return batch, index


def sequence_logps(engine: Engine, batch: Any, index: torch.Tensor, n: int,
                   token_values: bool = False) -> tuple[torch.Tensor, ...]:
    """Summed log-probabilities (nats) of each sequence's trained tokens (labels != -100), shape ``(n,)``
    fp32 (with grad when enabled), through ``engine.logits`` (the engine's model and attention path).
    With ``token_values`` also ``(per-token log-probs (B, L), targets (B, L))`` as aligned with the logits."""
    b = batch.to(engine.device)
    logits = engine.logits(b)  # (B, L, V)
    targets = F.pad(b.labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts labels[t + 1]
    token_logps = -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none")  # (B*L,), 0 where ignored
    sums = torch.zeros(n, device=token_logps.device).index_add(0, index.to(token_logps.device).reshape(-1),
                                                              token_logps)
    if token_values:
        return sums, token_logps.view(targets.shape), targets, logits
    return (sums,)


def trained_tokens(seq: TokenizedExample) -> int:
    """Tokens of ``seq`` that carry loss (its response tokens)."""
    return sum(1 for x in seq.labels[1:] if x != IGNORE_INDEX)
