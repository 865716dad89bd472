"""Detached processes of a realm (daemon, Tavern): pid files, start, warm then hard stop.

Only our own processes are ever signalled: a pid is used only if its pid file exists *and* the process's
command line is ``python -m training <role> ... --realm <this realm>``. Never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from core.realm import Realm

ROLES = ("daemon", "tavern")
STOP_TIMEOUT_SECONDS = 120.0


class ProcessState(str, Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    STALE = "stale"  # a pid file whose process is gone or is not ours


@dataclass
class ProcessInfo:
    role: str
    state: ProcessState
    pid: int | None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_ours(pid: int, role: str, realm: Realm) -> bool:
    """True if ``pid`` runs ``-m training <role>`` on this realm (checked in /proc/<pid>/cmdline)."""
    args = _cmdline(pid)
    if "-m" not in args or "training" not in args or role not in args:
        return False
    return "--realm" in args and Path(args[args.index("--realm") + 1]).resolve() == realm.root


def read_pid(realm: Realm, role: str) -> int | None:
    try:
        return int(realm.pid_file(role).read_text().strip())
    except (OSError, ValueError):
        return None


def process_info(realm: Realm, role: str) -> ProcessInfo:
    pid = read_pid(realm, role)
    if pid is None:
        return ProcessInfo(role, ProcessState.STOPPED, None)
    if is_ours(pid, role, realm) and _alive(pid):
        return ProcessInfo(role, ProcessState.RUNNING, pid)
    return ProcessInfo(role, ProcessState.STALE, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def start_detached(realm: Realm, role: str, extra_args: list[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> int:
    """Start ``python -m training <role> --realm <realm>`` in its own session, output to logs/<role>.log.

    Writes run/<role>.pid. Raises RuntimeError if one is already running.
    """
    info = process_info(realm, role)
    if info.state == ProcessState.RUNNING:
        raise RuntimeError(f"{role} already running on {realm.root} (pid {info.pid})")
    realm.ensure_layout()
    log_path = realm.logs / f"{role}.log"
    cmd = [sys.executable, "-m", "training", role, "--realm", str(realm.root), *(extra_args or [])]
    env = dict(os.environ if environ is None else environ)
    env["PYTHONUNBUFFERED"] = "1"
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=str(realm.root))
    tmp = realm.pid_file(role).with_suffix(".pid.tmp")
    tmp.write_text(str(proc.pid))
    os.replace(tmp, realm.pid_file(role))
    return proc.pid


def stop(realm: Realm, role: str, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> str:
    """Warm stop (SIGTERM: the daemon checkpoints first), then SIGKILL after ``timeout_seconds``.

    Returns a sentence saying what happened. Only our own pid (see :func:`is_ours`) is signalled.
    """
    info = process_info(realm, role)
    if info.state == ProcessState.STALE:
        realm.pid_file(role).unlink(missing_ok=True)
        return f"{role}: not running (removed a stale pid file for pid {info.pid})"
    if info.state == ProcessState.STOPPED:
        return f"{role}: not running"
    pid = info.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            realm.pid_file(role).unlink(missing_ok=True)
            return f"{role}: stopped (pid {pid})"
        time.sleep(0.2)
    if is_ours(pid, role, realm):
        os.kill(pid, signal.SIGKILL)
    realm.pid_file(role).unlink(missing_ok=True)
    return f"{role}: did not stop within {timeout_seconds:.0f} s; killed (pid {pid})"
