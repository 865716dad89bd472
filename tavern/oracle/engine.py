"""The inference side of the oracle, run inside the worker process (:mod:`tavern.oracle.worker`).

Loads Hugging Face checkpoints (LRU cache of ``cache_size`` models), renders the chat with the hero
tokenizer's chat template (control tokens typed by the user are encoded as plain text), samples with
``model.generate`` and hands decoded text to ``emit`` as it is produced: whole characters only (a token
that ends inside a UTF-8 character waits for the next one) and never a piece of a stop string.

Imports torch and transformers lazily: the Tavern process that imports this module stays light.
"""

from __future__ import annotations

import gc
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Markers that end an assistant turn in common chat templates; used as stop strings when the template
# contains them (a model whose tokenizer lacks them as tokens writes them out as text).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|end|>", "<|endoftext|>",
                       "<end_of_turn>")
GPU_OVERHEAD_BYTES = 256 * 1024 * 1024  # KV cache, activations and CUDA context beyond the weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class OracleError(RuntimeError):
    """A request could not be served; the message is meant for the user (shown in the chat).

    ``status``: the HTTP status an API answer should carry; ``code``: a short machine-readable reason
    (``context_length_exceeded``, ``insufficient_gpu_memory``, ``model_load_failed``, ...).
    """

    def __init__(self, message: str, status: int = 500, code: str = "oracle_error"):
        super().__init__(message)
        self.status, self.code = status, code

    def to_payload(self) -> dict[str, Any]:
        return {"message": str(self), "status": self.status, "code": self.code}


@dataclass
class GenerationJob:
    """One chat completion request, as sent to the worker process (picklable).

    ``messages``: list of ``{"role", "content"}``; ``temperature`` 0 means greedy decoding; ``top_p`` in
    (0, 1]; ``max_new_tokens`` in tokens; ``stop``: extra stop strings; ``hero``: the realm's
    ``HeroConfig`` as a dict (chat template override, trust_remote_code).
    """

    request_id: str
    model_name: str
    model_path: str | None
    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float = 0.7
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    hero: dict[str, Any] = field(default_factory=dict)
    realm_root: str = ""


def weights_bytes(path: Path | str) -> int:
    """Bytes of the weight files in a model folder (0 for a hub id or a folder without weights)."""
    p = Path(path)
    if not p.is_dir():
        return 0
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def _stored_bytes_per_param(path: str) -> int:
    """Bytes per parameter in the weight files, from ``config.json``'s ``dtype`` (4 when unknown)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 4
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return 2 if dtype in ("bfloat16", "float16") else 4


def _fingerprint(path: str) -> tuple:
    """Changes when the folder's files change (a checkpoint re-saved under the same name)."""
    p = Path(path)
    if not p.is_dir():
        return (path,)
    return tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in p.iterdir() if f.is_file()))


class IncrementalTextStreamer:
    """A ``transformers`` streamer (``put``/``end``) that calls ``emit(text)`` with each new piece.

    It decodes all generated ids so far and emits only settled text: a trailing ``\ufffd`` (a token that
    ends inside a UTF-8 character) waits for the next token, and so does a tail that could be the start of
    one of ``stops``. When a stop string appears, the text before it is emitted and ``stopped`` is set
    (the stopping criteria then end generation). The first ``put`` (the prompt) is skipped.
    """

    def __init__(self, tokenizer, emit: Callable[[str], None], stops: list[str]):
        self.tokenizer, self.emit, self.stops = tokenizer, emit, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False  # a stop string was produced
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt ids
            self._prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._send(text[:cut])
            return
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":  # an unfinished UTF-8 character
            end -= 1
        for s in self.stops:  # hold back a tail that may be the start of a stop string
            for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                if text[end - k:end] == s[:k]:
                    end -= k
                    break
        self._send(text[:end])

    def end(self) -> None:
        if not self.stopped:
            self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


