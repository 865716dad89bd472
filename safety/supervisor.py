"""The supervisor: runs the daemon and the Tavern as child processes under a watchdog.

``python -m training supervise --realm R`` (started detached by ``start-all``):

- **crash** (a child ends with a non-zero status or a signal; status 0 is a normal end, e.g. the Tavern's
  *stop* button stops the daemon, and is not restarted): the end is classified (:mod:`safety.crash`,
  ledger event ``crash``) and the child restarted after an exponential backoff
  (``backoff_initial_seconds`` x 2^restarts in the window, at most ``backoff_max_seconds``);
- **hang** (daemon only): by the liveness rule of :mod:`core.contract` with ``hang_minutes`` as the
  staleness limit (``Ledger.daemon_status``), it is ``not responding`` (heartbeat older than
  ``hang_minutes``), or it is ``training`` without a new ``global_step`` for ``hang_minutes``, or it wrote no
  heartbeat for ``hang_minutes`` since it started; never while it is ``stopping`` (a stop began: its last
  checkpoint may take long) or ``stopped``: warm stop, hard kill after ``stop_timeout_seconds``, crash
  class ``hang``, restart;
- **give up**: a child needing more than ``max_restarts`` restarts within ``restart_window_minutes`` goes
  to ``fatal`` (ledger event ``supervisor_gave_up``, level error: an alert). The supervisor exits once no
  child is running or waiting for a restart (status 10 when one is fatal, else 0);
- **stop** (SIGTERM/SIGINT to the supervisor, which ``stop-all`` sends): warm stop of every child (SIGTERM:
  the daemon saves a checkpoint), SIGKILL after ``stop_timeout_seconds``, then exit.

**Data parallel** (``--processes N``, :mod:`core.distributed`): the daemon child is one ``accelerate
launch`` process whose N ranks are its descendants; the group is one unit. The heartbeat comes from rank 0
(a descendant); when any rank dies the launcher stops the others and exits non-zero: a crash, classified
and restarted as above (every rank resumes from the last checkpoint); a hard kill (SIGKILL) goes to the
launcher and to every rank it started (:func:`safety.processes.descendants`, remembered at each poll so
ranks orphaned by a killed launcher are killed too).

Signals only ever go to the supervisor's own unreaped children (their pids cannot be reused before the
supervisor reaps them). Child states are :class:`ChildState`, changed only by :meth:`Supervisor._set_state`
against :data:`TRANSITIONS`; the supervisor's own state is :class:`SupervisorState`, changed only by
:meth:`Supervisor._set_supervisor_state`. Both are published to the ledger kv ``supervisor``
(``Ledger.publish_supervisor_status``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import psutil

from core.config import RealmConfig
from core.contract import NOT_RESPONDING, DaemonState
from core.fsutil import ExclusiveLock, write_json_atomic
from core.ledger import Ledger
from core.realm import SUPERVISOR_LOCK, Realm
from safety import processes
from safety.crash import MemoryFacts, classify_exit, read_log_tail, read_oom_kill_count, record_crash

log = logging.getLogger("realm.supervisor")

FATAL_EXIT = 10
SECONDS_PER_MINUTE = 60.0


class ChildState(str, Enum):
    STOPPED = "stopped"    # not started yet, or ended normally / on request
    RUNNING = "running"
    STOPPING = "stopping"  # SIGTERM sent; SIGKILL at the deadline
    BACKOFF = "backoff"    # ended abnormally; restarts when the backoff delay has passed
    FATAL = "fatal"        # too many restarts in the window: given up


TRANSITIONS: dict[ChildState, frozenset[ChildState]] = {
    ChildState.STOPPED: frozenset({ChildState.RUNNING}),
    ChildState.RUNNING: frozenset({ChildState.STOPPING, ChildState.BACKOFF, ChildState.STOPPED, ChildState.FATAL}),
    ChildState.STOPPING: frozenset({ChildState.STOPPED, ChildState.BACKOFF, ChildState.FATAL}),
    ChildState.BACKOFF: frozenset({ChildState.RUNNING, ChildState.STOPPED, ChildState.FATAL}),
    ChildState.FATAL: frozenset(),
}


STOP_REQUEST_FILE = "supervisor.stop.json"


def request_stop_timeout(realm: Realm, timeout_seconds: float) -> None:
    """Tell a running supervisor how long its children get to stop warmly at the next stop (``stop-all
    --timeout``): written to ``run/supervisor.stop.json``, read and removed when it stops."""
    realm.run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(realm.run_dir / STOP_REQUEST_FILE, {"timeout_seconds": float(timeout_seconds)}, indent=None)


def _take_stop_timeout(realm: Realm, default: float) -> float:
    import json

    path = realm.run_dir / STOP_REQUEST_FILE
    try:
        value = float(json.loads(path.read_text())["timeout_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return default
    finally:
        path.unlink(missing_ok=True)
    return value if value > 0 else default


class SupervisorState(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class AlreadySupervised(RuntimeError):
    """Another supervisor holds the realm's lock (``run/supervisor.lock``)."""


