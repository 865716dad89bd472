"""The cross-process contract: what the daemon publishes and how every other process reads it.

A leaf module (it imports only the standard library and psutil: no torch, no other ``core`` module), so
the Tavern, the CLI, the supervisor and the daemon all import *this* instead of retyping keys and rules.

- **ledger kv keys**: :data:`DAEMON_KEY` (the daemon's status, its ``updated_at`` is the heartbeat) and
  :data:`SUPERVISOR_KEY` (the supervisor's status and its children's).
- **daemon states**: :class:`DaemonState`, set only by ``core.daemon.Daemon._set_state``.
- **one liveness rule**: :func:`read_daemon_status` turns the ``daemon`` kv (value, heartbeat time) into a
  :class:`DaemonStatus` whose ``display_state`` is what ``status`` and the Tavern both show: ``not running``
  (no status, or its pid is gone / a zombie / reused by another process), ``stopped``, ``not responding``
  (heartbeat older than :data:`HEARTBEAT_STALE_SECONDS`), else the daemon's own state. The supervisor
  applies the same rule with its ``hang_minutes`` as the staleness limit.
- **one ETA**: :func:`quest_eta` over the last :data:`ETA_WINDOW_STEPS` steps of a quest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import psutil

DAEMON_KEY = "daemon"
SUPERVISOR_KEY = "supervisor"

HEARTBEAT_INTERVAL_SECONDS = 1.0  # the daemon rewrites DAEMON_KEY at least this often while it runs
HEARTBEAT_STALE_SECONDS = 30.0  # an older heartbeat (with a live pid) is "not responding"
PID_START_TOLERANCE_SECONDS = 1.0  # psutil's create_time has clock-tick resolution
ETA_WINDOW_STEPS = 50  # steps of the current quest used for examples/second

NOT_RUNNING = "not running"
NOT_RESPONDING = "not responding"


class DaemonState(str, Enum):
    """States of the daemon, published as ``state`` of :data:`DAEMON_KEY`.

    starting -> idle | training | paused (any order while it runs) -> stopping (a stop began: the last
    steps finish and a checkpoint is saved; no hang verdict meanwhile) -> stopped.
    """

    STARTING = "starting"
    IDLE = "idle"
    TRAINING = "training"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """``{"pid", "pid_started_at"}`` of this (or ``pid``'s) process, as the daemon publishes them:
    ``pid_started_at`` (seconds since the epoch, psutil ``create_time``) lets a reader tell a reused pid."""
    proc = psutil.Process(pid)
    return {"pid": proc.pid, "pid_started_at": proc.create_time()}


def process_alive(pid: Any, started_at: Any = None) -> bool:
    """True when ``pid`` is a live process (not a zombie) and, when ``started_at`` is given, the same one
    that published it (its start time matches within :data:`PID_START_TOLERANCE_SECONDS`)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if isinstance(started_at, (int, float)) and not isinstance(started_at, bool):
            return abs(proc.create_time() - float(started_at)) <= PID_START_TOLERANCE_SECONDS
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


@dataclass(frozen=True)
class DaemonStatus:
    """The daemon's published status, read by another process.

    ``value``: the raw kv dict ({} when none); ``state``: its ``state`` string or None; ``pid``;
    ``updated_at``: heartbeat time (epoch seconds) or None; ``heartbeat_age_seconds``;
    ``process_alive``: the pid check (None when no pid was published); ``display_state`` and ``alive``:
    the verdict of the liveness rule (see the module doc).
    """

    value: dict[str, Any] = field(default_factory=dict)
    state: str | None = None
    pid: int | None = None
    updated_at: float | None = None
    heartbeat_age_seconds: float | None = None
    process_alive: bool | None = None
    display_state: str = NOT_RUNNING

    @property
    def alive(self) -> bool:
        """True when the daemon runs and answers (not ``not running`` / ``not responding`` / ``stopped``)."""
        return self.display_state not in (NOT_RUNNING, NOT_RESPONDING, DaemonState.STOPPED.value)

    def get(self, key: str, default: Any = None) -> Any:
        """A field of the published value (``global_step``, ``quest_id``, ``hero``, ``eta_seconds``...)."""
        return self.value.get(key, default)


def read_daemon_status(value: Any, updated_at: float | None, now: float | None = None,
                       stale_after_seconds: float = HEARTBEAT_STALE_SECONDS) -> DaemonStatus:
    """The liveness rule. ``value``/``updated_at``: the :data:`DAEMON_KEY` kv row (None when absent);
    ``now``: epoch seconds (default: now); ``stale_after_seconds``: heartbeat age beyond which a live pid
    counts as ``not responding`` (the supervisor passes its ``hang_minutes``)."""
    now = time.time() if now is None else now
    value = value if isinstance(value, dict) else {}
    state = value.get("state") if isinstance(value.get("state"), str) else None
    pid = value.get("pid") if isinstance(value.get("pid"), int) and not isinstance(value.get("pid"), bool) else None
    age = None if updated_at is None else max(0.0, now - updated_at)
    alive = process_alive(pid, value.get("pid_started_at")) if pid is not None else None
    if not value:
        display = NOT_RUNNING
    elif state == DaemonState.STOPPED.value:
        display = DaemonState.STOPPED.value
    elif alive is False:
        display = NOT_RUNNING
    elif age is not None and age > stale_after_seconds:
        display = NOT_RESPONDING
    else:
        display = state or "unknown"
    return DaemonStatus(value=value, state=state, pid=pid, updated_at=updated_at, heartbeat_age_seconds=age,
                        process_alive=alive, display_state=display)


@dataclass(frozen=True)
class QuestEta:
    """``examples_per_second`` over the window (None: too few steps) and ``eta_seconds`` until the quest's
    ``examples_total`` are trained (None: unknown)."""

    examples_per_second: float | None
    eta_seconds: float | None


def quest_eta(recent_steps: Sequence[Mapping[str, Any]], examples_total: int | None,
              examples_trained: int | None) -> QuestEta:
    """The one ETA. ``recent_steps``: the quest's last steps (up to :data:`ETA_WINDOW_STEPS`), newest
    first, each with ``time`` (epoch seconds) and ``example_end`` (the quest's examples consumed after
    that step). Rate = examples consumed between the oldest and newest of them / the seconds between.
    """
    rows = [r for r in recent_steps if r.get("time") is not None and r.get("example_end") is not None]
    rate = None
    if len(rows) >= 2:
        seconds = float(rows[0]["time"]) - float(rows[-1]["time"])
        examples = int(rows[0]["example_end"]) - int(rows[-1]["example_end"])
        if seconds > 0 and examples > 0:
            rate = examples / seconds
    eta = None
    if rate and examples_total:
        eta = max(0, int(examples_total) - int(examples_trained or 0)) / rate
    if eta is not None and not math.isfinite(eta):
        eta = None
    return QuestEta(examples_per_second=rate, eta_seconds=eta)
