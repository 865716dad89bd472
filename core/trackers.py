"""Experiment trackers (``training.report_to``) through accelerate's tracking API.

The engine owns the ``Accelerator``; this module decides its tracking arguments and does the logging, so
the engine only calls :func:`accelerator_kwargs`, :func:`start`, :func:`log` and :func:`finish`::

    Accelerator(mixed_precision=..., **accelerator_kwargs(realm, config))  # log_with, project_dir=<realm>/runs
    start(accelerator, config, global_step)      # accelerator.init_trackers(hero name, ...)
    log(accelerator, {"loss": ..., "learning_rate": ...}, global_step)
    finish(accelerator)                          # accelerator.end_training(): flush and close

Metric names are the ledger's (``loss``, ``learning_rate``, ``grad_norm``, ``tokens_per_second``,
``eval_loss``) and the step is the ``global_step``. Local trackers write under ``<realm>/runs/<hero>/``
(TensorBoard: ``tensorboard --logdir <realm>/runs``). After a crash the engine resumes from an older
checkpoint: TensorBoard's writer is opened with ``purge_step = global_step + 1`` so the curve drops the
steps that were lost, as the ledger does. A tracker that fails never stops training: the error is logged
once and that call is skipped.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from core.config import RealmConfig
from core.realm import Realm

RUNS_FOLDER = "runs"
TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}
"""``training.report_to`` name -> packages any of which makes it available (accelerate's own checks)."""

log_ = logging.getLogger("core.trackers")


def installed(name: str) -> bool:
    return any(importlib.util.find_spec(pkg) is not None for pkg in TRACKER_PACKAGES[name])


def resolve_report_to(config: RealmConfig) -> tuple[list[str], list[str]]:
    """``(trackers to use, named but not installed)``. ``report_to`` null means tensorboard when installed."""
    wanted = config.training.report_to
    if wanted is None:
        return (["tensorboard"] if installed("tensorboard") else []), []
    names = list(dict.fromkeys(wanted))
    return [n for n in names if installed(n)], [n for n in names if not installed(n)]


def accelerator_kwargs(realm: Realm, config: RealmConfig) -> dict[str, Any]:
    """``log_with`` and ``project_dir`` for ``Accelerator(...)`` (empty when no tracker is used)."""
    use, _ = resolve_report_to(config)
    return {"log_with": use, "project_dir": str(realm.root / RUNS_FOLDER)} if use else {}


def start(accelerator, config: RealmConfig, global_step: int) -> list[str]:
    """Initialise the trackers of ``accelerator`` (run name: the hero's name). Returns warnings to report
    (trackers named in ``report_to`` but not installed, or failing to start)."""
    use, missing = resolve_report_to(config)
    warnings = [f"training.report_to names {name}, which is not installed (pip install "
                f"{TRACKER_PACKAGES[name][0]}): not reported there" for name in missing]
    if not use:
        return warnings
    hyperparameters = {k: v for k, v in config.training.model_dump().items()
                       if isinstance(v, (int, float, str, bool))}
    try:
        accelerator.init_trackers(config.hero.name, init_kwargs={"tensorboard": {"purge_step": global_step + 1}})
        for tracker in accelerator.trackers:
            if tracker.name != "tensorboard":  # TensorBoard would open one more run per start for them
                tracker.store_init_configuration(hyperparameters)
    except Exception as exc:  # noqa: BLE001 - a tracker never stops training
        log_.exception("starting the trackers %s failed", use)
        warnings.append(f"experiment trackers {use} could not start ({type(exc).__name__}: {exc}); training "
                        "goes on without them")
        accelerator.trackers = []
    return warnings


def log(accelerator, metrics: dict[str, float | None], global_step: int) -> None:
    """``accelerator.log`` of the finite metrics at ``global_step``; a failing tracker is logged and skipped."""
    if accelerator is None or not accelerator.trackers:
        return
    values = {k: float(v) for k, v in metrics.items() if v is not None and v == v and abs(v) != float("inf")}
    if not values:
        return
    try:
        accelerator.log(values, step=global_step)
    except Exception:  # noqa: BLE001
        log_.exception("logging to the trackers failed at global step %d", global_step)


def finish(accelerator) -> None:
    """Flush and close the trackers (what ``accelerator.end_training`` does, without destroying the process
    group: the engine of a data parallel rank is set up again after a rollback, in the same group)."""
    if accelerator is None or not accelerator.trackers:
        return
    try:
        for tracker in accelerator.trackers:
            tracker.finish()
    except Exception:  # noqa: BLE001
        log_.exception("closing the trackers failed")
    accelerator.trackers = []
