"""Classify an abnormal process end from its exit status and log tail, and record it in the ledger.

Classes (:class:`CrashClass`), first match wins:

- ``hang``: the supervisor killed it for lack of heartbeat progress (it says so: ``hang_reason``);
- ``cuda_oom``: the log's last error is a CUDA out-of-memory (``torch.OutOfMemoryError``, "CUDA out of
  memory", "CUBLAS_STATUS_ALLOC_FAILED");
- ``disk_full``: "No space left on device" / ``ENOSPC`` / ``[Errno 28]``;
- ``import_error``: ``ModuleNotFoundError`` / ``ImportError``;
- ``nan``: a non-finite loss error (``FloatingPointError``, "loss is nan", "non-finite loss");
- ``cpu_oom``: ``MemoryError`` in the log, or SIGKILL with no error in the log while the kernel's OOM
  killer fired (``oom_kill`` in /proc/vmstat grew during the process's life: no dmesg needed) or, when
  that counter is unavailable, while memory was nearly exhausted (last seen: available < 5% of total, or
  the process held > 50% of it);
- ``signal``: killed by another signal, or SIGKILL without any sign of memory pressure;
- ``other``: any other non-zero exit (the summary is the last exception line of the log).

A log error line only counts when it is in the *last* traceback (earlier tracebacks may be quest errors
the daemon survived). A data parallel daemon (``accelerate launch``/torchrun, :mod:`core.distributed`)
ends with the launcher's own report of the group's failure: its *root cause* (the rank that failed first,
with its exit status) is classified instead, from the ranks' tracebacks (any of them: in a group every
error ends the run) and that rank's status, e.g. ``signal`` for a rank killed by SIGKILL, ``cuda_oom`` for
a rank out of GPU memory; the summary names the rank. Records: ledger event ``kind="crash"``, level ``error``, ``data.crash_class``.
"""

from __future__ import annotations

import re
import signal
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from core.ledger import Ledger

CRASH_EVENT = "crash"
LOG_TAIL_BYTES = 64 * 1024
OOM_AVAILABLE_FRACTION = 0.05
OOM_RSS_FRACTION = 0.5


class CrashClass(str, Enum):
    CUDA_OOM = "cuda_oom"
    CPU_OOM = "cpu_oom"
    NAN = "nan"
    SIGNAL = "signal"
    IMPORT_ERROR = "import_error"
    DISK_FULL = "disk_full"
    HANG = "hang"
    OTHER = "other"


_PATTERNS: list[tuple[CrashClass, re.Pattern]] = [
    (CrashClass.CUDA_OOM, re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.I)),
    (CrashClass.DISK_FULL, re.compile(r"No space left on device|ENOSPC|\[Errno 28\]")),
    (CrashClass.IMPORT_ERROR, re.compile(r"\b(ModuleNotFoundError|ImportError)\b")),
    (CrashClass.NAN, re.compile(r"FloatingPointError|non-finite loss|loss is (nan|inf)|\bnan loss\b", re.I)),
    (CrashClass.CPU_OOM, re.compile(r"\bMemoryError\b")),
]


@dataclass(frozen=True)
class MemoryFacts:
    """What the supervisor saw of memory (bytes; None: unknown). ``oom_kills_during``: how many times the
    kernel's OOM killer fired while the process lived (from /proc/vmstat ``oom_kill``), None if unknown."""

    rss_bytes: int | None = None
    available_bytes: int | None = None
    total_bytes: int | None = None
    oom_kills_during: int | None = None


@dataclass(frozen=True)
class CrashReport:
    """``crash_class`` (a :class:`CrashClass` value), ``summary`` (one line), ``returncode`` (negative:
    killed by that signal), ``signal`` name or None, ``process`` role, ``pid``."""

    crash_class: str
    summary: str
    returncode: int
    signal: str | None
    process: str
    pid: int | None


