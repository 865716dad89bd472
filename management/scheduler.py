"""The periodic prune job: an APScheduler ``BackgroundScheduler`` running :func:`run_prune_job` every
``retention.prune_interval_minutes`` (first run one interval after start).

The supervisor process starts it (``python -m training supervise``); any long-running process may::

    scheduler = start_prune_scheduler(realm, config)
    ...
    scheduler.shutdown(wait=False)

Each run opens its own ledger connection; pruning and the daemon's after-save prune never overlap
(a file lock in :func:`management.vault_ops.prune`). A failing run logs a ``vault_prune_failed`` warning
event and the schedule goes on.
"""

from __future__ import annotations

import logging

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from core.config import RealmConfig
from core.ledger import Ledger
from core.realm import Realm
from management.vault_ops import PruneResult, prune

PRUNE_JOB_ID = "vault_prune"
log = logging.getLogger("realm.prune")


def run_prune_job(realm: Realm, config: RealmConfig) -> PruneResult | None:
    """One scheduled prune (a no-op when ``retention.enabled`` is false). Never raises."""
    if not config.retention.enabled or not realm.ledger_path.exists():
        return None
    ledger = Ledger(realm.ledger_path)
    try:
        result = prune(realm, config, ledger)
        if result.removed or result.stripped:
            log.info("scheduled prune: removed %s, stripped %s", result.removed, result.stripped)
        return result
    except Exception as exc:  # noqa: BLE001 - the schedule must survive a failed run
        log.exception("scheduled prune failed")
        ledger.event("vault_prune_failed", f"scheduled prune failed: {type(exc).__name__}: {exc}",
                     level="warning")
        return None
    finally:
        ledger.close()


def start_prune_scheduler(realm: Realm, config: RealmConfig,
                          interval_minutes: float | None = None) -> BackgroundScheduler:
    """Start and return a background scheduler with the prune job (``interval_minutes`` defaults to
    ``retention.prune_interval_minutes``). One run at a time; missed runs coalesce into one."""
    minutes = interval_minutes or config.retention.prune_interval_minutes
    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(run_prune_job, IntervalTrigger(seconds=minutes * 60), args=(realm, config),
                      id=PRUNE_JOB_ID, max_instances=1, coalesce=True, replace_existing=True)
    scheduler.start()
    return scheduler
