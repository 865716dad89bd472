"""Training faults the engine recovers from: non-finite losses (rollback) and CUDA out-of-memory.

**Non-finite loss.** The engine skips a step whose loss or gradient norm is NaN/Inf. After
``training.max_nonfinite_steps`` such steps in a row it rolls back: the weights, optimizer, scheduler and
RNG of the newest loadable checkpoint are reloaded (:meth:`core.engine.Engine.setup`), the ledger forgets
the steps after it (:meth:`core.ledger.Ledger.rollback_to`), the learning rate is multiplied by
``training.nonfinite_lr_factor`` and :class:`TrainingRolledBack` is raised, so the caller restarts the
quest from the ledger's ``examples_trained`` (the daemon does). The learning-rate scale is kept in the
ledger (key ``lr_scale/<hero>``, see :func:`load_lr_scale`), so it survives restarts; changing
``training.learning_rate`` resets it.

**CUDA out of memory** (``torch.OutOfMemoryError``): the engine halves its micro-batch (rows per forward
pass) and so doubles gradient accumulation: the optimizer step still takes the same rows, so tokens per
step, step boundaries and the resumed cursor are unchanged. At ``micro_batch_size`` 1 the error is raised.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from core.ledger import Ledger

LR_SCALE_KEY_PREFIX = "lr_scale/"


class TrainingRolledBack(RuntimeError):
    """Raised by :meth:`core.engine.Engine.train_quest` after a rollback to the last good checkpoint.

    The engine is ready again (at ``to_step``); restart the quest from the ledger's ``examples_trained``.
    ``from_step``/``to_step``: global steps before and after; ``lr_scale``: the new learning-rate scale.
    """

    def __init__(self, message: str, *, quest_id: int, from_step: int, to_step: int, lr_scale: float):
        super().__init__(message)
        self.quest_id, self.from_step, self.to_step, self.lr_scale = quest_id, from_step, to_step, lr_scale


class NonFiniteLossError(RuntimeError):
    """Raised when the loss stays non-finite after ``training.max_nonfinite_rollbacks`` rollbacks in a row
    without one good step in between (the data or the checkpoint itself is probably at fault)."""


def lr_scale_key(hero_name: str) -> str:
    return LR_SCALE_KEY_PREFIX + hero_name


def load_lr_scale(ledger: Ledger, hero_name: str, learning_rate: float) -> float:
    """The learning-rate scale (0 < scale <= 1) kept for ``hero_name``; 1.0 when none is kept or it was
    kept for another ``training.learning_rate`` (the user changed the rate: theirs wins, with an event)."""
    kept: dict[str, Any] | None = ledger.get_value(lr_scale_key(hero_name))
    if not kept:
        return 1.0
    if kept.get("learning_rate") != learning_rate:
        ledger.set_value(lr_scale_key(hero_name), None)
        ledger.event("lr_scale_reset", f"training.learning_rate changed ({kept.get('learning_rate')} -> "
                     f"{learning_rate}): the reduction by earlier non-finite rollbacks is dropped")
        return 1.0
    return float(kept.get("scale", 1.0))


def store_lr_scale(ledger: Ledger, hero_name: str, scale: float, learning_rate: float, global_step: int) -> None:
    """Keep ``scale`` for ``hero_name`` (applies while ``training.learning_rate`` stays ``learning_rate``)."""
    ledger.set_value(lr_scale_key(hero_name), {"scale": scale, "learning_rate": learning_rate,
                                               "global_step": global_step})


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver (after an out-of-memory error)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
