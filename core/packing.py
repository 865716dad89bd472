"""Sequence packing with no attention across packed examples.

Examples are placed greedily, in order, into rows of ``max_length`` tokens; an example is never split
(it was truncated to ``max_length`` before). Each packed example gets position ids restarting at 0, and
each row a 4D block-diagonal causal mask, so every example sees only itself: its logits equal those of
the example run alone (measured in ../shared/MEASURED.md; tested in tests/core/test_packing.py).
Position ids alone are not enough with SDPA: transformers only derives a packed mask from position ids
for FlashAttention kernels.

transformers 5.23 (``masking_utils._preprocess_mask_arguments``) passes a 4D mask of shape
``(batch, 1, query_length, kv_length)`` to the attention function unchanged. SDPA takes a bool mask
(True = attend); eager attention *adds* the mask to the scores, so it needs an additive float mask (0 or
the dtype's minimum). :func:`model_attention_mask` converts for the model's attention implementation.

Padding positions have label -100 and attend only to themselves (so no softmax row is empty, which
would give NaN), and no real token attends to them.

**Segmented attention** (:data:`PACKED_SDPA`, used by the engine on CPU): instead of the 4D mask, each
batch also carries its rows' document lengths (:attr:`Batch.segments`) and
:func:`packed_sdpa_attention` runs causal SDPA on each document's slice of the row. Same result for
every real token (each document attends causally to itself only, the trailing pads join the row's last
document: causally, no real token sees them), at a fraction of the cost: the dense masked kernel computes
all ``L x L`` scores of a row, the causal kernel on a document of ``n`` tokens about ``n^2 / 2``; a
micro-batch whose rows each hold one example is a single causal SDPA call, as without packing. With
segmented attention the rows need no padding either: :func:`collate_flat` lays a micro-batch's rows end
to end as one row of real tokens (the rows still decide which examples make each optimizer step).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from core.chat import IGNORE_INDEX, TokenizedExample

T = TypeVar("T", bound=TokenizedExample)

_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

PACKED_SDPA = "sdpa_packed"
"""Name of the segmented attention implementation (:func:`packed_sdpa_attention`) in transformers'
attention registry, after :func:`register_packed_sdpa`."""


@dataclass
class Batch:
    """One micro-batch. Shapes: ``input_ids``, ``labels``, ``position_ids``: (B, L) int64;
    ``attention_mask``: (B, 1, L, L) bool, True = may attend. ``num_tokens`` (real, non-pad tokens) and
    ``num_trainable`` (labels != -100) are host ints, so no device sync is needed to read them.
    ``segments``: per row, the lengths (tokens) of its documents, the last one extended over the row's
    padding, summing to L (for :func:`packed_sdpa_attention`)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None from collate_flat (segmented attention only)
    num_tokens: int
    num_trainable: int
    segments: tuple[tuple[int, ...], ...] | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.position_ids.to(device, non_blocking=True),
                     None if self.attention_mask is None else self.attention_mask.to(device, non_blocking=True),
                     self.num_tokens, self.num_trainable, self.segments)


def iter_steps(examples: Iterable[T], rows_per_step: int, max_length: int,
               packing: bool = True) -> Iterator[list[list[T]]]:
    """Group a stream of examples into optimizer steps of at most ``rows_per_step`` rows.

    With ``packing``, a row takes examples in order while their total length fits ``max_length``
    tokens; a step ends when its rows are full and the next example does not fit. Without packing,
    each example is its own row. Yields each step as a list of rows (lists of examples). Boundaries
    depend only on the stream from where it starts, so resuming at a step boundary gives the same steps.
    Raises ``ValueError`` for an example longer than ``max_length`` (truncate before packing).
    """
    rows: list[list[T]] = []
    used = 0  # tokens in the last row
    for ex in examples:
        n = len(ex.input_ids)
        if n > max_length:
            raise ValueError(f"example at line {ex.line} has {n} tokens > max_length {max_length}")
        if rows and packing and used + n <= max_length:
            rows[-1].append(ex)
            used += n
            continue
        if len(rows) == rows_per_step:
            yield rows
            rows = []
        rows.append([ex])
        used = n
    if rows:
        yield rows


def pack_rows(examples: Iterable[T], max_length: int, packing: bool = True) -> list[list[T]]:
    """All ``examples`` greedily into rows (see :func:`iter_steps`); e.g. for evaluation."""
    return [row for step in iter_steps(examples, 1 << 62, max_length, packing) for row in step]


