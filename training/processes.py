"""Detached processes of a realm as the CLI sees them. The primitives (pid files, ownership check by
``/proc/<pid>/cmdline``, warm-then-hard stop by pid only) live in :mod:`safety.processes`, which the
supervisor uses too; this module names the roles the CLI shows."""

from __future__ import annotations

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
