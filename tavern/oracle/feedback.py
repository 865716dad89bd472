"""Feedback on answers, for the feedback loop (:mod:`core.feedback`): the API side and the loop's status.

``POST /v1/feedback`` (beside the OpenAI-compatible ``/v1/chat/completions``; not an OpenAI route) stores a
rating or a pair in the ledger (``source='api'``), as the Oracle page's 👍/👎 and "keep this one" do:

=====================================================  ==========================================================
body                                                   stores
=====================================================  ==========================================================
``{"completion_id": "chatcmpl-…", "rating": 1}``       a rating (``1``/``"up"`` good, ``-1``/``"down"`` bad) of an
                                                       answer this Tavern gave (the newest 1,000 answers are
                                                       remembered, in memory: not across a restart)
``{"chosen_id": "chatcmpl-…", "rejected_id": "…"}``    a pair of two answers to the same messages
``{"messages": [...], "completion": "…", "rating": 1,  the same with the texts given (``model``: the checkpoint
"model": "step-…"}``                                   that answered; default ``hero``)
``{"messages": [...], "chosen": "…", "rejected": "…"}``
=====================================================  ==========================================================

Answer: ``{"id", "kind": "rating"|"pair", "feedback": <status>}`` with the status of
:func:`core.feedback.feedback_status` (``pairs_until_next``, ``ratings_until_next``, ...). Errors in OpenAI's
shape: 400 invalid input, 404 unknown completion id.

``GET /api/oracle/feedback`` -> the same status, for the Oracle page ("N pairs until the next Judge quest").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from core import feedback, preferences
from tavern.context import current_config, current_ledger

bp = Blueprint("oracle_feedback", __name__)

REMEMBERED_COMPLETIONS = 1000
EXTENSION_KEY = "oracle_completions"


class CompletionMemory:
    """The newest answers of ``/v1/chat/completions``: ``id -> (checkpoint, messages, text)``, thread-safe."""

    def __init__(self, size: int = REMEMBERED_COMPLETIONS):
        self.size = size
        self._items: OrderedDict[str, tuple[str, list[dict[str, str]], str]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, completion_id: str, checkpoint: str, messages: list[dict[str, str]], text: str) -> None:
        with self._lock:
            self._items[completion_id] = (checkpoint, messages, text)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, completion_id: Any) -> tuple[str, list[dict[str, str]], str]:
        """Raises ``KeyError`` for an unknown (or forgotten) id."""
        with self._lock:
            if not isinstance(completion_id, str) or completion_id not in self._items:
                raise KeyError(str(completion_id)[:80])
            return self._items[completion_id]


def memory(app=None) -> CompletionMemory:
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    return app.extensions.setdefault(EXTENSION_KEY, CompletionMemory())


def remember(completion_id: str, checkpoint: str | None, messages: list, text: str) -> None:
    """Called by ``/v1/chat/completions`` when an answer is complete (inside the request)."""
    clean = [{"role": m.role, "content": m.content} if hasattr(m, "role") else dict(m) for m in messages]
    memory().add(completion_id, checkpoint or "hero", clean, text)


def _status() -> dict[str, Any]:
    return feedback.feedback_status(current_ledger(), current_config().feedback)


def _rating(value: Any) -> Any:
    return {"up": 1, "down": -1}.get(value, value) if isinstance(value, str) else value


def _error(message: str, status: int):
    from tavern.oracle.openai_api import openai_error

    return openai_error(message, status, "invalid_request" if status == 400 else "not_found")


def _store(body: dict[str, Any]) -> tuple[int, str]:
    ledger = current_ledger()
    if "completion_id" in body:
        checkpoint, messages, text = memory().get(body["completion_id"])
        return preferences.record_rating(ledger, checkpoint=checkpoint, prompt=messages, completion=text,
                                         rating=_rating(body.get("rating")), source="api"), "rating"
    if "chosen_id" in body or "rejected_id" in body:
        checkpoint, messages, chosen = memory().get(body.get("chosen_id"))
        _, other, rejected = memory().get(body.get("rejected_id"))
        if other != messages:
            raise preferences.PreferenceError("chosen_id and rejected_id answer different messages")
        return preferences.record_pair(ledger, checkpoint=checkpoint, prompt=messages, chosen=chosen,
                                       rejected=rejected, source="api"), "pair"
    checkpoint = body.get("model") or "hero"
    if "completion" in body:
        return preferences.record_rating(ledger, checkpoint=checkpoint, prompt=body.get("messages"),
                                         completion=body.get("completion"), rating=_rating(body.get("rating")),
                                         source="api"), "rating"
    return preferences.record_pair(ledger, checkpoint=checkpoint, prompt=body.get("messages"),
                                   chosen=body.get("chosen"), rejected=body.get("rejected"), source="api"), "pair"


@bp.post("/v1/feedback")
def post_feedback():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return _error("the request body must be a JSON object", 400)
    try:
        pid, kind = _store(body)
    except KeyError as exc:
        return _error(f"no remembered answer with id {exc.args[0]!r} (the newest {REMEMBERED_COMPLETIONS} "
                      "answers of this Tavern are remembered); send the texts instead", 404)
    except preferences.PreferenceError as exc:
        return _error(str(exc), 400)
    return jsonify(id=pid, kind=kind, feedback=_status())


@bp.get("/api/oracle/feedback")
def feedback_status():
    return jsonify(_status())