class Engine:
    """Loads models (LRU cache of ``cache_size``) and serves :class:`GenerationJob` s, one at a time.

    ``device``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``. On CUDA a model is
    loaded only when ``torch.cuda.mem_get_info`` shows room for its weights plus 256 MiB; otherwise
    :class:`OracleError` says so (training keeps the memory).
    """

    def __init__(self, cache_size: int = 2, device: str = "auto"):
        import torch

        self.torch = torch
        self.cache_size = max(1, cache_size)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self._cache: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
        self._longest: dict[int, int] = {}  # id(tokenizer) -> characters of its longest token

    def cached_models(self) -> list[str]:
        return [key[0] for key in self._cache]

    def _longest_token_chars(self, tokenizer) -> int:
        """Characters of the longest vocabulary entry: no token covers more text, so a conversation of
        ``c`` characters is at least ``c / this`` tokens (byte-level vocabularies spell one byte per
        character; added control tokens are left out, since typed ones are encoded as text; a normalizer
        that deletes text would break the bound, and chat tokenizers have none)."""
        key = id(tokenizer)
        if key not in self._longest:  # added (control) tokens typed by a user are encoded as plain text
            added = set(tokenizer.get_added_vocab())
            self._longest[key] = max((len(t) for t in tokenizer.get_vocab() if t not in added), default=1) or 1
        return self._longest[key]

    def _dtype(self):
        torch = self.torch
        if self.device == "cpu":
            return torch.float32  # bf16/fp16 matmuls are ~100x slower on CPUs without native support
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def check_gpu_memory(self, model_name: str, path: str) -> None:
        """On CUDA, raise :class:`OracleError` (503, ``insufficient_gpu_memory``) unless the free GPU memory
        holds the weights of ``path`` in 16 bits plus 256 MiB. No-op on CPU."""
        if self.device != "cuda":
            return
        free, _total = self.torch.cuda.mem_get_info()
        need = weights_bytes(path) * 2 // _stored_bytes_per_param(path) + GPU_OVERHEAD_BYTES  # loaded in 16 bits
        if need > free:
            mib = 1024 * 1024
            raise OracleError(f"not enough free GPU memory for {model_name}: it needs about {need // mib} MiB, "
                              f"{free // mib} MiB are free (training is using the GPU); try again later",
                              status=503, code="insufficient_gpu_memory")

    def load(self, job: GenerationJob, on_loading: Callable[[], None] = lambda: None):
        """``(model, tokenizer)`` for the job's model, from the cache or disk (evicting the least recent).

        Raises :class:`OracleError` when the folder cannot be loaded or the GPU has no room.
        """
        from core.config import HeroConfig
        from core.hero import HeroError, load_model, load_tokenizer, resolve_model_source
        from core.realm import Realm

        hero = HeroConfig(**job.hero)
        path = job.model_path
        try:
            if path is None:
                path, _newborn = resolve_model_source(Realm.at(job.realm_root), hero, create=False)
            key = (path, _fingerprint(path), json.dumps(job.hero, sort_keys=True))
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            on_loading()
            self.check_gpu_memory(job.model_name, path)
            tokenizer = load_tokenizer(path, hero)
            model = load_model(path, hero, dtype=self._dtype())
        except HeroError as exc:
            raise OracleError(f"cannot load {job.model_name}: {exc}", status=500, code="model_load_failed") from exc
        model.to(self.device).eval()
        while len(self._cache) >= self.cache_size:
            _, (_, evicted) = self._cache.popitem(last=False)
            self._longest.pop(id(evicted), None)
            gc.collect()
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
        self._cache[key] = (model, tokenizer)
        return model, tokenizer

    def generate(self, job: GenerationJob, emit: Callable[[str], None], cancelled: Callable[[], bool],
                 on_loading: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """Generate an answer, calling ``emit(text)`` for each new piece. Returns the summary:
        ``finish_reason`` (``stop``, ``length`` or ``cancelled``), ``prompt_tokens``, ``completion_tokens``,
        ``seconds`` (wall time of generation, excluding loading).

        Raises :class:`OracleError` for a conversation longer than the model's context.
        """
        torch = self.torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        model, tokenizer = self.load(job, on_loading)
        template = tokenizer.chat_template or ""
        context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        chars = sum(len(m["content"]) for m in job.messages)
        at_least = -(-chars // self._longest_token_chars(tokenizer))
        if at_least >= context - 1:  # certainly too long: refused without tokenizing megabytes
            raise OracleError(f"the conversation is at least {at_least} tokens ({chars} characters) and "
                              f"{job.model_name} reads at most {context}: start a new chat or remove earlier "
                              "messages", status=400, code="context_length_exceeded")
        enc = tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, sanitize_control_tokens=True)
        input_ids = torch.tensor([list(enc["input_ids"])], dtype=torch.long, device=self.device)
        prompt_tokens = int(input_ids.shape[1])
        if prompt_tokens >= context - 1:
            raise OracleError(f"the conversation is {prompt_tokens} tokens and {job.model_name} reads at most "
                              f"{context}: start a new chat or remove earlier messages", status=400,
                              code="context_length_exceeded")
        max_new = min(job.max_new_tokens, context - prompt_tokens)

        markers = [m for m in END_OF_TURN_MARKERS if m in template]
        eos = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        eos |= {tid for m in markers if (tid := _single_token(tokenizer, m)) is not None}  # one-token markers
        eos.discard(None)
        streamer = IncrementalTextStreamer(tokenizer, emit, markers + list(job.stop))  # markers spelt out
        was_cancelled = False

        class _Stop(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                nonlocal was_cancelled
                was_cancelled = was_cancelled or cancelled()
                return torch.full((ids.shape[0],), streamer.stopped or was_cancelled, dtype=torch.bool,
                                  device=ids.device)

        sample = job.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=sample, temperature=job.temperature if sample else None,
            top_p=job.top_p if sample else None, top_k=None, eos_token_id=sorted(eos) or None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0))
        if job.seed is not None:
            torch.manual_seed(job.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                           streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]))
        if was_cancelled:
            reason = "cancelled"
        elif streamer.stopped or (streamer.ids and streamer.ids[-1] in eos):
            reason = "stop"
        else:
            reason = "length"
        return {"finish_reason": reason, "prompt_tokens": prompt_tokens, "completion_tokens": len(streamer.ids),
                "seconds": round(time.perf_counter() - start, 4)}


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` when the vocabulary holds it as one token."""
    tid = tokenizer.convert_tokens_to_ids(text)
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None
