"""Checkpoint retention as a pure function: (checkpoints, policy, now) -> what to keep, remove and strip.

:func:`plan_retention` reads nothing and changes nothing; :mod:`management.vault_ops` gathers the facts
and applies the plan. Every decision carries its reasons, so ``vault prune --dry-run`` can say exactly why
each checkpoint stays or goes.

Guarantees (property-tested in ``tests/management/test_retention.py``):

- the latest checkpoint (highest global step: the resume point), the best one (lowest ``eval_loss`` among
  checkpoints that have one, else lowest ``loss``; newest on ties: the vault's definition, see
  :func:`core.vault.list_checkpoints_info`) and every pinned one are never removed;
- every removal has a reason; keep and remove partition the input;
- optimizer state is stripped only from kept checkpoints older than the newest ``keep_optimizer_last`` kept
  ones, and never from the latest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

SECONDS_PER_HOUR = 3600.0


class KeepReason(str, Enum):
    """Why a checkpoint is kept (one checkpoint may have several)."""

    LATEST = "latest"            # the resume point
    BEST = "best"                # lowest eval_loss, else loss (the vault's "best")
    PINNED = "pinned"
    KEEP_LAST = "keep_last"
    KEEP_EVERY_STEPS = "keep_every_steps"
    KEEP_BEST = "keep_best"      # among the N best by the policy's metric
    KEEP_WITHIN_HOURS = "keep_within_hours"


PROTECTED = frozenset({KeepReason.LATEST, KeepReason.BEST, KeepReason.PINNED})


@dataclass(frozen=True)
class CheckpointFacts:
    """What retention needs to know about one checkpoint.

    ``step``: global step (unique); ``time``: unix seconds it was saved; ``loss``/``eval_loss``: finite
    floats or None; ``size_bytes``: bytes on disk; ``optimizer_bytes``: bytes of its optimizer state
    (0 when already stripped or unknown); ``has_optimizer``: whether the optimizer state is still there.
    """

    name: str
    step: int
    time: float
    loss: float | None = None
    eval_loss: float | None = None
    pinned: bool = False
    has_optimizer: bool = True
    size_bytes: int = 0
    optimizer_bytes: int = 0


@dataclass(frozen=True)
class RetentionPolicy:
    """Retention rules (see ``retention`` in config.json). Counts >= 0; 0 disables a rule, except
    ``keep_last`` and ``keep_optimizer_last`` (>= 1)."""

    keep_last: int = 3
    keep_every_steps: int = 0
    keep_best: int = 1
    best_metric: str = "eval_loss"
    keep_within_hours: float = 0.0
    keep_optimizer_last: int = 2

    def __post_init__(self):
        if self.keep_last < 1 or self.keep_optimizer_last < 1:
            raise ValueError("keep_last and keep_optimizer_last must be >= 1")
        if self.keep_every_steps < 0 or self.keep_best < 0 or self.keep_within_hours < 0:
            raise ValueError("keep_every_steps, keep_best and keep_within_hours must be >= 0")
        if self.best_metric not in ("eval_loss", "loss"):
            raise ValueError(f"best_metric must be eval_loss or loss, not {self.best_metric!r}")

    @classmethod
    def from_config(cls, retention) -> RetentionPolicy:
        """From :class:`core.config.RetentionConfig`."""
        return cls(keep_last=retention.keep_last, keep_every_steps=retention.keep_every_steps,
                   keep_best=retention.keep_best, best_metric=retention.best_metric,
                   keep_within_hours=retention.keep_within_hours,
                   keep_optimizer_last=retention.keep_optimizer_last)


@dataclass(frozen=True)
class Decision:
    """One checkpoint's fate. ``reasons``: why it is kept (:class:`KeepReason` values) or, for a removal,
    one sentence why no rule keeps it."""

    name: str
    step: int
    reasons: tuple[str, ...]
    size_bytes: int = 0


@dataclass(frozen=True)
class RetentionPlan:
    """``keep``/``remove``/``strip_optimizer``, each oldest first. ``strip_optimizer`` is a subset of
    ``keep``. ``bytes_freed``: estimated bytes freed by applying the plan."""

    keep: tuple[Decision, ...] = ()
    remove: tuple[Decision, ...] = ()
    strip_optimizer: tuple[Decision, ...] = ()
    bytes_freed: int = 0

    def to_dict(self) -> dict:
        def rows(ds):
            return [{"name": d.name, "step": d.step, "reasons": list(d.reasons), "size_bytes": d.size_bytes}
                    for d in ds]
        return {"keep": rows(self.keep), "remove": rows(self.remove),
                "strip_optimizer": rows(self.strip_optimizer), "bytes_freed": self.bytes_freed}


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def best_checkpoint(checkpoints: list[CheckpointFacts]) -> CheckpointFacts | None:
    """Lowest finite ``eval_loss`` among those that have one, else lowest ``loss``; newest on ties; None
    when no checkpoint has a metric (same rule as :func:`core.vault.list_checkpoints_info`)."""
    for metric in ("eval_loss", "loss"):
        scored = [c for c in checkpoints if _finite(getattr(c, metric))]
        if scored:
            return min(scored, key=lambda c: (getattr(c, metric), -c.step))
    return None


def _ranked_by(checkpoints: list[CheckpointFacts], metric: str) -> list[CheckpointFacts]:
    """Checkpoints with a finite ``metric``, best first (newest on ties); eval_loss falls back to loss
    when no checkpoint has one."""
    scored = [c for c in checkpoints if _finite(getattr(c, metric))]
    if not scored and metric == "eval_loss":
        return _ranked_by(checkpoints, "loss")
    return sorted(scored, key=lambda c: (getattr(c, metric), -c.step))


def _removal_reason(policy: RetentionPolicy) -> str:
    parts = [f"not among the newest {policy.keep_last}"]
    if policy.keep_every_steps:
        parts.append(f"global step not a multiple of {policy.keep_every_steps}")
    if policy.keep_best:
        parts.append(f"not among the {policy.keep_best} best by {policy.best_metric}")
    if policy.keep_within_hours:
        parts.append(f"older than {policy.keep_within_hours:g} h")
    parts.append("not latest, best or pinned")
    return "; ".join(parts)


def plan_retention(checkpoints: list[CheckpointFacts], policy: RetentionPolicy, now: float) -> RetentionPlan:
    """Decide which checkpoints to keep, remove, and strip of optimizer state.

    ``checkpoints``: in any order, unique steps; ``now``: unix seconds (for ``keep_within_hours``).
    Pure: no I/O, no clock. Raises ``ValueError`` on duplicate steps.
    """
    ordered = sorted(checkpoints, key=lambda c: c.step)
    if len({c.step for c in ordered}) != len(ordered):
        raise ValueError("duplicate global steps among checkpoints")
    if not ordered:
        return RetentionPlan()
    reasons: dict[int, list[str]] = {c.step: [] for c in ordered}

    def keep(c: CheckpointFacts, why: KeepReason) -> None:
        if why.value not in reasons[c.step]:
            reasons[c.step].append(why.value)

    keep(ordered[-1], KeepReason.LATEST)
    best = best_checkpoint(ordered)
    if best is not None:
        keep(best, KeepReason.BEST)
    for c in ordered:
        if c.pinned:
            keep(c, KeepReason.PINNED)
        if policy.keep_every_steps and c.step % policy.keep_every_steps == 0:
            keep(c, KeepReason.KEEP_EVERY_STEPS)
        if policy.keep_within_hours and now - c.time <= policy.keep_within_hours * SECONDS_PER_HOUR:
            keep(c, KeepReason.KEEP_WITHIN_HOURS)
    for c in ordered[-policy.keep_last:]:
        keep(c, KeepReason.KEEP_LAST)
    for c in _ranked_by(ordered, policy.best_metric)[:policy.keep_best]:
        keep(c, KeepReason.KEEP_BEST)

    removal = _removal_reason(policy)
    kept = [c for c in ordered if reasons[c.step]]
    removed = [c for c in ordered if not reasons[c.step]]
    newest_with_optimizer = {c.step for c in kept[-policy.keep_optimizer_last:]}
    strip = [c for c in kept if c.has_optimizer and c.step not in newest_with_optimizer]
    freed = sum(c.size_bytes for c in removed) + sum(c.optimizer_bytes for c in strip)
    return RetentionPlan(
        keep=tuple(Decision(c.name, c.step, tuple(reasons[c.step]), c.size_bytes) for c in kept),
        remove=tuple(Decision(c.name, c.step, (removal,), c.size_bytes) for c in removed),
        strip_optimizer=tuple(Decision(c.name, c.step, (f"older than the newest {policy.keep_optimizer_last} "
                                                        "kept checkpoints",), c.optimizer_bytes) for c in strip),
        bytes_freed=freed)
