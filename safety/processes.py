"""Our own processes of a realm (supervisor, daemon, Tavern): pid files, spawn, warm then hard stop.

Only our own processes are ever signalled: a pid is used only if its pid file exists *and* the process's
command line is ``python -m training --realm <this realm> <command> ...`` (checked in
``/proc/<pid>/cmdline``). Never by name.
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

import psutil

from core.contract import process_alive
from core.fsutil import write_text_atomic
from core.realm import Realm

ROLE_COMMANDS = {"daemon": "daemon", "tavern": "tavern", "supervisor": "supervise"}
"""Role (pid file ``run/<role>.pid``, log ``logs/<role>.log``) -> ``python -m training`` subcommand."""
STOP_TIMEOUT_SECONDS = 120.0
REPO_ROOT = Path(__file__).resolve().parent.parent


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
    """True if ``pid`` runs ``-m training <command of role>`` on this realm."""
    args = _cmdline(pid)
    command = ROLE_COMMANDS.get(role, role)
    if "-m" not in args or "training" not in args or command not in args or "--realm" not in args:
        return False
    i = args.index("--realm")
    return i + 1 < len(args) and Path(args[i + 1]).resolve() == realm.root


def read_pid(realm: Realm, role: str) -> int | None:
    try:
        return int(realm.pid_file(role).read_text().strip())
    except (OSError, ValueError):
        return None


def write_pid(realm: Realm, role: str, pid: int) -> None:
    """Write ``run/<role>.pid`` atomically."""
    realm.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(realm.pid_file(role), str(pid))


def remove_pid(realm: Realm, role: str, pid: int) -> None:
    """Remove ``run/<role>.pid`` if it still names ``pid``."""
    if read_pid(realm, role) == pid:
        realm.pid_file(role).unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (the one rule: :func:`core.contract.process_alive`)."""
    return process_alive(pid)


def process_info(realm: Realm, role: str) -> ProcessInfo:
    pid = read_pid(realm, role)
    if pid is None:
        return ProcessInfo(role, ProcessState.STOPPED, None)
    if is_ours(pid, role, realm) and alive(pid):
        return ProcessInfo(role, ProcessState.RUNNING, pid)
    return ProcessInfo(role, ProcessState.STALE, pid)


def training_command(realm: Realm, role: str, extra_args: list[str] | None = None,
                     launcher: list[str] | None = None) -> list[str]:
    """``[python, -m, training, --realm, <root>, <command>, *extra_args]``; with ``launcher`` (the
    arguments of ``python -m accelerate.commands.launch ...``, :func:`core.distributed.launch_command`)
    ``[python, -m, *launcher, -m, training, ...]``: the launcher runs the command as N ranks."""
    command = ["-m", "training", "--realm", str(realm.root), ROLE_COMMANDS.get(role, role), *(extra_args or [])]
    return [sys.executable, "-m", *launcher, *command] if launcher else [sys.executable, *command]


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for our children: unbuffered output, this repository on PYTHONPATH."""
    env = dict(os.environ if environ is None else environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn(realm: Realm, role: str, extra_args: list[str] | None = None,
          environ: Mapping[str, str] | None = None, launcher: list[str] | None = None) -> subprocess.Popen:
    """Start ``python -m training --realm <realm> <command>`` (through ``launcher``, see
    :func:`training_command`) in its own session (so a terminal's Ctrl-C reaches only its parent), output
    appended to ``logs/<role>.log``; writes ``run/<role>.pid``."""
    realm.ensure_layout()
    with open(realm.logs / f"{role}.log", "ab") as log:
        proc = subprocess.Popen(training_command(realm, role, extra_args, launcher), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=child_env(environ),
                                cwd=str(realm.root))
    write_pid(realm, role, proc.pid)
    return proc


def start_detached(realm: Realm, role: str, extra_args: list[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> int:
    """:func:`spawn` for a process nobody waits for. Raises RuntimeError if one already runs."""
    info = process_info(realm, role)
    if info.state == ProcessState.RUNNING:
        raise RuntimeError(f"{role} already running on {realm.root} (pid {info.pid})")
    return spawn(realm, role, extra_args, environ).pid


def stop(realm: Realm, role: str, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> str:
    """Warm stop (SIGTERM: the daemon checkpoints, the supervisor stops its children), then SIGKILL after
    ``timeout_seconds``. Returns a sentence saying what happened. Only our own pid is signalled."""
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
        if not alive(pid):
            remove_pid(realm, role, pid)
            return f"{role}: stopped (pid {pid})"
        time.sleep(0.2)
    if is_ours(pid, role, realm):
        members = descendants(pid)  # the ranks of a launcher: they would outlive it
        os.kill(pid, signal.SIGKILL)
        kill_all(members)
    remove_pid(realm, role, pid)
    return f"{role}: did not stop within {timeout_seconds:.0f} s; killed (pid {pid})"


def descendants(pid: int) -> list[psutil.Process]:
    """The processes started by ``pid`` and theirs (e.g. a launcher's ranks); [] when it is gone. psutil's
    handles remember each process's start time, so a reused pid is never signalled through them."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_all(members: list[psutil.Process]) -> None:
    """SIGKILL each process of ``members`` still running (the same processes: see :func:`descendants`)."""
    for p in members:
        try:
            p.kill()
        except psutil.Error:
            pass
