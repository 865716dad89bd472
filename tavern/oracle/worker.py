"""One bounded inference worker process, so chatting with the hero never stalls training or the Tavern.

The Tavern process never imports torch. :class:`OracleWorker` starts a child process (``spawn`` context)
on the first request; the child lowers its priority (``nice`` +10) and imports torch with
``torch.set_num_threads(num_threads)`` (1 by default, leaving the other cores to the trainer), keeps the last ``cache_size`` models loaded (LRU) and serves
requests one at a time. Requests travel over a ``multiprocessing`` queue, generated text comes back over
another as ``(request_id, kind, payload)`` messages, and a dispatcher thread routes them to the
:class:`OracleRequest` of each caller:

=========== ===========================================================================================
kind        payload
=========== ===========================================================================================
``starting`` ``None``: a worker process is being started for this request (~6 s of torch imports)
``loading`` ``None``: the model is being loaded from disk
``token``   ``str``: the next piece of the answer (whole characters)
``done``    ``dict``: ``finish_reason`` (``stop``/``length``/``cancelled``), ``prompt_tokens``,
            ``completion_tokens``, ``seconds``
``error``   ``dict``: ``message`` (why it failed, for the user), ``status`` (HTTP), ``code``
=========== ===========================================================================================

At most ``max_pending`` requests wait or run at once; one more raises :class:`OracleBusy`. The worker
exits after ``idle_seconds`` without requests (freeing RAM / GPU memory) and is restarted on demand;
if it dies, its pending requests fail with an ``error`` and the next request starts a fresh one.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tavern.oracle.engine import GenerationJob, OracleError

log = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = 512
DEFAULT_MAX_PENDING = 4
DEFAULT_CACHE_SIZE = 2
DEFAULT_IDLE_SECONDS = 600.0
WORKER_NICE = 10  # scheduling priority increment of the worker process (POSIX nice)
EVENT_TIMEOUT_SECONDS = 300.0  # longest silence while waiting for the next message of a request
ABANDON_POLL_SECONDS = 0.25  # how often a waiting caller is asked whether its client is still there


class OracleBusy(OracleError):
    """Too many requests are already waiting; try again when one finishes (HTTP 429)."""

    def __init__(self, message: str):
        super().__init__(message, status=429, code="oracle_busy")


@dataclass
class OracleEvent:
    """One message about a request (see the table in the module docstring)."""

    kind: str
    payload: Any = None


class OracleRequest:
    """A submitted request: iterate :meth:`events` for its messages; :meth:`cancel` stops it."""

    def __init__(self, worker: OracleWorker, request_id: str, inbox: queue.Queue):
        self.worker, self.request_id, self._inbox = worker, request_id, inbox

    def events(self, timeout_seconds: float = EVENT_TIMEOUT_SECONDS,
               abandoned: Callable[[], bool] | None = None) -> Iterator[OracleEvent]:
        """Yield events until ``done`` or ``error`` (included). A silence longer than ``timeout_seconds``
        cancels the request and ends with an ``error`` event. ``abandoned`` (e.g. "the HTTP client closed
        its connection") is asked every :data:`ABANDON_POLL_SECONDS` while waiting; once it says True the
        request is cancelled (its worker slot freed at once) and ends with ``done``/``cancelled``."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            wait = deadline - time.monotonic()
            try:
                event = self._inbox.get(timeout=max(0.0, min(wait, ABANDON_POLL_SECONDS) if abandoned else wait))
            except queue.Empty:
                if abandoned is not None and time.monotonic() < deadline:
                    if abandoned():
                        abandoned = None
                        self.cancel()  # puts the done/cancelled event this loop then yields
                    continue
                self.cancel()
                yield OracleEvent("error", OracleError(
                    f"no answer from the oracle worker in {timeout_seconds:.0f} s", 504, "timeout").to_payload())
                return
            deadline = time.monotonic() + timeout_seconds
            yield event
            if event.kind in ("done", "error"):
                return

    def cancel(self) -> None:
        self.worker.cancel(self.request_id)


def _child_main(jobs, events, cancels, cache_size: int, num_threads: int, device: str) -> None:
    """Entry point of the worker process: serve jobs until the ``None`` sentinel."""
    try:
        os.nice(WORKER_NICE)  # the trainer wins when both want the CPU
    except (AttributeError, OSError):
        pass
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(num_threads)
    hf_logging.disable_progress_bar()
    from tavern.oracle.engine import Engine

    engine = Engine(cache_size=cache_size, device=device)
    cancelled: set[str] = set()

    def drain_cancels() -> None:
        while True:
            try:
                cancelled.add(cancels.get_nowait())
            except queue.Empty:
                return

    while True:
        job = jobs.get()
        if job is None:
            return
        rid = job.request_id
        drain_cancels()
        if rid in cancelled:
            cancelled.discard(rid)
            events.put((rid, "done", {"finish_reason": "cancelled", "prompt_tokens": 0, "completion_tokens": 0,
                                      "seconds": 0.0}))
            continue

        def is_cancelled(rid=rid) -> bool:
            drain_cancels()
            return rid in cancelled

        try:
            summary = engine.generate(job, emit=lambda text, rid=rid: events.put((rid, "token", text)),
                                      cancelled=is_cancelled,
                                      on_loading=lambda rid=rid: events.put((rid, "loading", None)))
            events.put((rid, "done", summary))
        except OracleError as exc:
            events.put((rid, "error", exc.to_payload()))
        except Exception as exc:  # a bug or a broken checkpoint must not kill the worker
            events.put((rid, "error", OracleError(f"generation failed: {type(exc).__name__}: {exc}").to_payload()))
        finally:
            cancelled.discard(rid)


class _Session:
    """One incarnation of the worker process and its queues."""

    def __init__(self, ctx, cache_size: int, num_threads: int, device: str):
        self.jobs, self.events, self.cancels = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_child_main, name="oracle-worker", daemon=True,
                                   args=(self.jobs, self.events, self.cancels, cache_size, num_threads, device))
        self.process.start()
        self.closing = False
        self.dispatcher: threading.Thread | None = None  # OracleWorker._dispatch, for this session

    def release(self) -> None:
        """Close this side of the queues once the process has exited: each queue this side put to has a
        feeder thread, which ends only when its queue is closed (never blocking on a pipe nobody reads)."""
        for q in (self.jobs, self.cancels, self.events):
            q.cancel_join_thread()
            q.close()


