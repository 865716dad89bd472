"""The oracle of one Tavern app: request validation, model lookup and the shared worker process.

Both the Socket.IO chat (:mod:`tavern.oracle.routes`) and the OpenAI-compatible API
(:mod:`tavern.oracle.openai_api`) go through :meth:`OracleService.start`, so both obey the same limits:
at most :data:`~tavern.oracle.worker.MAX_NEW_TOKENS_LIMIT` new tokens, ``temperature`` 0 (greedy) or in
[0.01, 2] (below 0.01 the logits divided by it overflow float32 into inf/nan probabilities; vLLM clamps at
the same value), ``top_p`` in (0, 1], ``seed`` within ``torch.manual_seed``'s range, at most
:data:`MAX_CONVERSATION_CHARS` characters of conversation, and the worker's bound on waiting requests.
Types are strict, as OpenAI's API is: ``"5"`` or ``true`` is not an integer (a float field takes an integer).
"""

from __future__ import annotations

import threading
from typing import Literal

from flask import Flask
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tavern.context import TavernState, tavern_state
from tavern.oracle.engine import GenerationJob
from tavern.oracle.store import ModelEntry, list_models, resolve_model
from tavern.oracle.worker import MAX_NEW_TOKENS_LIMIT, OracleRequest, OracleWorker

EXTENSION_KEY = "oracle"
MAX_MESSAGES = 256
MAX_MESSAGE_CHARS = 100_000
MAX_CONVERSATION_CHARS = 1_000_000  # no small hero reads more; the worker also checks the model's context
MIN_TEMPERATURE = 0.01  # the smallest sampling temperature above 0 (greedy)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.manual_seed's range


class OracleInputError(ValueError):
    """A chat request with invalid fields; the message names each bad field (``messages.0.role: ...``)."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatParams(BaseModel):
    """One chat request. ``max_new_tokens`` in tokens; ``stop``: extra stop strings; ``seed``: makes
    sampling repeatable."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str = Field("hero", min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}: a smaller temperature "
                             "overflows the sampling probabilities")
        return value

    @field_validator("messages")
    @classmethod
    def _conversation_size(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        chars = sum(len(m.content) for m in messages)
        if chars > MAX_CONVERSATION_CHARS:
            raise ValueError(f"the conversation is {chars} characters; at most {MAX_CONVERSATION_CHARS}")
        return messages


def parse_chat_params(data: object) -> ChatParams:
    """Validate a request body. Raises :class:`OracleInputError` listing every bad field."""
    if not isinstance(data, dict):
        raise OracleInputError("the request must be a JSON object")
    try:
        return ChatParams.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(body)"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {'unknown field' if err['type'] == 'extra_forbidden' else msg}")
        raise OracleInputError("; ".join(problems)) from None


class OracleService:
    """Looks models up in the realm and sends requests to the worker. Thread-safe."""

    def __init__(self, state: TavernState, worker: OracleWorker):
        self.state, self.worker = state, worker
        self._owners: dict[str, str] = {}  # request_id -> Socket.IO sid that may cancel it
        self._lock = threading.Lock()

    def models(self) -> list[ModelEntry]:
        return list_models(self.state.realm, self.state.config, self.state.ledger)

    def start(self, params: ChatParams, owner: str | None = None) -> tuple[OracleRequest, ModelEntry]:
        """Resolve ``params.model`` and queue the request.

        Raises :class:`~tavern.oracle.store.ModelNotFound` or :class:`~tavern.oracle.worker.OracleBusy`.
        """
        entry = resolve_model(self.state.realm, self.state.config, self.state.ledger, params.model)
        job = GenerationJob(
            request_id="", model_name=entry.checkpoint, model_path=entry.path,
            messages=[m.model_dump() for m in params.messages], max_new_tokens=params.max_new_tokens,
            temperature=params.temperature, top_p=params.top_p, stop=list(params.stop), seed=params.seed,
            hero=self.state.config.hero.model_dump(), realm_root=str(self.state.realm.root))
        request = self.worker.submit(job)
        if owner is not None:
            with self._lock:
                self._owners[request.request_id] = owner
        return request, entry

    def cancel(self, request_id: str, owner: str) -> bool:
        """Cancel a request started by ``owner``. Returns False for an unknown id or another owner's."""
        with self._lock:
            if self._owners.get(request_id) != owner:
                return False
        self.worker.cancel(request_id)
        return True

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._owners.pop(request_id, None)

    def close(self) -> None:
        self.worker.close()


def init_service(app: Flask, worker: OracleWorker | None = None) -> OracleService:
    """Attach an :class:`OracleService` to ``app`` (the worker process starts on the first request)."""
    service = OracleService(tavern_state(app), worker or OracleWorker())
    app.extensions[EXTENSION_KEY] = service
    return service


def get_service(app: Flask | None = None) -> OracleService:
    """The oracle of ``app`` (default: the current app). Raises ``RuntimeError`` when not initialised."""
    from flask import current_app

    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        return app.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError("the oracle is not initialised: call tavern.oracle.init_oracle(app, socketio)") from None
