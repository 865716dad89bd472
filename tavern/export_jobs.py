"""Exports started from the Vault page, run as background jobs.

An export needs torch and transformers, which the Tavern process never loads, and it must not stall
training, so it is not the daemon's job either: each job is the command a user would type,
``python -m training --realm <realm> export <checkpoint> --format F [--quantization Q]``, in a child process
(lowered priority). A reader thread follows the child's output: ``export: [ 42%] message`` lines on stderr
are its progress, the last stdout line the path it wrote, its exit status success or failure; a failure
keeps the child's last error line as the job's ``error``. The export itself is atomic
(:mod:`management.export`): a failed or stopped job leaves nothing in ``exports/``.

One job runs at a time (:class:`ExportBusy` otherwise); the last :data:`MAX_JOBS` are kept in memory, and
finished exports are listed from disk (:func:`core.exports.list_exports`). ``on_change(job)`` is called
(from the reader thread) at each progress step and at the end; the vault page pushes it over Socket.IO.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.exports import FORMATS, QUANTIZATIONS
from core.realm import Realm

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_JOBS = 20
NICE_INCREMENT = 10
_PROGRESS = re.compile(r"^export: \[\s*(\d+)%\] (.*)$")
_ERROR = re.compile(r"^error: (.*)$")


class ExportBusy(RuntimeError):
    """An export job is already running; the message names it."""


class ExportJobs:
    """Background export jobs of one realm. Thread-safe."""

    def __init__(self, realm: Realm, on_change: Callable[[dict[str, Any]], None] = lambda job: None,
                 python: str = sys.executable):
        self.realm, self.on_change, self.python = realm, on_change, python
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []

    def start(self, checkpoint: str, fmt: str, quantization: str | None = None) -> dict[str, Any]:
        """Start exporting ``checkpoint`` (a name the caller checked: ``step-00001234``, ``latest``...).

        Returns the job (``id``, ``checkpoint``, ``format``, ``quantization``, ``state`` = ``running``,
        ``progress`` 0..1, ``message``, ``path``, ``error``, ``started_at``, ``finished_at``). Raises
        ``ValueError`` for a format or quantization that does not exist, :class:`ExportBusy`, ``OSError``.
        """
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if quantization is not None and (fmt == "hf" or quantization not in QUANTIZATIONS):
            raise ValueError(f"quantization {quantization!r} does not apply to {fmt}"
                             if fmt == "hf" else f"unknown quantization {quantization!r}")
        command = [self.python, "-m", "training", "--realm", str(self.realm.root), "export", checkpoint,
                   "--format", fmt, *(["--quantization", quantization] if quantization else [])]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with self._lock:
            running = [j for j in self._jobs.values() if j["state"] == "running"]
            if running:
                raise ExportBusy(f"an export is already running ({running[0]['checkpoint']} as "
                                 f"{running[0]['format']}); wait for it to finish")
            job = {"id": uuid.uuid4().hex[:12], "checkpoint": checkpoint, "format": fmt, "quantization": quantization,
                   "state": "running", "progress": 0.0, "message": "starting", "path": None, "error": None,
                   "started_at": time.time(), "finished_at": None}
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                    env=env, cwd=str(REPO_ROOT), text=True, encoding="utf-8", errors="replace")
            try:  # training keeps the CPU first
                os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + NICE_INCREMENT)
            except OSError:
                pass
            self._jobs[job["id"]] = job
            self._procs[job["id"]] = proc
            while len(self._jobs) > MAX_JOBS:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest]["state"] == "running":
                    break
                self._jobs.pop(oldest)
            thread = threading.Thread(target=self._follow, args=(job["id"], proc), name="export-job", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()
            return dict(job)

    def jobs(self) -> list[dict[str, Any]]:
        """Every kept job, newest first (copies)."""
        with self._lock:
            return [dict(j) for j in reversed(self._jobs.values())]

    def close(self, timeout_seconds: float = 10.0) -> None:
        """Stop running exports (SIGTERM: each removes its temporary folder) and wait for their threads."""
        with self._lock:
            procs = [p for p in self._procs.values() if p.poll() is None]
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + timeout_seconds
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in list(self._threads):
            t.join(max(0.1, deadline - time.monotonic()))

    # internals -----------------------------------------------------------------------------------------
    def _update(self, job_id: str, **fields: Any) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return
            job.update(fields)
            snapshot = dict(job)
        try:
            self.on_change(snapshot)
        except Exception:  # a push that fails must not kill the job's bookkeeping
            pass

    def _follow(self, job_id: str, proc: subprocess.Popen) -> None:
        errors: list[str] = []
        stdout_lines: list[str] = []
        reader = threading.Thread(target=lambda: stdout_lines.extend(proc.stdout or []), name="export-stdout",
                                  daemon=True)
        reader.start()
        for line in proc.stderr or []:
            line = line.rstrip("\n")
            if m := _PROGRESS.match(line):
                self._update(job_id, progress=min(1.0, int(m.group(1)) / 100), message=m.group(2)[:300])
            elif m := _ERROR.match(line):
                errors.append(m.group(1))
        reader.join()
        code = proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        with self._lock:
            self._procs.pop(job_id, None)
        outputs = [s.strip() for s in stdout_lines if s.strip()]
        if code == 0 and outputs:
            path = Path(outputs[-1])
            shown = str(path.relative_to(self.realm.root)) if path.is_relative_to(self.realm.root) else str(path)
            self._update(job_id, state="done", progress=1.0, message="done", path=shown, finished_at=time.time())
        else:
            reason = errors[-1] if errors else f"the export process ended with status {code}"
            self._update(job_id, state="failed", message="failed", error=reason[:2000], finished_at=time.time())
