"""The Oracle page: chat with any checkpoint over Socket.IO, rate answers, keep preference data.

Page and JSON routes (blueprint ``oracle``):

==========================================  ===============================================================
``GET  /oracle``                            the chat page
``GET  /api/oracle/models``                 ``{"models": [...], "worker": {...}}`` (see :mod:`.store`)
``POST /api/oracle/ratings``                ``{checkpoint, prompt, completion, rating: 1|-1, replaces?}``
                                            -> ``{"id"}``: a 👍/👎 on one answer
``POST /api/oracle/pairs``                  ``{checkpoint, prompt, chosen, rejected, replaces?}`` -> ``{"id"}``
``GET  /api/oracle/preferences``            ``?kind=pair|rating&limit=&before_id=`` -> ``{"preferences",
                                            "counts"}``, newest first
``POST /api/oracle/preferences/<id>/delete`` forget one row
``GET  /api/oracle/preferences/export``     ``?kind=pair`` (DPO) or ``rating`` (KTO): JSON lines download
``GET  /api/oracle/feedback``               the feedback loop's status (:mod:`tavern.oracle.feedback`)
==========================================  ===============================================================

Socket.IO (client -> server): ``oracle_chat`` ``{model, messages, temperature, top_p, max_new_tokens,
client_ref?}`` (acknowledged with ``{"ok", "request_id" | "error"}``), ``oracle_cancel``
``{request_id}``. Server -> that client only: ``oracle_status`` ``{request_id, client_ref, status:
"starting"|"loading", model, checkpoint}``, ``oracle_token`` ``{request_id, client_ref, text}``,
``oracle_done`` ``{request_id, client_ref, model, checkpoint, finish_reason, prompt_tokens,
completion_tokens, seconds}``, ``oracle_error`` ``{request_id, client_ref, error, code}``.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, jsonify, render_template, request, stream_with_context
from flask_socketio import SocketIO

from core import preferences
from tavern.context import current_ledger
from tavern.oracle.feedback import bp as feedback_bp
from tavern.oracle.openai_api import bp as openai_bp
from tavern.oracle.service import (
    EXTENSION_KEY,
    OracleInputError,
    get_service,
    init_service,
    parse_chat_params,
)
from tavern.oracle.store import ModelNotFound
from tavern.oracle.worker import MAX_NEW_TOKENS_LIMIT, OracleBusy, OracleRequest
from tavern.params import int_arg, json_int
from tavern.security import refuse

bp = Blueprint("oracle", __name__)

MAX_LIST_LIMIT = 500


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise preferences.PreferenceError("the request body must be a JSON object")
    return data


@bp.errorhandler(preferences.PreferenceError)
def _preference_error(exc: preferences.PreferenceError):
    return refuse(400, str(exc))


@bp.get("/oracle")
def index():
    return render_template("oracle.html", max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT)


@bp.get("/api/oracle/models")
def models():
    service = get_service()
    return jsonify(models=[m.to_json() for m in service.models()], worker=service.worker.status())


def _replaces(data: dict[str, Any]) -> int | None:
    value = data.get("replaces")
    return None if value is None else json_int(value, "replaces (the id of an earlier preference)", lo=1)


@bp.post("/api/oracle/ratings")
def rate():
    data = _body()
    rating = data.get("rating")
    rating = {"up": 1, "down": -1}.get(rating, rating) if isinstance(rating, str) else rating
    pid = preferences.record_rating(
        current_ledger(), checkpoint=data.get("checkpoint"), prompt=data.get("prompt"),
        completion=data.get("completion"), rating=rating, source="oracle", replaces=_replaces(data))
    return jsonify(id=pid)


@bp.post("/api/oracle/pairs")
def pick():
    data = _body()
    pid = preferences.record_pair(
        current_ledger(), checkpoint=data.get("checkpoint"), prompt=data.get("prompt"), chosen=data.get("chosen"),
        rejected=data.get("rejected"), source="oracle", replaces=_replaces(data))
    return jsonify(id=pid)


def _kind_arg() -> str | None:
    kind = request.args.get("kind") or None
    if kind is not None and kind not in ("pair", "rating"):
        raise preferences.PreferenceError("kind must be 'pair' or 'rating'")
    return kind


@bp.get("/api/oracle/preferences")
def list_preferences():
    limit = min(int_arg("limit", 100, lo=1), MAX_LIST_LIMIT)
    before_id = int_arg("before_id", None)
    ledger = current_ledger()
    return jsonify(preferences=preferences.list_preferences(ledger, _kind_arg(), limit, before_id),
                   counts=preferences.preference_counts(ledger))


@bp.post("/api/oracle/preferences/<int:preference_id>/delete")
def delete_preference(preference_id: int):
    preferences.delete_preference(current_ledger(), preference_id)
    return jsonify(deleted=preference_id)


@bp.get("/api/oracle/preferences/export")
def export_preferences():
    kind = _kind_arg() or "pair"
    ledger = current_ledger()
    records = preferences.preference_records(ledger) if kind == "pair" else preferences.rating_records(ledger)
    name = "oracle-preferences-dpo.jsonl" if kind == "pair" else "oracle-ratings-kto.jsonl"
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return Response(stream_with_context(lines), mimetype="application/jsonl",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


# Socket.IO ----------------------------------------------------------------------------------------
def _stream(socketio: SocketIO, service, req: OracleRequest, entry, sid: str, client_ref: Any) -> None:
    """Forward one request's events to the client that asked (background task)."""
    base = {"request_id": req.request_id, "client_ref": client_ref}
    manager = socketio.server.manager
    try:
        for event in req.events():
            if not manager.is_connected(sid, "/"):
                req.cancel()  # the browser went away: free the worker
                return
            if event.kind in ("starting", "loading"):
                socketio.emit("oracle_status", {**base, "status": event.kind, "model": entry.id,
                                                "checkpoint": entry.checkpoint}, to=sid)
            elif event.kind == "token":
                socketio.emit("oracle_token", {**base, "text": event.payload}, to=sid)
            elif event.kind == "done":
                socketio.emit("oracle_done", {**base, **event.payload, "model": entry.id,
                                              "checkpoint": entry.checkpoint}, to=sid)
            elif event.kind == "error":
                socketio.emit("oracle_error", {**base, "error": event.payload["message"],
                                               "code": event.payload["code"]}, to=sid)
    finally:
        service.forget(req.request_id)


