"""Push: a background poller that turns new ledger rows into Socket.IO events.

The daemon is another process and writes only to SQLite, so the Tavern polls the ledger (its own
connection; WAL readers never block the writer) every ``POLL_INTERVAL_SECONDS`` = 0.1 s, which keeps the
step → browser delay under 250 ms. Each poll costs a few indexed queries, whatever the number of browsers.

Events (all broadcast; payloads documented in ``tavern/README_DEV.md``): ``step``, ``eval``, ``event``,
``quest``, ``checkpoint``, ``command``, ``status``, ``history_reset``. Only rows that appear after the
poller started are pushed; pages load the past from ``/api`` (``Tavern.onResync``).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any

from flask import Flask
from flask_socketio import SocketIO

from core.checkpoint_layout import list_checkpoints
from core.contract import DAEMON_KEY
from core.ledger import CommandState, Ledger
from tavern.context import tavern_state
from tavern.status import build_status, checkpoint_view

log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 0.1
STATUS_MIN_INTERVAL_SECONDS = 0.25  # at most 4 status events per second while things change
STATUS_IDLE_INTERVAL_SECONDS = 2.0  # and one every 2 s anyway (heartbeat age, daemon liveness)
CHECKPOINT_SCAN_INTERVAL_SECONDS = 1.0
QUEST_CLOCK_SLACK_SECONDS = 5.0  # re-read quests updated this long before the newest seen (commit order)
EXTENSION_KEY = "tavern_push"


def clean(row: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy: non-finite floats become None (JSON has no NaN/Infinity)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class LedgerPoller:
    """Reads rows newer than its cursors and emits them. :meth:`poll_once` is one pass (tests call it);
    :meth:`start` runs it every ``poll_interval_seconds`` in a daemon thread until :meth:`stop`."""

    def __init__(self, app: Flask, socketio: SocketIO, poll_interval_seconds: float = POLL_INTERVAL_SECONDS):
        state = tavern_state(app)
        self.realm, self.config, self.socketio = state.realm, state.config, socketio
        self.poll_interval_seconds = poll_interval_seconds
        self.ledger = Ledger(self.realm.ledger_path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_step = self.ledger.step_bounds()[1] or 0
        self.last_eval_seq = self.ledger.last_eval_seq()
        self.last_event_id = self.ledger.last_event_id()
        self.quests = self.ledger.quest_states()
        self.quest_clock = self.ledger.last_quest_update()
        self.commands = self.ledger.command_states()
        self.kv_clock = self._daemon_clock()
        self.checkpoints = self._scan_checkpoints()
        self._last_scan = time.monotonic()
        self._last_status = 0.0
        self._dirty = True

    # lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tavern-push", daemon=True)
            self._thread.start()

    def stop(self, timeout_seconds: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)
        self.ledger.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a locked or briefly missing ledger must not kill the live view
                log.exception("push poll failed")
            self._stop.wait(self.poll_interval_seconds)

    # one pass -------------------------------------------------------------------------------------
    def poll_once(self) -> int:
        """Emit everything new since the last pass. Returns the number of events emitted."""
        n = self._steps() + self._evals() + self._events() + self._quests() + self._commands()
        if time.monotonic() - self._last_scan >= CHECKPOINT_SCAN_INTERVAL_SECONDS:
            n += self._checkpoints()
        clock = self._daemon_clock()
        if clock != self.kv_clock:
            self.kv_clock, self._dirty = clock, True
        self._dirty = self._dirty or n > 0
        since = time.monotonic() - self._last_status
        if (self._dirty and since >= STATUS_MIN_INTERVAL_SECONDS) or since >= STATUS_IDLE_INTERVAL_SECONDS:
            self._emit("status", build_status(self.ledger, self.realm, self.config))
            self._last_status, self._dirty = time.monotonic(), False
            n += 1
        return n

    def _emit(self, event: str, payload: Any) -> None:
        self.socketio.emit(event, payload)

    def _steps(self) -> int:
        top = self.ledger.step_bounds()[1] or 0
        if top < self.last_step:  # the daemon rolled back to its last checkpoint after a crash
            self.last_step = top
            self._emit("history_reset", {"global_step": top})
            return 1
        rows = self.ledger.steps(self.last_step, limit=1000, with_examples=False)
        for r in rows:
            self._emit("step", clean(r))
        if rows:
            self.last_step = rows[-1]["global_step"]
        return len(rows)

    def _evals(self) -> int:
        rows = self.ledger.evals_written_after(self.last_eval_seq)
        for r in rows:
            self.last_eval_seq = r.pop("seq")
            self._emit("eval", clean(r))
        return len(rows)

    def _events(self) -> int:
        rows = self.ledger.events(since_id=self.last_event_id, limit=500)
        for r in rows:
            self.last_event_id = r["id"]
            self._emit("event", event_payload(r))
        return len(rows)

    def _quests(self) -> int:
        rows = self.ledger.quests_updated_since(self.quest_clock - QUEST_CLOCK_SLACK_SECONDS)
        n = 0
        for r in rows:
            self.quest_clock = max(self.quest_clock, r["updated_at"])
            before = self.quests.get(r["id"])
            if before != (r["state"], r["priority"]):
                self.quests[r["id"]] = (r["state"], r["priority"])
                self._emit("quest", {"quest": clean(r), "previous_state": before[0] if before else None})
                n += 1
        return n

    def _commands(self) -> int:
        pending = [i for i, s in self.commands.items() if s == CommandState.PENDING.value]
        rows = self.ledger.commands_since(max(self.commands, default=0), also=pending)
        n = 0
        for r in rows:
            if self.commands.get(r["id"]) != r["state"]:
                self.commands[r["id"]] = r["state"]
                self._emit("command", command_payload(r))
                n += 1
        return n

    def _checkpoints(self) -> int:
        self._last_scan = time.monotonic()
        now = self._scan_checkpoints()
        n = 0
        for name in sorted(now.keys() - self.checkpoints.keys()):
            self._emit("checkpoint", {"action": "added", **now[name]})
            n += 1
        for name in sorted(self.checkpoints.keys() - now.keys()):
            self._emit("checkpoint", {"action": "removed", **self.checkpoints[name]})
            n += 1
        self.checkpoints = now
        return n

    # helpers ----------------------------------------------------------------------------------------
    def _daemon_clock(self) -> float | None:
        return self.ledger.value_updated_at(DAEMON_KEY)

    def _hero_name(self) -> str:
        hero = self.ledger.daemon_status().get("hero")
        return (hero if isinstance(hero, dict) else {}).get("name") or self.config.hero.name

    def _scan_checkpoints(self) -> dict[str, dict[str, Any]]:
        folder = self.realm.checkpoints_dir(self._hero_name())
        return {p.name: checkpoint_view(self.realm, p) for p in list_checkpoints(folder)}


def event_payload(row: dict[str, Any]) -> dict[str, Any]:
    """An events row with ``data`` parsed from JSON (None when absent or unreadable)."""
    out = dict(row)
    try:
        out["data"] = json.loads(row["data"]) if row.get("data") else None
    except (TypeError, ValueError):
        out["data"] = None
    return out


def command_payload(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    try:
        out["args"] = json.loads(row["args"]) if row.get("args") else {}
    except (TypeError, ValueError):
        out["args"] = {}
    return out


def init_push(app: Flask, socketio: SocketIO) -> None:
    """Create the app's poller; start it now unless the app is in testing mode (tests call
    :func:`start_push`)."""
    poller = LedgerPoller(app, socketio)
    app.extensions[EXTENSION_KEY] = poller
    if not app.testing:
        poller.start()


def start_push(app: Flask) -> LedgerPoller:
    poller: LedgerPoller = app.extensions[EXTENSION_KEY]
    poller.start()
    return poller


def stop_push(app: Flask) -> None:
    poller: LedgerPoller | None = app.extensions.get(EXTENSION_KEY)
    if poller is not None:
        poller.stop()
