"""Sampling completions from the live hero for on-policy schools (Champion, :mod:`core.schools.champion`).

:func:`sample_groups` samples ``n`` completions of every prompt of a micro-batch in one left-padded
``model.generate`` call (eval mode, no gradient, plain ``sdpa``: :func:`generating`). Each prompt draws from its
own ``torch.Generator`` seeded with the prompt's seed (:func:`sampling_seed`) through a logits processor, so a
prompt's samples depend on its seed (and, through padding, on the prompts beside it, which the cursor fixes),
never on anything else that draws random numbers; the global RNG the engine checkpoints is not touched.
Sampling follows TRL's ``GRPOTrainer`` defaults: multinomial from ``softmax(logits / temperature)``, ``top_k`` 0
and ``top_p`` 1 (no truncation), stopping at EOS (or the chat template's one-token end-of-turn marker) or after
``max_new_tokens``. :func:`sample_group` (one prompt, HF's own sampler under a forked, seeded RNG) also does
greedy decoding for evaluation."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from core.packing import PACKED_SDPA


def sampling_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (e.g. the config seed, the global step, the record's line): the first 8
    bytes of SHA-256 of their ``repr`` joined by ``/``."""
    digest = hashlib.sha256("/".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and, when the chat template ends a turn with one token other than EOS, that token."""
    from core.skills.trials import end_of_turn_marker

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        marker = end_of_turn_marker(tokenizer) if getattr(tokenizer, "chat_template", None) else ""
    except Exception:  # noqa: BLE001 - a template that cannot render the probe: EOS only
        marker = ""
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    if len(marker_ids) == 1 and marker_ids[0] not in ids:
        ids.append(marker_ids[0])
    return ids


@contextmanager
def generating(model) -> Iterator[None]:
    """Eval mode, no gradient and plain ``sdpa`` (the engine's packed attention ignores padding and the KV
    cache) for the block; the training mode and attention implementation are put back after it."""
    was_training = model.training
    attn = getattr(model.config, "_attn_implementation", None)
    model.eval()
    try:
        if attn == PACKED_SDPA:
            model.set_attn_implementation("sdpa")
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if attn == PACKED_SDPA:
            model.set_attn_implementation(attn)


def cut_at_stop(ids: list[int], stops: list[int]) -> tuple[list[int], bool]:
    """``(ids up to and including the first stop token, whether one was found)``."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i + 1], True
    return ids, False


def sample_group(model, prompt_ids: list[int], n: int, *, max_new_tokens: int, temperature: float, seed: int,
                 stops: list[int], pad_token_id: int | None, do_sample: bool = True) -> list[tuple[list[int], bool]]:
    """``n`` completions of ``prompt_ids`` as ``(token ids, ended)``: the ids up to and including the first
    stop token (``ended`` True), or ``max_new_tokens`` ids without one (truncated). Call inside
    :func:`generating`. ``do_sample`` False: greedy (``n`` identical rows; use ``n=1``)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1, use_cache=True,
                              eos_token_id=stops or None, pad_token_id=pad_token_id if pad_token_id is not None
                              else (stops[0] if stops else 0),
                              **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [cut_at_stop(row, stops) for row in out[:, len(prompt_ids):].tolist()]


class _PerRowSampler:
    """A logits processor drawing each row's next token from ``softmax(logits / temperature)`` with the
    generator of its prompt (rows ``k*n .. k*n+n-1`` share prompt ``k``'s), returning scores where only that
    token is finite, so greedy decoding keeps it: one batched ``generate`` for all prompts, each prompt's
    samples a function of its own seed."""

    def __init__(self, generators: list[torch.Generator], n: int, temperature: float):
        self.generators, self.n, self.temperature = generators, n, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        out = torch.full_like(scores, float("-inf"))
        for row in range(scores.shape[0]):
            token = torch.multinomial(probs[row], 1, generator=self.generators[row // self.n])
            out[row, token] = 0.0
        return out


def sample_groups(model, prompts: list[list[int]], n: int, *, max_new_tokens: int, temperature: float,
                  seeds: list[int], stops: list[int], pad_token_id: int | None) -> list[list[tuple[list[int], bool]]]:
    """``n`` sampled completions of each prompt (token ids), as :func:`sample_group` returns them, in one
    left-padded ``generate`` call; prompt ``k``'s draws come from a ``torch.Generator`` seeded with
    ``seeds[k]`` (the global RNG is not used). Call inside :func:`generating`."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
    width = max(len(p) for p in prompts)
    rows = [p for p in prompts for _ in range(n)]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], dtype=torch.long, device=device)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=stops or None, pad_token_id=pad)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                         logits_processor=LogitsProcessorList([_PerRowSampler(generators, n, temperature)]))
    cut = [cut_at_stop(row, stops) for row in out[:, width:].tolist()]
    return [cut[k * n:(k + 1) * n] for k in range(len(prompts))]
