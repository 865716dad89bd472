"""A custom reward from a Python file in the realm, run in a worker subprocess with a timeout.

The file (the realm owner's code, e.g. ``<realm>/rewards/brevity.py``) defines
``reward(prompt: str, completion: str, **refs) -> float``. :class:`SandboxedReward` loads it once in a
worker process (``python -I``, the file's folder on ``sys.path``) and sends it one request per call over a
pipe. A call scores **0.0 and is reported** (:attr:`SandboxedReward.failures`, and ``on_failure``) when
the reward

- raises (``raised``, with the traceback), or does not load (``load``);
- takes longer than ``timeout_seconds`` (``timeout``: the worker is killed and restarted at the next call);
- returns something that is not a finite number — a string, None, NaN (``garbage``); what it prints
  goes to stderr and never into the protocol;
- kills its worker (``crashed``: e.g. ``os._exit``, a segfault, or memory above ``memory_limit_bytes``).

The caller always lives. This isolates faults, not hostile code: the file is the realm owner's, like
``config.json``; the Tavern has no way to write it.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("_sandbox_worker.py")
DEFAULT_MEMORY_LIMIT_BYTES = 2 * 1024 ** 3


@dataclass(frozen=True)
class RewardFailure:
    """One call of a custom reward that scored 0.0 instead of its value. ``kind``: load, raised, timeout,
    garbage or crashed; ``time``: Unix seconds."""

    reward: str
    kind: str
    message: str
    time: float


class SandboxedReward:
    """``reward(prompt, completion, **refs) -> float`` from ``path`` (see the module doc).

    ``refs`` must be JSON-serializable. ``timeout_seconds`` applies to each call (and to loading the file).
    Use as a context manager, or call :meth:`close`, to end the worker.
    """

    def __init__(self, path: Path | str, *, timeout_seconds: float = 5.0, function: str = "reward",
                 name: str | None = None, memory_limit_bytes: int | None = DEFAULT_MEMORY_LIMIT_BYTES,
                 on_failure: Callable[[RewardFailure], None] | None = None, max_failures_kept: int = 100):
        self.path = Path(path)
        self.name = name or f"file:{self.path.name}"
        self.timeout_seconds, self.function = timeout_seconds, function
        self.memory_limit_bytes, self.on_failure = memory_limit_bytes, on_failure
        self.failures: list[RewardFailure] = []
        self.calls = 0
        self.consecutive_failures = 0
        self._max_kept = max_failures_kept
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._load_error: tuple[float, str] | None = None  # (file mtime, error) of the last failed load
        self.__name__ = self.name

    # --- the worker ------------------------------------------------------------------------------------
    def _start(self) -> str | None:
        """Start the worker and wait for its handshake; the load error (or None)."""
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", str(WORKER), str(self.path), self.function, str(self.memory_limit_bytes or 0)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, cwd=str(self.path.parent),
            start_new_session=True)
        reply = self._read_reply()
        if isinstance(reply, dict) and reply.get("ready") is True:
            return None
        error = reply.get("error") if isinstance(reply, dict) else None
        self._stop()
        return error or f"the reward file did not load within {self.timeout_seconds} s ({reply})"

    def _read_reply(self) -> dict | str:
        """One JSON line from the worker within the timeout; a string describing the problem otherwise."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + self.timeout_seconds
        buffer = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return "timeout"
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    return "crashed"
                buffer += chunk
        try:
            reply = json.loads(buffer.split(b"\n", 1)[0])
        except ValueError:
            return "garbage"
        return reply if isinstance(reply, dict) else "garbage"

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-1000:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()  # our own child, by its pid
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        """End the worker (idempotent)."""
        self._stop()

    def __enter__(self) -> SandboxedReward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # --- calls -----------------------------------------------------------------------------------------
    def _fail(self, kind: str, message: str) -> float:
        failure = RewardFailure(self.name, kind, message[-2000:], time.time())
        self.failures.append(failure)
        del self.failures[:-self._max_kept]
        self.consecutive_failures += 1
        if self.on_failure is not None:
            self.on_failure(failure)
        return 0.0

    def __call__(self, prompt: str, completion: str, **refs) -> float:
        """The reward's value, or 0.0 with a :class:`RewardFailure` recorded (see the module doc)."""
        self.calls += 1
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            try:
                mtime = self.path.stat().st_mtime
            except OSError as exc:
                return self._fail("load", f"{self.path}: {exc}")
            if self._load_error is not None and self._load_error[0] == mtime:  # unchanged: fail fast
                return self._fail("load", self._load_error[1])
            error = self._start()
            if error is not None:
                self._load_error = (mtime, f"{self.path}: {error}")
                return self._fail("load", self._load_error[1])
            self._load_error = None
        try:
            line = json.dumps({"prompt": prompt, "completion": completion, "refs": refs}) + "\n"
            self._proc.stdin.write(line.encode("utf-8"))
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, TypeError, ValueError) as exc:
            tail = self._stderr_tail()
            self._stop()
            kind = "crashed" if isinstance(exc, OSError) else "garbage"
            return self._fail(kind, f"cannot send the request: {exc} {tail}".strip())
        reply = self._read_reply()
        if isinstance(reply, str):
            tail = self._stderr_tail()
            code = self._proc.poll() if self._proc is not None else None
            self._stop()  # a hung, dead or confused worker is replaced at the next call
            what = {"timeout": f"took longer than {self.timeout_seconds} s",
                    "crashed": f"the worker process died (exit status {code})", "garbage": "the worker replied garbage"}[reply]
            return self._fail(reply, f"{what}{': ' + tail if tail else ''}")
        if not reply.get("ok"):
            return self._fail("raised", str(reply.get("error", "")))
        value = reply.get("value")
        if not isinstance(value, bool | int | float) or "type" in reply or not math.isfinite(value):
            shown = value if "type" in reply else repr(value)
            return self._fail("garbage", f"returned {reply.get('type', type(value).__name__)} {shown}, "
                              "not a finite number")
        self.consecutive_failures = 0
        return float(value)