def collate(rows: list[list[TokenizedExample]], pad_token_id: int, pad_to: int | None = None) -> Batch:
    """Build a :class:`Batch` from rows of examples.

    ``pad_to`` (tokens): the row length L; None pads to the longest row. Raises ``ValueError`` when a
    row is longer than ``pad_to``.
    """
    lengths = [sum(len(ex.input_ids) for ex in row) for row in rows]
    L = pad_to if pad_to is not None else max(lengths, default=1)
    if max(lengths, default=0) > L:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit pad_to={L}")
    B = len(rows)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    # document id per position; pads get unique negative ids so they attend only to themselves
    seq = -torch.arange(1, L + 1, dtype=torch.long).repeat(B, 1)
    trainable = 0
    segments = []
    for b, row in enumerate(rows):
        pos = 0
        sizes = []
        for k, ex in enumerate(row):
            n = len(ex.input_ids)
            input_ids[b, pos:pos + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[b, pos:pos + n] = torch.tensor(ex.labels, dtype=torch.long)
            labels[b, pos] = IGNORE_INDEX  # never predict an example's first token from the previous one
            position_ids[b, pos:pos + n] = torch.arange(n)
            seq[b, pos:pos + n] = k
            trainable += sum(1 for x in ex.labels[1:] if x != IGNORE_INDEX)
            pos += n
            sizes.append(n)
        if sizes:
            sizes[-1] += L - pos  # the padding joins the last document (causal: no real token sees it)
        else:
            sizes = [L]
        segments.append(tuple(s for s in sizes if s))
    causal = torch.ones(L, L, dtype=torch.bool).tril_()
    mask = (seq[:, :, None] == seq[:, None, :]) & causal
    return Batch(input_ids, labels, position_ids, mask.unsqueeze(1), sum(lengths), trainable, tuple(segments))


def collate_flat(rows: list[list[TokenizedExample]]) -> Batch:
    """The micro-batch's rows laid end to end as one row of their real tokens: shapes (1, N), N = the
    examples' tokens (at most rows x max_length), no padding; ``attention_mask`` None and ``segments`` the
    example lengths, for :func:`packed_sdpa_attention`, which attends within each example only.

    The rows (and so which examples make each optimizer step, see :func:`iter_steps`) are the same as with
    :func:`collate`; only the padding is not computed. Labels, position ids and the loss are the same for
    every real token (the first token of each example is never predicted)."""
    examples = [ex for row in rows for ex in row]
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    trainable = 0
    for ex in examples:
        n = len(ex.input_ids)
        ids.extend(ex.input_ids)
        labels.append(IGNORE_INDEX)  # never predict an example's first token from the previous one
        labels.extend(ex.labels[1:])
        positions.extend(range(n))
        trainable += sum(1 for x in ex.labels[1:] if x != IGNORE_INDEX)
    segments = tuple(len(ex.input_ids) for ex in examples if len(ex.input_ids))
    as_row = (lambda xs: torch.tensor([xs], dtype=torch.long))  # noqa: E731
    return Batch(as_row(ids), as_row(labels), as_row(positions), None, len(ids), trainable, (segments or (0,),))


def model_attention_mask(mask: torch.Tensor, attn_implementation: str | None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The 4D bool mask ``(B, 1, L, L)`` in the form the model's attention implementation expects.

    ``sdpa``: bool as is. FlashAttention kernels: None (they detect packed examples from the position
    ids and run variable-length attention). Anything else (``eager``, custom code): additive float in
    ``dtype``, 0 where attending and ``finfo(dtype).min`` elsewhere.
    """
    impl = attn_implementation or "eager"
    if impl == PACKED_SDPA:  # the documents come as Batch.segments instead
        return None
    if impl == "sdpa":
        return mask
    if "flash" in impl:
        return None
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          packed_segments: tuple[tuple[int, ...], ...] | None = None, **kwargs):
    """A transformers attention function: causal SDPA per document of each packed row.

    ``query``: (B, H, L, D); ``key``/``value``: (B, H_kv, L, D); ``packed_segments``: per row the document
    lengths summing to L (:attr:`Batch.segments`), passed as a keyword argument of the model's forward.
    Returns ``((B, L, H, D) output, None)``. Without ``packed_segments`` (or with a mask, or a query
    shorter than the keys, as in generation with a cache) it is transformers' own SDPA attention.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    B, _, L, _ = query.shape
    if packed_segments is None or attention_mask is not None or key.shape[2] != L or len(packed_segments) != B:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    if gqa and not _SDPA_HAS_GQA:
        key, value = repeat_kv(key, query.shape[1] // key.shape[1]), repeat_kv(value, query.shape[1] // key.shape[1])
        gqa = False
    extra = {"enable_gqa": True} if gqa else {}
    if all(len(s) == 1 for s in packed_segments):  # one document per row: a plain causal batch
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
                                             **extra)
    else:
        rows = []
        # unbind/split, not slicing: their backward is one stack/concatenation, not a zero-filled tensor per piece
        for sizes, qb, kb, vb in zip(packed_segments, query.unbind(0), key.unbind(0), value.unbind(0), strict=True):
            parts = [F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, scale=scaling,
                                                    is_causal=q.shape[1] > 1, **extra)
                     for q, k, v in zip(qb.split(sizes, dim=1), kb.split(sizes, dim=1), vb.split(sizes, dim=1),
                                        strict=True)]
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
        out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> str:
    """Register :func:`packed_sdpa_attention` with transformers as :data:`PACKED_SDPA` (idempotent). The
    name has no mask function, so the model passes ``attention_mask`` through (None) and builds no causal
    mask. Returns the name, for ``model.set_attn_implementation``."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    return PACKED_SDPA


def micro_batches(rows: list[list[T]], micro_batch_size: int) -> list[list[list[T]]]:
    """Split a step's rows into consecutive micro-batches of at most ``micro_batch_size`` rows."""
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
