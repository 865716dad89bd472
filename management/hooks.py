"""Checkpoint hooks for the daemon: the disk guard before each save and pruning after it.

``core/`` may not import ``management/``, so ``training/cli.py`` builds these and hands the two bound
methods down as plain callables (``Daemon(..., before_save=hooks.before_save, after_save=hooks.after_save)``
-> ``Engine``)::

    hooks = CheckpointHooks(realm, config)
    # in Engine.save_checkpoint, before core.checkpoint.save_checkpoint(...):
    if not hooks.before_save(parameters=n_params, should_stop=stop_event.is_set, on_wait=heartbeat):
        ...  # no room and a stop was requested: do not save, do not mark anything done
    # after a successful save:
    hooks.after_save(path)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core.config import RealmConfig
from core.ledger import Ledger
from core.realm import Realm
from management.disk_guard import GuardResult, estimate_checkpoint_bytes, free_bytes_of, wait_for_space
from management.vault_ops import prune_after_save

DISK_RETRY_SECONDS = 30.0


class CheckpointHooks:
    """Disk guard and after-save prune for one realm's hero. Opens its own ledger connection unless given
    one; ``free_bytes(path)`` probes free space (replaceable to simulate a full disk)."""

    def __init__(self, realm: Realm, config: RealmConfig, ledger: Ledger | None = None,
                 retry_seconds: float = DISK_RETRY_SECONDS, free_bytes: Callable[[Path], int] = free_bytes_of):
        self.realm, self.config, self.free_bytes = realm, config, free_bytes
        self.ledger = ledger or Ledger(realm.ledger_path)
        self.retry_seconds = retry_seconds
        self.last_guard: GuardResult | None = None

    def before_save(self, *, parameters: int | None = None, should_stop: Callable[[], bool] = lambda: False,
                    on_wait: Callable[[GuardResult], None] = lambda result: None) -> bool:
        """True when the next checkpoint fits above ``retention.min_free_gb`` (pruning by policy if
        needed). Otherwise blocks, calling ``on_wait(result)`` about twice a second (report a paused state
        and heartbeat there) and re-checking every ``retry_seconds``, until there is room (True) or
        ``should_stop()`` (False: do not save). ``parameters``: the trainable parameter count (the whole
        model for full fine-tuning, the adapter's with LoRA), used for the estimate before the first
        checkpoint: a checkpoint holds the trainable weights and their optimizer state."""
        needed = estimate_checkpoint_bytes(self.realm.checkpoints_dir(self.config.hero.name), parameters)
        self.last_guard = wait_for_space(self.realm, self.config, needed, ledger=self.ledger,
                                         should_stop=should_stop, on_wait=on_wait,
                                         interval_seconds=self.retry_seconds, free_bytes=self.free_bytes)
        return self.last_guard.ok

    def after_save(self, path: Path | None = None) -> None:
        """Prune by the retention policy (when ``retention.enabled``); never raises for a pruning problem."""
        prune_after_save(self.realm, self.config, self.ledger)