class TransitionError(RuntimeError):
    """A state change that :data:`TRANSITIONS` does not allow (a bug, never user input)."""


@dataclass
class Child:
    """One supervised process. Times are ``time.monotonic()`` seconds unless named ``*_wall``."""

    role: str
    extra_args: list[str] = field(default_factory=list)
    state: ChildState = ChildState.STOPPED
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    log_offset: int = 0
    oom_kills_at_start: int | None = None
    restarts: deque = field(default_factory=deque)  # monotonic times of restarts (within the window)
    restart_at: float | None = None
    stop_deadline: float | None = None
    restart_after_stop: bool = False
    killed: bool = False
    hang_reason: str | None = None
    last_step: Any = None
    last_progress_at: float = 0.0
    rss_bytes: int | None = None
    min_available_bytes: int | None = None
    last_exit: dict[str, Any] | None = None
    launcher: list[str] | None = None  # accelerate launch arguments: the child is a group of ranks
    group: list[psutil.Process] = field(default_factory=list)  # its descendants, as last seen

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Supervisor:
    """Supervises ``roles`` (``"daemon"``, ``"tavern"``) of one realm; :meth:`run` blocks until stopped
    or until every child is stopped or fatal, and returns the process exit status."""

    def __init__(self, realm: Realm, config: RealmConfig, roles: tuple[str, ...] = ("daemon", "tavern"),
                 environ: Mapping[str, str] | None = None, launcher: list[str] | None = None):
        """``launcher``: run the daemon through ``python -m <launcher...>`` (:func:`core.distributed.
        launch_command`: N data parallel ranks), None: one process."""
        self.realm, self.config, self.environ = realm, config, environ
        self.settings = config.supervisor
        self.children = {role: Child(role, launcher=launcher if role == "daemon" else None) for role in roles}
        self.state = SupervisorState.STARTING
        self.ledger: Ledger | None = None
        self._stop = threading.Event()
        self._stop_timeout = self.settings.stop_timeout_seconds  # seconds from SIGTERM to SIGKILL

    # state: the one place each enum changes ------------------------------------------------------------
    def _set_state(self, child: Child, new: ChildState, reason: str, level: str = "info") -> None:
        if new not in TRANSITIONS[child.state]:
            raise TransitionError(f"{child.role}: {child.state.value} -> {new.value} is not allowed")
        old, child.state = child.state, new
        log.log(logging.WARNING if level != "info" else logging.INFO, "%s: %s -> %s (%s)", child.role,
                old.value, new.value, reason)
        if self.ledger is not None:
            self.ledger.event(f"process_{new.value}", f"{child.role}: {reason}", level=level, process=child.role,
                              pid=child.pid, previous=old.value)
        self._publish()

    def _set_supervisor_state(self, new: SupervisorState) -> None:
        self.state = new
        self._publish()

    def _publish(self) -> None:
        if self.ledger is None:
            return
        now = time.monotonic()
        self.ledger.publish_supervisor_status({
            "pid": os.getpid(), "state": self.state.value,
            "children": {c.role: {"state": c.state.value, "pid": c.pid if c.state in (ChildState.RUNNING,
                                                                                      ChildState.STOPPING) else None,
                                  "restarts_in_window": len(c.restarts), "last_exit": c.last_exit,
                                  "restart_in_seconds": max(0.0, c.restart_at - now) if c.restart_at else None}
                         for c in self.children.values()}})

    # lifecycle ----------------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Supervise until stopped. Raises :class:`AlreadySupervised` when another supervisor runs here."""
        self.realm.ensure_layout()
        lock = ExclusiveLock(self.realm.lock_file(SUPERVISOR_LOCK))
        if not lock.acquire():
            raise AlreadySupervised(f"another supervisor runs on the realm {self.realm.root}")
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> int:
        (self.realm.run_dir / STOP_REQUEST_FILE).unlink(missing_ok=True)  # left by an earlier stop
        self.ledger = Ledger(self.realm.ledger_path)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.request_stop())
        try:
            self.ledger.event("supervisor_started", f"supervisor started ({', '.join(self.children)})",
                              pid=os.getpid())
            self._stop_orphans()
            for child in self.children.values():
                self._start(child, restart=False)
            self._set_supervisor_state(SupervisorState.RUNNING)
            while not self._stop.is_set():
                for child in self.children.values():
                    self._tick(child)
                self._publish()
                if all(c.state in (ChildState.STOPPED, ChildState.FATAL) for c in self.children.values()):
                    break
                self._stop.wait(self.settings.poll_interval_seconds)
            self._stop_children()
            fatal = [c.role for c in self.children.values() if c.state == ChildState.FATAL]
            return FATAL_EXIT if fatal else 0
        except BaseException:
            log.exception("supervisor failed: stopping its children")
            self._emergency_stop()
            raise
        finally:
            self._set_supervisor_state(SupervisorState.STOPPED)
            self.ledger.event("supervisor_stopped", "supervisor stopped", pid=os.getpid())
            self.ledger.close()
            self.ledger = None

    def _emergency_stop(self) -> None:
        """Warm then hard stop of every live child without touching the ledger (it may be what failed)."""
        live = [c.proc for c in self.children.values() if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                members = processes.descendants(proc.pid)
                proc.kill()
                processes.kill_all(members)
                proc.wait()
            processes.remove_pid(self.realm, next(c.role for c in self.children.values() if c.proc is proc),
                                 proc.pid)

    def _stop_orphans(self) -> None:
        """Children of an earlier supervisor that died without stopping them: stop them warmly."""
        for role in self.children:
            info = processes.process_info(self.realm, role)
            if info.state == processes.ProcessState.RUNNING:
                said = processes.stop(self.realm, role, self.settings.stop_timeout_seconds)
                self.ledger.event("orphan_stopped", f"{said} (left running by an earlier supervisor)",
                                  level="warning", process=role, pid=info.pid)

    def _stop_children(self) -> None:
        self._set_supervisor_state(SupervisorState.STOPPING)
        self._stop_timeout = _take_stop_timeout(self.realm, self.settings.stop_timeout_seconds)
        for child in self.children.values():
            if child.state == ChildState.RUNNING:
                self._begin_stop(child, restart=False, reason="stop requested")
            elif child.state == ChildState.BACKOFF:
                child.restart_at = None
                self._set_state(child, ChildState.STOPPED, "stop requested while waiting to restart")
        while any(c.state == ChildState.STOPPING for c in self.children.values()):
            for child in self.children.values():
                self._tick(child)
            time.sleep(0.1)
        for child in self.children.values():  # a hung child killed just before the stop: no restart
            if child.state == ChildState.BACKOFF:
                child.restart_at = None
                self._set_state(child, ChildState.STOPPED, "stop requested while waiting to restart")

    # one child ----------------------------------------------------------------------------------------------
    def _start(self, child: Child, restart: bool) -> None:
        log_path = self.realm.logs / f"{child.role}.log"
        child.log_offset = log_path.stat().st_size if log_path.exists() else 0
        child.oom_kills_at_start = read_oom_kill_count()
        child.hang_reason, child.killed, child.restart_at, child.stop_deadline = None, False, None, None
        child.rss_bytes = child.min_available_bytes = None
        child.proc = processes.spawn(self.realm, child.role, child.extra_args, self.environ, child.launcher)
        child.group = []
        child.started_at = child.last_progress_at = time.monotonic()
        child.last_step = None
        if restart:
            child.restarts.append(child.started_at)
        self._set_state(child, ChildState.RUNNING, f"started (pid {child.pid})" + (
            f", restart {len(child.restarts)} in the window" if restart else ""), "warning" if restart else "info")

    def _tick(self, child: Child) -> None:
        now = time.monotonic()
        if child.state in (ChildState.RUNNING, ChildState.STOPPING):
            rc = child.proc.poll()
            if rc is not None:
                self._on_exit(child, rc)
                return
            self._sample_memory(child)
        if child.state == ChildState.RUNNING and child.role == "daemon":
            reason = self._hang_reason(child, now)
            if reason:
                child.hang_reason = reason
                self._begin_stop(child, restart=True, reason=f"hung: {reason}", level="error")
        elif child.state == ChildState.STOPPING and child.stop_deadline and now >= child.stop_deadline \
                and not child.killed and child.proc.poll() is None:
            child.killed = True
            child.proc.send_signal(signal.SIGKILL)  # our own unreaped child: the pid is still ours
            processes.kill_all(child.group)  # and its ranks
            log.warning("%s: no exit %.0f s after SIGTERM: SIGKILL", child.role, self._stop_timeout)
        elif child.state == ChildState.BACKOFF and child.restart_at is not None and now >= child.restart_at \
                and not self._stop.is_set():
            self._start(child, restart=True)

    def _begin_stop(self, child: Child, restart: bool, reason: str, level: str = "info") -> None:
        child.restart_after_stop = restart
        child.stop_deadline = time.monotonic() + self._stop_timeout
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
        self._set_state(child, ChildState.STOPPING, reason, level)

    def _sample_memory(self, child: Child) -> None:
        try:
            if child.launcher:
                child.group = processes.descendants(child.pid) or child.group
            child.rss_bytes = psutil.Process(child.pid).memory_info().rss + sum(
                _rss(p) for p in child.group)
            available = psutil.virtual_memory().available
        except (psutil.Error, OSError):
            return
        child.min_available_bytes = available if child.min_available_bytes is None else \
            min(child.min_available_bytes, available)

    def _hang_reason(self, child: Child, now: float) -> str | None:
        """Why the daemon child counts as hung, or None (see the module doc)."""
        limit = self.settings.hang_minutes * SECONDS_PER_MINUTE
        daemon = self.ledger.daemon_status(stale_after_seconds=limit)
        ours = daemon.pid == child.pid or any(p.pid == daemon.pid for p in child.group)  # rank 0 of a group
        if not ours or daemon.updated_at is None:  # nothing yet from this child
            waited = now - child.started_at
            return f"no heartbeat {waited / 60:.1f} min after start" if waited > limit else None
        state = daemon.state
        if state in (DaemonState.STOPPING.value, DaemonState.STOPPED.value):
            return None
        if daemon.display_state == NOT_RESPONDING:
            return f"no heartbeat for {daemon.heartbeat_age_seconds / 60:.1f} min (state {state})"
        step = daemon.get("global_step")
        if state != DaemonState.TRAINING.value or step != child.last_step:
            child.last_step, child.last_progress_at = step, now
            return None
        if now - child.last_progress_at > limit:
            return f"training without a new global step for {(now - child.last_progress_at) / 60:.1f} min " \
                   f"(global step {step})"
        return None

    def _on_exit(self, child: Child, returncode: int) -> None:
        processes.remove_pid(self.realm, child.role, child.pid)
        processes.kill_all(child.group)  # ranks a killed launcher left behind (none after a normal end)
        child.group = []
        tail = read_log_tail(self.realm.logs / f"{child.role}.log", child.log_offset)
        child.last_exit = {"returncode": returncode, "time": time.time(), "pid": child.pid}
        if child.state == ChildState.STOPPING and not child.restart_after_stop:
            how = "killed after the stop timeout" if child.killed else "stopped warmly"
            self._set_state(child, ChildState.STOPPED, f"{how} (pid {child.pid}, status {returncode})",
                            "warning" if child.killed else "info")
            return
        if returncode == 0 and child.hang_reason is None:
            self._set_state(child, ChildState.STOPPED, f"exited normally (pid {child.pid})")
            return
        oom_now = read_oom_kill_count()
        memory = MemoryFacts(rss_bytes=child.rss_bytes, available_bytes=child.min_available_bytes,
                             total_bytes=psutil.virtual_memory().total,
                             oom_kills_during=None if oom_now is None or child.oom_kills_at_start is None
                             else oom_now - child.oom_kills_at_start)
        crash = classify_exit(returncode, tail, memory=memory, hang_reason=child.hang_reason,
                              process=child.role, pid=child.pid)
        child.last_exit.update(crash_class=crash.crash_class, summary=crash.summary)
        step = self.ledger.daemon_status().get("global_step") if child.role == "daemon" else None
        record_crash(self.ledger, crash, global_step=step)
        self._after_crash(child, f"{crash.crash_class}: {crash.summary}")

    def _after_crash(self, child: Child, what: str) -> None:
        now = time.monotonic()
        window = self.settings.restart_window_minutes * SECONDS_PER_MINUTE
        while child.restarts and now - child.restarts[0] > window:
            child.restarts.popleft()
        if len(child.restarts) >= self.settings.max_restarts:
            msg = (f"{child.role} gave up after {len(child.restarts)} restarts within "
                   f"{self.settings.restart_window_minutes:g} min; last end: {what}. Fix the cause (see "
                   f"logs/{child.role}.log), then `python -m training stop-all` and `start-all`")
            self.ledger.event("supervisor_gave_up", msg, level="error", process=child.role)
            self._set_state(child, ChildState.FATAL, msg, "error")
            return
        delay = min(self.settings.backoff_max_seconds,
                    self.settings.backoff_initial_seconds * 2 ** len(child.restarts))
        child.restart_at = now + delay
        self._set_state(child, ChildState.BACKOFF, f"ended abnormally ({what}); restarting in {delay:.1f} s",
                        "warning")


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0