def register_socket_handlers(socketio: SocketIO) -> None:
    """Register ``oracle_chat`` and ``oracle_cancel`` on ``socketio`` (call after ``init_app``)."""

    @socketio.on("oracle_chat")
    def _oracle_chat(data):
        sid = request.sid  # type: ignore[attr-defined]
        client_ref = data.get("client_ref") if isinstance(data, dict) else None
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "client_ref"}
        service = get_service()
        try:
            req, entry = service.start(parse_chat_params(data), owner=sid)
        except (OracleInputError, ModelNotFound, OracleBusy) as exc:
            code = getattr(exc, "code", "invalid_request" if isinstance(exc, OracleInputError) else "model_not_found")
            socketio.emit("oracle_error", {"request_id": None, "client_ref": client_ref, "error": str(exc),
                                           "code": code}, to=sid)
            return {"ok": False, "error": str(exc)}
        socketio.start_background_task(_stream, socketio, service, req, entry, sid, client_ref)
        return {"ok": True, "request_id": req.request_id, "model": entry.id, "checkpoint": entry.checkpoint}

    @socketio.on("oracle_cancel")
    def _oracle_cancel(data):
        request_id = data.get("request_id") if isinstance(data, dict) else None
        ok = isinstance(request_id, str) and get_service().cancel(request_id, request.sid)  # type: ignore[attr-defined]
        return {"ok": bool(ok)}


def init_oracle(app, socketio: SocketIO) -> None:
    """Give ``app`` its oracle (worker process started on the first request) and register the Socket.IO
    handlers. Called by :func:`tavern.app.create_app` after ``socketio.init_app``."""
    init_service(app)
    register_socket_handlers(socketio)


def close_oracle(app) -> None:
    """Stop ``app``'s oracle worker process, if it runs (shutdown, tests)."""
    service = app.extensions.get(EXTENSION_KEY)
    if service is not None:
        service.close()


bp.register_blueprint(openai_bp)
bp.register_blueprint(feedback_bp)
