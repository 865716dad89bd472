"""Controls (blueprint ``controls``): pause, resume, skip, stop through the ledger's control channel.

- ``POST /api/controls/<command>`` (``pause`` | ``resume`` | ``skip`` | ``stop``) — queues the command
  (``Ledger.send_command``) and answers 202 ``{"id", "command", "state": "pending", ...}``. 409 when the
  daemon is not running (a queued command would otherwise act at its next start), naming the command that
  starts it on this realm (``python -m training --realm R start-all``, which also replaces a supervisor
  left without its daemon by the *stop* button); 404 for another name.
- ``GET /api/controls/<id>`` — that command's row: ``state`` pending → done | failed, ``result`` text.
- ``GET /api/controls`` — the 20 latest commands, newest first.

The daemon handles commands between optimizer steps and acknowledges them
(``Ledger.finish_command``); the push poller then emits a ``command`` Socket.IO event. skip: the current
quest goes back to the queue (nothing lost); stop: checkpoint first, then exit.
"""

from __future__ import annotations

import shlex
import time

from flask import Blueprint, jsonify

from tavern.context import current_ledger, current_realm
from tavern.push import command_payload
from tavern.security import refuse
from tavern.status import daemon_view

bp = Blueprint("controls", __name__, url_prefix="/api/controls")

COMMANDS: dict[str, str] = {  # command -> what the button says it does
    "pause": "Pause training after the current optimizer step",
    "resume": "Resume a paused training",
    "skip": "Put the current quest back in the queue (after the others); nothing is lost",
    "stop": "Save a checkpoint, then stop the daemon",
}
RECENT_COMMANDS = 20


@bp.post("/<command>")
def send(command: str):
    if command not in COMMANDS:
        return refuse(404, f"unknown command {command!r}; one of {sorted(COMMANDS)}")
    ledger = current_ledger()

    daemon = daemon_view(ledger, time.time())
    if daemon["display_state"] in ("not running", "stopped"):
        start = f"python -m training --realm {shlex.quote(str(current_realm().root))} start-all"
        return jsonify(error=f"the training daemon is {daemon['display_state']}: start it with `{start}`",
                       daemon=daemon["display_state"]), 409
    command_id = ledger.send_command(command)
    return jsonify(command_payload(ledger.command(command_id))), 202


@bp.get("/<int:command_id>")
def get(command_id: int):
    row = current_ledger().command(command_id)
    if row is None:
        return refuse(404, f"no command {command_id}")
    return jsonify(command_payload(row))


@bp.get("/<name>")
def get_other(name: str):
    """Not a command id (not ASCII digits, or past SQLite's int64): no such command (rather than 405)."""
    return jsonify(error=f"no command {name[:40]!r}"), 404


@bp.get("")
def recent():
    rows = current_ledger().recent_commands(RECENT_COMMANDS)
    return jsonify(commands=[command_payload(r) for r in rows])
