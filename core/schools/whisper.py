"""Whisper: distillation from a teacher model with the hero's tokenizer, on SFT-format quests.

For each loss-carrying token position *t* (labels != -100: the response tokens, as Scribe trains them) let
``s_t`` and ``q_t`` be the student's (the hero's) and the teacher's logits over the vocabulary, ``T`` the
rule's ``temperature``, ``p^S_t = softmax(s_t / T)``, ``p^T_t = softmax(q_t / T)``, ``y_t`` the data's token:

* ``loss_type: kl`` (the default) -- forward KL at temperature T (Hinton et al. 2015, "Distilling the
  Knowledge in a Neural Network", with their ``T^2`` gradient scale):
  ``D_t = T^2 * KL(p^T_t || p^S_t) = T^2 * sum_v p^T_t(v) (log p^T_t(v) - log p^S_t(v))``
* ``loss_type: jsd`` -- generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024, eq. 1; TRL's
  ``GKDTrainer.generalized_jsd_loss``, same ``beta``), with ``M = beta p^T_t + (1 - beta) p^S_t``:
  ``D_t = T^2 * (beta KL(p^T_t || M) + (1 - beta) KL(p^S_t || M))``; ``beta = 1`` is the reverse KL
  ``T^2 KL(p^S_t || p^T_t)`` (as TRL). ``beta`` defaults to 0.5 (TRL's) when the rule does not set it.

The step's loss is ``sum_t [alpha D_t + (1 - alpha) CE_t] / N`` over the step's N loss-carrying tokens,
``CE_t = -log softmax(s_t)(y_t)`` (``alpha`` = 1: distillation only, 0: exactly Scribe's SFT loss); the
school returns the sum and the engine divides by the step's token count (:meth:`Whisper.denominator`), so
gradient accumulation stays exact. This is off-policy distillation on the quest's text (TRL's GKD with
``lmbda = 0``: no student-generated sequences). ``alpha`` weighs the distillation term as in Hinton et
al.; at ``T = 1``, ``beta``-JSD with ``alpha = 1`` is TRL's ``generalized_jsd_loss`` summed over tokens.

Metrics (per loss-carrying token, means over the step): ``distill/kl`` = ``KL(softmax(q_t) || softmax(s_t))``
at ``T = 1`` (nats, whatever ``T`` and ``loss_type``: the student's distance to the teacher itself) and
``distill/ce`` = ``CE_t`` (nats). Held-out ``eval_loss``: the same objective on the eval records.

**The teacher** (:mod:`core.schools.teacher`: which folder, same tokenizer) is loaded once per quest when
its first step runs -- in eval mode, ``requires_grad`` off, forward passes under ``torch.no_grad`` -- and
freed with the school at the quest's end. If teacher and hero have different logit counts (a padded
vocabulary), the divergence uses the first ``min`` of both (the tokenizer's tokens come first).

**Memory**: a second model's weights on the hero's device, in the training precision (bf16 on a bf16 GPU,
else fp32: 4 bytes per teacher parameter) and no gradients or optimizer state; per micro-batch, the
teacher's logits ``(B, L, V)`` and a few ``(N, V)`` fp32 tensors over the N loss-carrying tokens (the
student's probabilities at T and at 1, the teacher's). E.g. a 0.5B teacher: 2 GB fp32 / 1 GB bf16 more.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from core.chat import IGNORE_INDEX
from core.packing import PACKED_SDPA, Batch, model_attention_mask
from core.schools.base import School
from core.schools.scribe import Scribe
from core.schools.teacher import TeacherError, resolve_teacher, tokenizer_problem

if TYPE_CHECKING:
    from core.engine import Engine

LOSS_TYPES = ("kl", "jsd")
DEFAULT_JSD_BETA = 0.5
"""TRL's ``GKDConfig.beta`` default, used when the rule does not set ``beta``."""


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_type: str = "kl",
               beta: float = DEFAULT_JSD_BETA, temperature: float = 1.0) -> torch.Tensor:
    """Per-token distillation term ``D_t`` (see the module doc), ``T^2``-scaled, in nats: ``(N,)`` fp32 for
    logits ``(N, V)`` (student with grad, teacher without; ``V`` may differ: the first ``min`` are used).
    ``loss_type`` ``kl``: ``T^2 KL(p^T || p^S)``; ``jsd``: TRL's generalized JSD with ``beta`` in (0, 1].
    Raises ``ValueError`` for an unknown ``loss_type``."""
    v = min(student_logits.size(-1), teacher_logits.size(-1))
    s = F.log_softmax(student_logits[..., :v].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[..., :v].float() / temperature, dim=-1)
    if loss_type == "kl":
        d = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    elif loss_type == "jsd":
        if beta >= 1:
            d = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
        else:
            b = torch.tensor(beta, dtype=s.dtype, device=s.device)
            m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
            d = (b * F.kl_div(m, t, reduction="none", log_target=True)
                 + (1 - b) * F.kl_div(m, s, reduction="none", log_target=True)).sum(-1)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; one of {LOSS_TYPES}")
    return d * temperature ** 2


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` per row at temperature 1 (nats), ``(N,)`` fp32, no grad."""
    with torch.no_grad():
        return divergence(student_logits.detach(), teacher_logits, "kl", temperature=1.0)


class Whisper(Scribe):
    """Distillation (see the module doc). Items, steps and batches as Scribe's (SFT formats, packed rows);
    :meth:`loss_sum`: ``sum_t alpha D_t + (1 - alpha) CE_t`` over the batch's loss-carrying tokens, divided by
    the step's. The teacher is held in :attr:`teacher` from the quest's first forward pass on."""

    name = "distill"
    metric_names = ("distill/kl", "distill/ce")

    def __init__(self, rule):
        super().__init__(rule)
        self.loss_type = rule.loss_type or "kl"
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r} for school distill; one of {LOSS_TYPES}")
        self.beta = rule.beta if "beta" in rule.model_fields_set else DEFAULT_JSD_BETA
        self.temperature, self.alpha = rule.temperature, rule.alpha
        self.teacher: Any = None
        self._teacher_attn: str | None = None

    # --- the teacher ---------------------------------------------------------------------------------
    def load_teacher(self, engine: Engine) -> None:
        """Resolve and load the rule's teacher onto the engine's device (once; eval mode, no grad), with the
        engine's attention path. Records a ``teacher_loaded`` ledger event with its size. Raises
        :class:`core.schools.teacher.TeacherError` (not found, another tokenizer, too few logits) or
        :class:`core.hero.HeroError` (weights do not load)."""
        from core.hero import count_parameters, load_model, load_tokenizer

        if self.teacher is not None:
            return
        folder, what = resolve_teacher(engine.realm, engine.config, self.rule.teacher)
        problem = tokenizer_problem(engine.tokenizer, load_tokenizer(folder, engine.config.hero))
        if problem:
            raise TeacherError(f"teacher {self.rule.teacher!r} ({what}) has another tokenizer than the hero: "
                               f"{problem}")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine.mixed_precision, torch.float32)
        model = load_model(folder, engine.config.hero, dtype)
        model.requires_grad_(False)
        model.eval()
        model.config.use_cache = False
        model.to(engine.device)
        head = model.get_output_embeddings()
        if (head.weight.shape[0] if head is not None else model.config.vocab_size) < len(engine.tokenizer):
            raise TeacherError(f"teacher {self.rule.teacher!r} ({what}) has fewer output logits than the hero's "
                               f"tokenizer has tokens ({len(engine.tokenizer):,})")
        attn = getattr(model.config, "_attn_implementation", None)
        if engine.attn_implementation == PACKED_SDPA:
            try:  # the batches carry their documents as segments (core.packing): the teacher must read them
                model.set_attn_implementation(PACKED_SDPA)
            except Exception as exc:  # noqa: BLE001 - e.g. an architecture without SDPA support
                raise TeacherError(f"teacher {self.rule.teacher!r} ({what}) cannot use SDPA attention, which "
                                   f"packed batches need on this device: {type(exc).__name__}: {exc}") from None
            attn = PACKED_SDPA
        self.teacher, self._teacher_attn = model, attn
        n = count_parameters(model)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        engine.ledger.event("teacher_loaded", f"teacher {what} loaded for distillation ({n:,} parameters, "
                            f"{size / 2 ** 20:,.1f} MiB {str(dtype).removeprefix('torch.')} on {engine.device})",
                            teacher=str(folder), parameters=n, bytes=size)

    def other_model_bytes(self, engine: Engine) -> int:
        """The teacher's weights in the training precision (from its folder's shape when not loaded yet) and
        its fp32 logits of one micro-batch (``micro_batch_size x max_length x vocab`` x 4 bytes). Raises what
        :func:`core.schools.teacher.resolve_teacher` or :func:`core.memory.shape_from_folder` raise."""
        from core.memory import shape_from_folder

        if self.teacher is not None:
            weights = sum(p.numel() * p.element_size() for p in self.teacher.parameters())
            vocab = self.teacher.config.vocab_size
        else:
            folder, _ = resolve_teacher(engine.realm, engine.config, self.rule.teacher)
            shape = shape_from_folder(folder)
            weights = shape.parameters * (2 if engine.mixed_precision in ("bf16", "fp16") else 4)
            vocab = shape.vocab_size
        t = engine.config.training
        return int(weights + t.micro_batch_size * t.max_length * vocab * 4)

    def teacher_logits(self, engine: Engine, b: Batch) -> torch.Tensor:
        """The teacher's logits ``(B, L, V_teacher)`` for a batch on the engine's device (no grad)."""
        self.load_teacher(engine)
        if self._teacher_attn == PACKED_SDPA:
            extra: dict[str, Any] = {"attention_mask": None, "packed_segments": b.segments}
        else:
            dtype = next(self.teacher.parameters()).dtype
            extra = {"attention_mask": model_attention_mask(b.attention_mask, self._teacher_attn, dtype)}
        with torch.no_grad():
            return self.teacher(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False, **extra).logits

    # --- the objective ---------------------------------------------------------------------------------
    def start_step(self, engine: Engine, batches: list[Batch]) -> None:
        self.load_teacher(engine)  # before the step's forward passes: a missing teacher fails the step cleanly

    def loss_sum(self, engine: Engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch.to(engine.device)
        logits = engine.logits(b)  # (B, L, V)
        targets = F.pad(b.labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # position t predicts t + 1
        keep = targets != IGNORE_INDEX
        student = logits.reshape(-1, logits.size(-1))[keep].float()  # (N, V), N loss-carrying tokens
        teacher = self.teacher_logits(engine, b)
        teacher = teacher.reshape(-1, teacher.size(-1))[keep]
        ce = F.cross_entropy(student, targets[keep], reduction="none")  # (N,)
        if self.alpha > 0:
            d = divergence(student, teacher, self.loss_type, self.beta, self.temperature)
            loss = self.alpha * d.sum() + (1 - self.alpha) * ce.sum()
        else:
            d, loss = None, ce.sum()
        same = d is not None and self.loss_type == "kl" and math.isclose(self.temperature, 1.0)
        kl = d.detach() if same else forward_kl(student, teacher)
        n = keep.sum().float()
        return loss, torch.stack([torch.stack([kl.sum(), n]), torch.stack([ce.detach().sum(), n])])

    evaluate = School.evaluate  # the objective on the eval records (not Scribe's plain cross-entropy)
