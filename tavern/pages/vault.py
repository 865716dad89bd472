"""The vault page and its JSON API (blueprint ``vault``): the hero's checkpoints, pins, deletion, disk.

Routes (state-changing ones are POST only; errors are ``{"error": message}``):

- ``GET /vault`` — the page (data from the API; refreshed on ``checkpoint`` and ``vault`` socket events).
- ``GET /api/vault`` — ``{"hero": str, "checkpoints": [...], "pinned": [name...], "disk": {"vault_bytes",
  "free_bytes", "total_bytes"}}``; each checkpoint as :func:`core.vault.list_checkpoints_info` gives it.
- ``POST /api/vault/checkpoints/<name>/pin`` and ``.../unpin`` — 200 ``{"name", "pinned": bool}``.
- ``POST /api/vault/checkpoints/<name>/delete`` — body ``{"confirm": "<the exact name>"}``; 200 with
  :func:`core.vault.delete_checkpoint`'s result.
- ``POST /api/vault/checkpoints/<name>/export`` — body ``{"format": "hf"|"gguf"|"ollama", "quantization": null|
  "f16"|"q8_0"|...}``; 202 with the job (:mod:`tavern.export_jobs`: the export runs as
  ``python -m training export`` in a child process); 409 while another export runs.
- ``GET /api/vault/exports`` — ``{"jobs": [...], "exports": [...] (:func:`core.exports.list_exports`),
  "formats": [...], "quantizations": [...], "default_quantization": str}``. Each job change is pushed as an
  ``export`` socket event carrying the job.

Statuses: 400 for a name that is not ``step-`` and 8 digits (``..``, prefixes, anything else) or a missing
confirmation, 404 for an unknown checkpoint, 409 for one that may not be deleted (latest, best, pinned).
After each change a ``vault`` socket event ``{"action", "name"}`` tells other open pages to refresh.
"""

from __future__ import annotations

import threading

from flask import Blueprint, current_app, jsonify, render_template, request

from core.exports import DEFAULT_QUANTIZATION, FORMATS, QUANTIZATIONS, list_exports
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
from tavern.export_jobs import ExportBusy, ExportJobs
from tavern.extensions import socketio
from tavern.security import refuse

bp = Blueprint("vault", __name__)
EXPORTS_KEY = "exports"  # app.extensions key of the app's ExportJobs
_jobs_lock = threading.Lock()


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


# exports -------------------------------------------------------------------------------------------
def export_jobs(app=None) -> ExportJobs:
    """The app's :class:`ExportJobs` (created on first use; :func:`tavern.app.close_app` closes it)."""
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    with _jobs_lock:
        jobs = app.extensions.get(EXPORTS_KEY)
        if jobs is None:
            jobs = app.extensions[EXPORTS_KEY] = ExportJobs(current_realm(),
                                                            on_change=lambda job: socketio.emit("export", job))
    return jobs


@bp.get("/api/vault/exports")
def api_exports():
    return jsonify(jobs=export_jobs().jobs(), exports=list_exports(current_realm()), formats=list(FORMATS),
                   quantizations=list(QUANTIZATIONS), default_quantization=DEFAULT_QUANTIZATION)


@bp.post("/api/vault/checkpoints/<name>/export")
def api_export(name: str):
    if (bad := _check_name(name)) is not None:
        return bad
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return refuse(400, "send a JSON object: {\"format\": \"hf\" | \"gguf\" | \"ollama\", \"quantization\": ...}")
    fmt, quantization = body.get("format"), body.get("quantization")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        return refuse(400, f"format must be one of {', '.join(FORMATS)}")
    if quantization is not None and (not isinstance(quantization, str) or quantization not in QUANTIZATIONS):
        return refuse(400, f"quantization must be null or one of {', '.join(QUANTIZATIONS)}")
    if fmt == "hf" and quantization is not None:
        return refuse(400, "quantization applies to gguf and ollama exports only")
    if not _known(name):
        return refuse(404, f"no checkpoint {name} in the vault of {_hero()}")
    try:
        job = export_jobs().start(name, fmt, quantization)
    except ExportBusy as exc:
        return refuse(409, str(exc))
    socketio.emit("export", job)
    resp = jsonify(job)
    resp.status_code = 202
    return resp
