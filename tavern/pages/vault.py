"""The vault page and its JSON API (blueprint ``vault``): the hero's checkpoints, pins, deletion, disk.

Routes (state-changing ones are POST only; errors are ``{"error": message}``):

- ``GET /vault`` — the page (data from the API; refreshed on ``checkpoint`` and ``vault`` socket events).
- ``GET /api/vault`` — ``{"hero": str, "checkpoints": [...], "pinned": [name...], "disk": {"vault_bytes",
  "free_bytes", "total_bytes"}}``; each checkpoint as :func:`core.vault.list_checkpoints_info` gives it.
- ``POST /api/vault/checkpoints/<name>/pin`` and ``.../unpin`` — 200 ``{"name", "pinned": bool}``.
- ``POST /api/vault/checkpoints/<name>/delete`` — body ``{"confirm": "<the exact name>"}``; 200 with
  :func:`core.vault.delete_checkpoint`'s result.

Statuses: 400 for a name that is not ``step-`` and 8 digits (``..``, prefixes, anything else) or a missing
confirmation, 404 for an unknown checkpoint, 409 for one that may not be deleted (latest, best, pinned).
After each change a ``vault`` socket event ``{"action", "name"}`` tells other open pages to refresh.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, render_template, request

from core.vault import (
    VaultError,
    delete_checkpoint,
    list_checkpoints_info,
    parse_checkpoint_name,
    pin,
    pinned_checkpoints,
    unpin,
    vault_disk_usage,
)
from tavern.context import current_config, current_ledger, current_realm
from tavern.extensions import socketio
from tavern.security import refuse

bp = Blueprint("vault", __name__)


def _hero() -> str:
    return current_config().hero.name


def _known(name: str) -> bool:
    return any(c["name"] == name for c in list_checkpoints_info(current_realm(), _hero(), current_ledger()))


def _check_name(name: str):
    """None when ``name`` is a checkpoint name, else a 400 response."""
    try:
        parse_checkpoint_name(name)
    except VaultError as exc:
        return refuse(400, str(exc))
    return None


def _notify(action: str, name: str) -> None:
    socketio.emit("vault", {"action": action, "name": name})


@bp.get("/vault")
def index():
    return render_template("vault.html", hero=_hero())


@bp.get("/api/vault")
def api_list():
    realm, ledger, hero = current_realm(), current_ledger(), _hero()
    return jsonify(hero=hero, checkpoints=list_checkpoints_info(realm, hero, ledger),
                   pinned=pinned_checkpoints(ledger), disk=vault_disk_usage(realm, hero))


@bp.post("/api/vault/checkpoints/<name>/pin")
def api_pin(name: str):
    if (bad := _check_name(name)) is not None:
        return bad
    try:
        pin(current_ledger(), name, current_realm(), _hero())
    except VaultError as exc:
        return refuse(404, str(exc))
    _notify("pinned", name)
    return jsonify(name=name, pinned=True)


@bp.post("/api/vault/checkpoints/<name>/unpin")
def api_unpin(name: str):
    if (bad := _check_name(name)) is not None:
        return bad
    unpin(current_ledger(), name)
    _notify("unpinned", name)
    return jsonify(name=name, pinned=False)


@bp.post("/api/vault/checkpoints/<name>/delete")
def api_delete(name: str):
    if (bad := _check_name(name)) is not None:
        return bad
    body = request.get_json(silent=True)
    confirm = body.get("confirm") if isinstance(body, dict) else request.form.get("confirm")
    if not isinstance(confirm, str) or not confirm:
        return refuse(400, f"type the exact name {name} to confirm the deletion (field 'confirm')")
    if not _known(name):
        return refuse(404, f"no checkpoint {name} in the vault of {_hero()}")
    try:
        result = delete_checkpoint(current_realm(), _hero(), current_ledger(), name, confirm)
    except VaultError as exc:
        return refuse(409, str(exc))
    _notify("deleted", name)
    return jsonify(result)
