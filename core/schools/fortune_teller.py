"""Fortune Teller (the Oracle school): SFT whose per-token loss is weighted by the hero's own surprise.

For a trainable token at position *t* (target ``y_t``, the model's next-token distribution ``p_t`` over
the vocabulary, computed by the same forward pass, without gradient), the surprise ``s_t`` is, by the
rule's ``weighting``:

* ``entropy``:    ``s_t = H(p_t) = -sum_v p_t(v) log p_t(v)`` (nats) -- how unsure the hero is;
* ``confidence``: ``s_t = 1 - p_t(y_t)`` -- how little it expected the right token;
* ``margin``:     ``s_t = 1 - (p_t(v_1) - p_t(v_2))``, ``v_1``, ``v_2`` its two likeliest tokens -- how
  undecided it is between its top guesses.

The weights are normalised over the trainable tokens of each micro-batch so their mean is 1:
``w_t = (s_t + eps) / mean_k (s_k + eps)`` with ``eps = 1e-6`` (so a batch the hero is certain about is
plain SFT), and the loss is ``sum_t w_t CE_t`` divided by the step's trainable tokens, as Scribe's (with
every ``w_t = 1`` it is Scribe's loss). Related to focal loss (Lin et al. 2017) and entropy-weighted
token losses; the weights carry no gradient. Metric: ``surprise`` (mean ``s_t``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from core.chat import IGNORE_INDEX
from core.packing import Batch
from core.schools.scribe import Scribe

if TYPE_CHECKING:
    from core.engine import Engine

EPS = 1e-6
WEIGHTINGS = ("entropy", "confidence", "margin")


def surprise(logits: torch.Tensor, targets: torch.Tensor, weighting: str) -> torch.Tensor:
    """``s_t`` (see the module doc) for ``logits`` ``(N, V)`` and ``targets`` ``(N,)``; fp32 ``(N,)``, no grad.
    Raises ``ValueError`` for an unknown ``weighting``."""
    with torch.no_grad():
        logp = F.log_softmax(logits.float(), dim=-1)
        if weighting == "entropy":
            return -(logp.exp() * logp).sum(dim=-1)
        if weighting == "confidence":
            return 1 - logp.gather(1, targets.clamp(min=0)[:, None])[:, 0].exp()
        if weighting == "margin":
            top = logp.topk(2, dim=-1).values.exp()
            return 1 - (top[:, 0] - top[:, 1])
    raise ValueError(f"unknown weighting {weighting!r}; one of {WEIGHTINGS}")


def token_weights(logits: torch.Tensor, targets: torch.Tensor, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, surprise)`` ``(N,)`` over positions with ``targets != -100`` (others 0): mean weight 1
    over the trained positions."""
    trained = targets != IGNORE_INDEX
    s = surprise(logits, targets, weighting) * trained
    n = trained.sum().clamp(min=1)
    mean = ((s + EPS) * trained).sum() / n
    return (s + EPS) * trained / mean, s


class FortuneTeller(Scribe):
    """Surprise-weighted SFT (packed rows as Scribe); the rule's ``weighting`` picks the surprise."""

    name = "fortune_teller"
    metric_names = ("surprise",)

    def loss_sum(self, engine: Engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch.to(engine.device)
        logits = engine.logits(b)
        targets = F.pad(b.labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        flat = logits.float().reshape(-1, logits.size(-1))
        ce = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="none")
        weights, s = token_weights(flat, targets, self.rule.weighting)
        n = (targets != IGNORE_INDEX).sum().float()
        return (weights * ce).sum(), torch.stack([torch.stack([s.sum(), n])])
