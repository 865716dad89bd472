"""An OpenAI-compatible API, so any OpenAI client can talk to any checkpoint.

``POST /v1/chat/completions``: ``model`` (``hero``, ``base`` or a checkpoint name such as
``step-00001200``; default ``hero``), ``messages`` (roles ``system``/``developer``/``user``/``assistant``;
content a string or a list of ``{"type": "text", "text"}`` parts), ``temperature`` (0.01-2, default 1; 0 is
greedy), ``top_p`` (default 1), ``max_tokens`` or ``max_completion_tokens`` (tokens, 1-512, default 256),
``stop`` (a string or up to 4), ``seed``, ``n`` (1 only), ``stream`` and ``stream_options.include_usage``
(booleans). Types are strict, as OpenAI's API is (``"5"`` or ``true`` is no integer, ``"false"`` no boolean).
Other OpenAI fields (``user``, penalties, ...) are accepted and ignored. ``stream: false`` answers a
``chat.completion`` object with ``usage`` token counts (a client that closes its connection meanwhile
cancels the generation); ``stream: true`` answers Server-Sent Events,
``data: {chat.completion.chunk}`` lines, then ``data: [DONE]`` (an error after the stream began arrives as
``data: {"error": {...}}``). ``system_fingerprint`` names the checkpoint that answered (what ``hero`` meant
at that moment).

``POST /v1/feedback`` rates an answer by its ``id`` (or two answers as a pair): :mod:`tavern.oracle.feedback`.

``GET /v1/models`` lists the models; ``GET /v1/models/<id>`` one of them. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 invalid request, 404 unknown model, 429 too many
waiting requests, 503 worker or GPU unavailable. Authentication is the Tavern's (``Authorization: Bearer
<tavern.access_token>`` when one is configured; see :mod:`tavern.security`).
"""

from __future__ import annotations

import json
import select
import socket
import time
import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context

from tavern.oracle.feedback import remember
from tavern.oracle.service import ChatParams, OracleInputError, get_service, parse_chat_params
from tavern.oracle.store import ModelNotFound
from tavern.oracle.worker import OracleBusy, OracleRequest

bp = Blueprint("openai", __name__)

DEFAULT_MAX_TOKENS = 256
OWNED_BY = "realm-of-training"
_ROLE_ALIASES = {"developer": "system"}


def openai_error(message: str, status: int, code: str | None = None, param: str | None = None) -> Response:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error")
    resp = jsonify(error={"message": message, "type": kind, "param": param, "code": code})
    resp.status_code = status
    return resp


def _content(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise OracleInputError(f"messages.{index}.content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise OracleInputError(f"messages.{index}.content: must be a string or a list of text parts")


def _optional_bool(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise OracleInputError(f"{name}: must be true or false, got {type(value).__name__} {str(value)[:40]!r}")


def to_chat_params(body: Any) -> tuple[ChatParams, bool, bool]:
    """``(params, stream, include_usage)`` from an OpenAI request body. Types are strict, as OpenAI's are
    (``"5"``/``true`` are not integers, ``"false"`` is not a boolean). Raises :class:`OracleInputError`."""
    if not isinstance(body, dict):
        raise OracleInputError("the request body must be a JSON object")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise OracleInputError("n: only n=1 is supported")
    stream = _optional_bool(body.get("stream"), "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise OracleInputError("stream_options: must be an object")
    include_usage = _optional_bool((options or {}).get("include_usage"), "stream_options.include_usage")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise OracleInputError("messages: a list of messages is required")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise OracleInputError(f"messages.{i}: must be an object")
        role = _ROLE_ALIASES.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise OracleInputError(f"messages.{i}.role: {m.get('role')!r} is not supported "
                                   "(system, developer, user, assistant)")
        clean.append({"role": role, "content": _content(m.get("content"), i)})
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = parse_chat_params({
        "model": body.get("model") or "hero", "messages": clean,
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "max_new_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        "stop": stop, "seed": body.get("seed"),
    })
    return params, stream, include_usage


def _usage(summary: dict[str, Any]) -> dict[str, int]:
    p, c = int(summary.get("prompt_tokens", 0)), int(summary.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@bp.post("/v1/chat/completions")
def chat_completions():
    try:
        params, stream, include_usage = to_chat_params(request.get_json(silent=True))
        req, entry = get_service().start(params)
    except OracleInputError as exc:
        return openai_error(str(exc), 400, "invalid_request")
    except ModelNotFound as exc:
        return openai_error(str(exc), 404, "model_not_found", "model")
    except OracleBusy as exc:
        return openai_error(str(exc), 429, exc.code)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.id,
            "system_fingerprint": entry.checkpoint}
    if stream:
        return Response(stream_with_context(_sse(req, meta, include_usage, params.messages)), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    return _complete(req, meta, params.messages)


def client_left(sock: socket.socket | None) -> bool:
    """True when the HTTP client closed its end of ``sock`` (readable, with nothing left to read): a client
    that half-closes after its request counts as gone too. False without a socket (the test client)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed
        return True


def _complete(req: OracleRequest, meta: dict[str, Any], messages: list) -> Response:
    pieces: list[str] = []
    sock = request.environ.get("werkzeug.socket")
    try:
        for event in req.events(abandoned=lambda: client_left(sock)):  # nobody waits: stop generating
            if event.kind == "token":
                pieces.append(event.payload)
            elif event.kind == "error":
                return openai_error(event.payload["message"], event.payload["status"], event.payload["code"])
            elif event.kind == "done":
                remember(meta["id"], meta["system_fingerprint"], messages, "".join(pieces))  # for /v1/feedback
                return jsonify({**meta, "object": "chat.completion", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "logprobs": None,
                    "finish_reason": event.payload["finish_reason"]}], "usage": _usage(event.payload)})
    finally:
        req.cancel()  # no-op once finished; frees the worker if this request was abandoned
    return openai_error("the oracle ended without an answer", 500, "oracle_error")


def _sse(req: OracleRequest, meta: dict[str, Any], include_usage: bool, messages: list):
    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                **({"usage": None} if include_usage else {}), **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    pieces: list[str] = []
    try:
        yield chunk({"role": "assistant", "content": ""})
        for event in req.events():
            if event.kind == "token":
                pieces.append(event.payload)
                yield chunk({"content": event.payload})
            elif event.kind == "error":
                err = {"message": event.payload["message"], "type": "server_error", "param": None,
                       "code": event.payload["code"]}
                yield f"data: {json.dumps({'error': err}, ensure_ascii=False)}\n\n"
                return
            elif event.kind == "done":
                remember(meta["id"], meta["system_fingerprint"], messages, "".join(pieces))  # for /v1/feedback
                yield chunk({}, event.payload["finish_reason"])
                if include_usage:
                    body = {**meta, "object": "chat.completion.chunk", "choices": [],
                            "usage": _usage(event.payload)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:
        req.cancel()  # the client disconnected mid-stream: stop generating


@bp.get("/v1/models")
def list_models():
    data = [{"id": m.id, "object": "model", "created": int(m.created), "owned_by": OWNED_BY}
            for m in get_service().models()]
    return jsonify(object="list", data=data)


@bp.get("/v1/models/<model_id>")
def get_model(model_id: str):
    for m in get_service().models():
        if m.id == model_id:
            return jsonify(id=m.id, object="model", created=int(m.created), owned_by=OWNED_BY)
    return openai_error(f"unknown model {model_id[:80]!r}", 404, "model_not_found", "model")
