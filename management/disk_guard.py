"""Disk guard: before each checkpoint save, make sure the save leaves ``retention.min_free_gb`` free.

Call :func:`ensure_space` (or :func:`wait_for_space`, which blocks while the disk stays short) with
:func:`estimate_checkpoint_bytes` before writing a checkpoint. When the save would leave less than the
floor, the guard prunes by the retention policy (:func:`management.vault_ops.prune`); when that is still
not enough it answers ``pause=True`` and records an ``error`` event ``disk_full_pause`` (an alert the
Tavern shows): the caller must not write the checkpoint and must not mark anything done. Nothing here
raises for a short disk; ``OSError`` only when the folder cannot be examined at all.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.checkpoint_layout import TRAINER_STATE_PT, list_checkpoints
from core.config import RealmConfig
from core.ledger import Ledger
from core.realm import Realm
from management.vault_ops import prune

GIB = 1024 ** 3
SAFETY_FACTOR = 1.1           # a new checkpoint may be a little larger than the last one
OVERHEAD_BYTES = 4 * 1024 ** 2  # tokenizer, configs, trainer_state.json
ADAM_STATES_PER_PARAMETER = 2  # exp_avg, exp_avg_sq


@dataclass
class GuardResult:
    """``ok``: the save may proceed; ``pause``: it may not (free space stays below the floor even after
    pruning). Bytes: ``free_bytes`` (after pruning), ``needed_bytes`` (the estimate), ``min_free_bytes``
    (the floor). ``pruned``: checkpoint names removed or stripped to make room."""

    ok: bool
    pause: bool
    free_bytes: int
    needed_bytes: int
    min_free_bytes: int
    pruned: list[str] = field(default_factory=list)
    message: str = ""


def estimate_checkpoint_bytes(checkpoints_dir: Path | None = None, parameters: int | None = None,
                              bytes_per_parameter: int = 4) -> int:
    """Bytes the next checkpoint will take.

    From the newest checkpoint that still has its optimizer state (its size x 1.1: an adapter checkpoint
    is measured like any other, so its small size carries over), else from the model: ``parameters`` (the
    trainable ones: the adapter's with LoRA, whose checkpoints hold nothing else) x ``bytes_per_parameter``
    x (1 weights + 2 Adam moments) x 1.1 + 4 MiB. Raises
    ``ValueError`` when neither a checkpoint nor ``parameters`` is available.
    """
    if checkpoints_dir is not None:
        found = [p for p in reversed(list_checkpoints(checkpoints_dir)) if (p / TRAINER_STATE_PT).exists()]
        for p in found[:3]:
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            if size:
                return int(size * SAFETY_FACTOR)
    if parameters:
        return int(parameters * bytes_per_parameter * (1 + ADAM_STATES_PER_PARAMETER) * SAFETY_FACTOR) \
            + OVERHEAD_BYTES
    raise ValueError("cannot estimate a checkpoint's size: no checkpoint yet and no parameter count")


def free_bytes_of(path: Path) -> int:
    """Free bytes (available to this user) on the filesystem holding ``path`` (or its nearest parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


def ensure_space(realm: Realm, config: RealmConfig, needed_bytes: int, *, ledger: Ledger | None = None,
                 free_bytes: Callable[[Path], int] = free_bytes_of) -> GuardResult:
    """Check that saving ``needed_bytes`` leaves ``retention.min_free_gb``; prune by policy when it would
    not (only when ``retention.enabled``); otherwise answer ``pause``.

    ``free_bytes(path)``: free-space probe (replaceable to simulate a full disk). Events (with ``ledger``):
    ``disk_low_pruned`` (warning) when pruning made room, ``disk_full_pause`` (error) when it did not.
    """
    folder = realm.checkpoints_dir(config.hero.name)
    floor = int(config.retention.min_free_gb * GIB)
    free = free_bytes(folder)
    if free - needed_bytes >= floor:
        return GuardResult(True, False, free, needed_bytes, floor)
    pruned: list[str] = []
    if config.retention.enabled and ledger is not None:
        result = prune(realm, config, ledger)
        pruned = result.removed + result.stripped
        free = free_bytes(folder)
        if free - needed_bytes >= floor:
            msg = (f"disk low: pruned {len(pruned)} checkpoint(s) to keep {config.retention.min_free_gb:g} GiB "
                   f"free ({free / GIB:.2f} GiB free, next checkpoint about {needed_bytes / GIB:.2f} GiB)")
            ledger.event("disk_low_pruned", msg, level="warning", pruned=pruned, free_bytes=free)
            return GuardResult(True, False, free, needed_bytes, floor, pruned, msg)
    msg = (f"disk full: {free / GIB:.2f} GiB free, the next checkpoint needs about {needed_bytes / GIB:.2f} GiB "
           f"and {config.retention.min_free_gb:g} GiB must stay free (retention.min_free_gb); training is "
           f"paused until space is freed (`python -m training vault prune`, fewer retention.keep_*, or "
           f"delete files on {folder})")
    if ledger is not None:
        ledger.event("disk_full_pause", msg, level="error", free_bytes=free, needed_bytes=needed_bytes,
                     min_free_bytes=floor, pruned=pruned)
    return GuardResult(False, True, free, needed_bytes, floor, pruned, msg)


def wait_for_space(realm: Realm, config: RealmConfig, needed_bytes: int, *, ledger: Ledger | None = None,
                   should_stop: Callable[[], bool] = lambda: False, on_wait: Callable[[GuardResult], None]
                   = lambda result: None, interval_seconds: float = 30.0,
                   free_bytes: Callable[[Path], int] = free_bytes_of) -> GuardResult:
    """:func:`ensure_space`, repeated every ``interval_seconds`` while it answers ``pause``, until there is
    room or ``should_stop()`` is true. ``on_wait(result)`` runs on every wait (heartbeat, paused state).

    Returns the last result: ``ok`` when the save may proceed, else ``pause`` (stop was requested while
    the disk was still short: do not save). Logs ``disk_space_recovered`` when it waited and room came.
    """
    result = ensure_space(realm, config, needed_bytes, ledger=ledger, free_bytes=free_bytes)
    waited = False
    while result.pause and not should_stop():
        waited = True
        on_wait(result)
        deadline = time.monotonic() + interval_seconds
        while time.monotonic() < deadline and not should_stop():
            time.sleep(min(0.5, interval_seconds))
            on_wait(result)
        free = free_bytes(realm.checkpoints_dir(config.hero.name))
        if free - needed_bytes >= result.min_free_bytes:  # no repeated alert while still short
            result = ensure_space(realm, config, needed_bytes, ledger=ledger, free_bytes=free_bytes)
    if waited and result.ok and ledger is not None:
        ledger.event("disk_space_recovered", f"disk space recovered ({result.free_bytes / GIB:.2f} GiB free): "
                     "training resumes", free_bytes=result.free_bytes)
    return result
