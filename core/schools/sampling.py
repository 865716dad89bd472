"""Sampling completions from the live hero for on-policy schools (Champion, :mod:`core.schools.champion`).

Each prompt's group of ``n`` completions is sampled in one ``model.generate`` call (the same prompt in every
row: no padding), with the model in eval mode and no gradient, under :func:`torch.random.fork_rng` seeded with
the prompt's own seed (:func:`sampling_seed`): the samples depend only on the seed, never on the micro-batch a
prompt lands in or on what else drew random numbers, and the global RNG the engine checkpoints is left as it
was. Sampling follows TRL's ``GRPOTrainer`` defaults: multinomial sampling at ``temperature``, ``top_k`` 0 and
``top_p`` 1 (no truncation of the distribution), stopping at EOS (or the chat template's one-token end-of-turn
marker) or after ``max_new_tokens``.
"""

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