def read_oom_kill_count(vmstat: Path = Path("/proc/vmstat")) -> int | None:
    """The kernel's cumulative ``oom_kill`` counter, None where unavailable."""
    try:
        for line in vmstat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def read_log_tail(path: Path, start_offset: int = 0, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The last ``max_bytes`` of ``path`` written after ``start_offset`` ("" when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            end = f.tell()
            f.seek(max(start_offset, end - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


_GROUP_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)",
                               re.S)
_TRACEBACK = "Traceback (most recent call last)"


def _group_failure(log_tail: str) -> tuple[int, int, str] | None:
    """torchrun's report of a failed group in the log: ``(rank, its exit status, the log before the
    launcher's own traceback)``, or None."""
    m = _GROUP_ROOT_CAUSE.search(log_tail)
    if m is None:
        return None
    launcher = log_tail.rfind(_TRACEBACK, 0, m.start())
    return int(m.group(1)), int(m.group(2)), log_tail[:launcher if launcher >= 0 else m.start()]


def _last_traceback(log_tail: str) -> str:
    """The text from the last ``Traceback`` header on ("" when there is none)."""
    i = log_tail.rfind("Traceback (most recent call last)")
    return log_tail[i:] if i >= 0 else ""


def _last_error_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line) or line.startswith("error:"):
            return line[:300]
    return ""


def _signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _memory_pressure(memory: MemoryFacts) -> bool:
    if memory.oom_kills_during is not None:
        return memory.oom_kills_during > 0
    total = memory.total_bytes or 0
    if not total:
        return False
    low = memory.available_bytes is not None and memory.available_bytes < OOM_AVAILABLE_FRACTION * total
    big = memory.rss_bytes is not None and memory.rss_bytes > OOM_RSS_FRACTION * total
    return low or big


def classify_exit(returncode: int, log_tail: str = "", *, memory: MemoryFacts | None = None,
                  hang_reason: str | None = None, process: str = "daemon", pid: int | None = None) -> CrashReport:
    """Classify one abnormal end (see the module doc). ``returncode`` as :class:`subprocess.Popen` gives it
    (negative: killed by signal ``-returncode``). Pure: no I/O."""
    sig = _signal_name(returncode)
    last_tb = _last_traceback(log_tail)
    error_line = _last_error_line(last_tb) or _last_error_line(log_tail[-4000:])

    def report(cls: CrashClass, summary: str) -> CrashReport:
        return CrashReport(cls.value, summary, returncode, sig, process, pid)

    if hang_reason:
        return report(CrashClass.HANG, hang_reason)
    group = _group_failure(log_tail)
    if group is not None:
        rank, status, ranks_log = group
        first = ranks_log.find(_TRACEBACK)
        tracebacks = ranks_log[first:] if first >= 0 else ""
        for cls, pattern in _PATTERNS:
            if tracebacks and (found := pattern.search(tracebacks)):
                start = tracebacks.rfind("\n", 0, found.start()) + 1
                line = tracebacks[start:].split("\n", 1)[0].strip()[:300]
                return report(cls, f"rank {rank}: {line or cls.value}")
        inner = classify_exit(status, ranks_log, memory=memory, process=process, pid=pid)
        return report(CrashClass(inner.crash_class), f"rank {rank}: {inner.summary}")
    for cls, pattern in _PATTERNS:
        if last_tb and pattern.search(last_tb):
            return report(cls, error_line or cls.value)
    if returncode == -signal.SIGKILL:
        if _memory_pressure(memory or MemoryFacts()):
            return report(CrashClass.CPU_OOM, "killed by SIGKILL under memory pressure (the kernel OOM killer)")
        return report(CrashClass.SIGNAL, "killed by SIGKILL (no sign of memory pressure: killed by someone)")
    if sig:
        return report(CrashClass.SIGNAL, f"killed by {sig}")
    return report(CrashClass.OTHER, error_line or f"exited with status {returncode}")


def record_crash(ledger: Ledger, crash: CrashReport, **extra) -> None:
    """Ledger event ``crash`` (level error) with the report's fields and ``extra`` (e.g. global_step)."""
    ledger.event(CRASH_EVENT, f"{crash.process} crashed ({crash.crash_class}): {crash.summary}", level="error",
                 **asdict(crash), **extra)


def recent_crashes(ledger: Ledger, limit: int = 10) -> list[dict]:
    """The ``limit`` newest crash events, newest first: ``{"id", "time", "crash_class", "summary",
    "process", "returncode", "signal", "pid", ...}``."""
    return [{"id": r["id"], "time": r["time"], **(r["data"] if isinstance(r["data"], dict) else {})}
            for r in ledger.events_of_kind(CRASH_EVENT, limit)]
