"""Detached processes of a realm as the CLI sees them. The primitives (pid files, ownership check by
``/proc/<pid>/cmdline``, warm-then-hard stop by pid only) live in :mod:`safety.processes`, which the
supervisor uses too; this module names the roles the CLI shows."""

from __future__ import annotations

import time

from core.ledger import Ledger
from core.realm import Realm
from safety.processes import (  # noqa: F401 - re-exported for the CLI and status
    STOP_TIMEOUT_SECONDS,
    ProcessInfo,
    ProcessState,
    is_ours,
    process_info,
    read_pid,
    start_detached,
    stop,
)

ROLES = ("daemon", "tavern")
"""The supervised children, in start order (stop goes in reverse)."""
SUPERVISOR = "supervisor"


def daemon_finished_under(realm: Realm, supervisor_pid: int, settle_seconds: float = 15.0) -> bool:
    """True when the running supervisor ``supervisor_pid`` supervises a daemon that ended for good (stopped
    normally, e.g. by the Tavern's Stop, or given up as fatal): a supervisor that only keeps the Tavern
    alive, which ``start-all`` may replace. Read from the supervisor's ledger record; a daemon whose
    heartbeat already says stopping/stopped is given ``settle_seconds`` to exit and be seen to."""
    from core.contract import DaemonState
    from safety.supervisor import ChildState, SupervisorState

    if not realm.ledger_path.exists():
        return False
    ledger = Ledger(realm.ledger_path)
    try:
        deadline = time.monotonic() + settle_seconds
        while True:
            record = ledger.supervisor_status()
            if record is None or record.get("pid") != supervisor_pid \
                    or record.get("state") != SupervisorState.RUNNING.value:
                return False
            child = (record.get("children") or {}).get("daemon") or {}
            if child.get("state") in (ChildState.STOPPED.value, ChildState.FATAL.value):
                return process_info(realm, "daemon").state != ProcessState.RUNNING
            ending = ledger.daemon_status().state in (DaemonState.STOPPING.value, DaemonState.STOPPED.value)
            if not ending or time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
    finally:
        ledger.close()