class OracleWorker:
    """Parent-side handle of the worker process. Thread-safe; the process starts on the first :meth:`submit`.

    ``max_pending``: requests waiting or running at once; ``cache_size``: models kept loaded;
    ``num_threads``: torch threads in the worker; ``device``: ``auto``/``cpu``/``cuda``;
    ``idle_seconds``: the worker exits after this long without requests.
    """

    def __init__(self, *, max_pending: int = DEFAULT_MAX_PENDING, cache_size: int = DEFAULT_CACHE_SIZE,
                 num_threads: int = 1, device: str = "auto", idle_seconds: float = DEFAULT_IDLE_SECONDS):
        self.max_pending, self.cache_size, self.num_threads = max_pending, cache_size, num_threads
        self.device, self.idle_seconds = device, idle_seconds
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self._pending: dict[str, queue.Queue] = {}
        self._last_activity = time.monotonic()
        self._starts = 0

    # public ------------------------------------------------------------------------------------------
    def submit(self, job: GenerationJob) -> OracleRequest:
        """Queue ``job`` (its ``request_id`` is replaced by a fresh one). Raises :class:`OracleBusy`."""
        job.request_id = uuid.uuid4().hex
        with self._lock:
            if len(self._pending) >= self.max_pending:
                raise OracleBusy(f"the oracle is busy: {len(self._pending)} requests are already waiting "
                                 f"(at most {self.max_pending}); try again in a moment")
            starts = self._starts
            session = self._ensure_session()
            inbox: queue.Queue = queue.Queue()
            if self._starts != starts:
                inbox.put(OracleEvent("starting"))
            self._pending[job.request_id] = inbox
            self._last_activity = time.monotonic()
            session.jobs.put(job)
        return OracleRequest(self, job.request_id, inbox)

    def cancel(self, request_id: str) -> None:
        """Stop a request (waiting: skipped; running: stopped after the current token). Unknown ids are
        ignored. Its caller receives a ``done`` event with ``finish_reason="cancelled"``."""
        with self._lock:
            inbox = self._pending.pop(request_id, None)
            if inbox is None:
                return
            if self._session is not None:
                self._session.cancels.put(request_id)
        inbox.put(OracleEvent("done", {"finish_reason": "cancelled", "prompt_tokens": 0,
                                       "completion_tokens": 0, "seconds": 0.0}))

    def status(self) -> dict[str, Any]:
        """``running`` (bool), ``pid``, ``pending`` (requests waiting or running), ``max_pending``,
        ``starts`` (processes started so far), ``device`` setting and ``num_threads``."""
        with self._lock:
            s = self._session
            alive = s is not None and s.process.is_alive()
            return {"running": alive, "pid": s.process.pid if alive else None, "pending": len(self._pending),
                    "max_pending": self.max_pending, "starts": self._starts, "device": self.device,
                    "num_threads": self.num_threads}

    def close(self, timeout_seconds: float = 5.0) -> None:
        """Stop the worker process (pending requests get an ``error``)."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            self._stop_session(session, timeout_seconds)
            if session.dispatcher is not None:  # it notices the exit within 0.5 s and releases the queues
                session.dispatcher.join(timeout_seconds)
        self._fail_pending("the oracle was shut down")

    # internals -----------------------------------------------------------------------------------------
    def _ensure_session(self) -> _Session:
        """The live session, starting one if needed (call with the lock held)."""
        if self._session is not None and not self._session.process.is_alive():
            self._session.closing = True  # died before its dispatcher noticed: fail what it held here
            self._fail_pending_locked("the oracle worker process exited; send the message again")
            self._session = None
        if self._session is None:
            self._session = _Session(self._ctx, self.cache_size, self.num_threads, self.device)
            self._starts += 1
            self._session.dispatcher = threading.Thread(target=self._dispatch, args=(self._session,),
                                                        name="oracle-dispatch", daemon=True)
            self._session.dispatcher.start()
            log.info("oracle worker started (pid %s)", self._session.process.pid)
        return self._session

    def _dispatch(self, session: _Session) -> None:
        """Route the worker's messages to their requests; notice its death and idle time."""
        while True:
            try:
                rid, kind, payload = session.events.get(timeout=0.5)
            except queue.Empty:
                if not session.process.is_alive():
                    with self._lock:
                        current = self._session is session
                        if current:
                            self._session = None
                    if current and not session.closing:
                        code = session.process.exitcode
                        log.warning("oracle worker exited with code %s", code)
                        self._fail_pending(f"the oracle worker process exited (code {code}); "
                                           "send the message again to restart it")
                    session.release()
                    return
                self._maybe_idle_stop(session)
                continue
            except (EOFError, OSError):
                continue
            with self._lock:
                self._last_activity = time.monotonic()
                inbox = self._pending.get(rid)
                if inbox is not None and kind in ("done", "error"):
                    del self._pending[rid]
            if inbox is not None:
                inbox.put(OracleEvent(kind, payload))

    def _maybe_idle_stop(self, session: _Session) -> None:
        with self._lock:
            idle = time.monotonic() - self._last_activity
            if self._pending or idle < self.idle_seconds or self._session is not session:
                return
            self._session = None  # new requests start a new process; this one drains and exits
            session.closing = True
        log.info("oracle worker idle for %.0f s: stopping it", idle)
        session.jobs.put(None)

    def _fail_pending(self, message: str) -> None:
        with self._lock:
            self._fail_pending_locked(message)

    def _fail_pending_locked(self, message: str) -> None:
        pending, self._pending = self._pending, {}
        payload = OracleError(message, 503, "worker_unavailable").to_payload()
        for inbox in pending.values():
            inbox.put(OracleEvent("error", payload))

    @staticmethod
    def _stop_session(session: _Session, timeout_seconds: float) -> None:
        session.closing = True
        try:
            session.jobs.put(None)
        except (OSError, ValueError):
            pass
        session.process.join(timeout_seconds)
        if session.process.is_alive():
            session.process.terminate()
            session.process.join(timeout_seconds)
