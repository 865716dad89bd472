"""Turn a normalized example into token ids and loss labels (supervised fine-tuning).

Normalized examples (from :mod:`core.formats`) are exactly one of:

- ``{"text": str}``: loss on every token; EOS appended.
- ``{"prompt": str, "completion": str}``: the two strings concatenated as one text (TRL's standard
  prompt-completion); loss on the tokens holding completion characters, and on the appended EOS.
  Conversational ``prompt``/``completion`` (lists of messages) are rendered as one conversation with
  loss on the completion's assistant messages.
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's chat template; loss on
  each assistant message's tokens: its content plus the end-of-turn marker the template puts after it.

Assistant spans work for any template: for assistant message ``i`` the text rendered for
``messages[:i]`` with ``add_generation_prompt=True`` and for ``messages[:i+1]`` are both prefixes of the
whole conversation's text, and the characters between them (trailing whitespace trimmed) are the
assistant's. Character spans become token labels through the fast tokenizer's offsets. Templates that
rewrite earlier turns (so the prefixes do not hold) fall back to locating the content in the text and
extending it over a directly following special token (the end-of-turn marker).

Labels follow the Hugging Face convention: aligned with ``input_ids`` (the model predicts
``labels[t]`` from tokens ``< t``); -100 means no loss. ``labels[0]`` is always -100 since the first
token of an example is never predicted from inside it; this also keeps packed examples from learning
across example boundaries.

**Truncation** to ``max_length`` tokens keeps a window of the example (:func:`truncation_start`): the
prompt side is cut first, from its start, and what is learned is kept -- TRL's ``keep_end`` for the prompt
(``DPOTrainer``'s ``prompt_input_ids[-max_prompt_length:]``) with the completion kept from its start:

- ``text``: the first ``max_length`` tokens (everything is learned; the end is cut);
- ``prompt``/``completion``: the prompt's first tokens are cut until the rest fits, keeping at least one
  prompt token before the completion; a completion longer than that loses its end;
- ``messages``: the conversation's first tokens are cut, keeping the last assistant turn whole with the
  token before it when it fits (earlier turns go first); a last turn longer than that loses its end.

So an example with any trainable token keeps at least ``max_length - 1`` of them (or all). Validation
measures the same window (:func:`measure_batch`) and drops or rejects an example with no trainable token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

IGNORE_INDEX = -100

#: Which token of an example truncation must keep with its predecessor (:func:`truncation_start`).
ANCHOR_START, ANCHOR_FIRST_TRAINED, ANCHOR_LAST_TURN = "start", "first_trained", "last_turn"


@dataclass
class TokenizedExample:
    """One example ready for packing. ``input_ids`` and ``labels`` have equal length (tokens)."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        """Tokens that carry loss (labels != -100)."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class ExampleError(ValueError):
    """Raised for an example that is not one of the normalized shapes."""


class TokenCount(NamedTuple):
    """Token figures of one example (tokens): as written (``tokens``, ``trainable``) and in the window
    that training keeps at ``max_length`` (``kept_tokens``, ``kept_trainable``; equal to the first two
    when it fits or without a ``max_length``)."""

    tokens: int
    trainable: int
    kept_tokens: int
    kept_trainable: int


def anchor_of(mask: list[bool], rule: str) -> int:
    """Index of the token truncation keeps with its predecessor: 0 for ``text`` (:data:`ANCHOR_START`),
    the first trained token for ``prompt``/``completion`` (:data:`ANCHOR_FIRST_TRAINED`), the first token
    of the last trained run -- the last assistant turn -- for ``messages`` (:data:`ANCHOR_LAST_TURN`).
    ``mask[t]``: token ``t`` carries loss (before ``labels[0]`` is cleared)."""
    if rule == ANCHOR_START:
        return 0
    if rule == ANCHOR_FIRST_TRAINED:
        for t, m in enumerate(mask):
            if m:
                return t
        return 0
    for t in range(len(mask) - 1, -1, -1):
        if mask[t] and (t == 0 or not mask[t - 1]):
            return t
    return 0


def truncation_start(n_tokens: int, max_length: int, anchor: int) -> int:
    """First token of the ``max_length`` window kept of an ``n_tokens`` example: as late as needed for the
    example's end to fit, but no later than ``anchor - 1`` (the anchor token and the one it is predicted
    from stay). 0 when the example fits."""
    return max(0, min(n_tokens - max_length, anchor - 1))


def kept_trainable(mask: list[bool], start: int, max_length: int) -> int:
    """Tokens that carry loss in the window ``[start, start + max_length)`` (its first token never does)."""
    return sum(mask[start + 1:start + max_length])


def _count(n: int, mask: list[bool], rule: str, max_length: int | None) -> TokenCount:
    trainable = sum(mask[1:])
    if max_length is None or n <= max_length:
        return TokenCount(n, trainable, n, trainable)
    start = truncation_start(n, max_length, anchor_of(mask, rule))
    return TokenCount(n, trainable, max_length, kept_trainable(mask, start, max_length))


def _encode(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids and (start, end) character offsets per token (None for a slow tokenizer)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), None


def _mask_from_spans(tokenizer, text: str, ids: list[int], offsets, spans: list[tuple[int, int]],
                     add_special_tokens: bool) -> list[bool]:
    """True for each token overlapping a character span ``[a, b)`` of ``text``."""
    if offsets is not None:
        return [any(s < b and e > a for a, b in spans) for s, e in offsets]
    # Slow tokenizer: a span's tokens start after the tokens of the text before it (prefix tokenization).
    mask = [False] * len(ids)
    for a, b in spans:
        start = len(tokenizer(text[:a], add_special_tokens=add_special_tokens)["input_ids"])
        end = len(tokenizer(text[:b], add_special_tokens=add_special_tokens)["input_ids"])
        for t in range(start, min(end, len(ids))):
            mask[t] = True
    return mask


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], first_trainable: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the chat template; return ``(text, [(start, end) character span of each
    assistant message at index >= first_trainable])``. Raises :class:`ExampleError` when the template fails."""
    try:
        full = _render(tokenizer, messages, False)
    except Exception as exc:
        raise ExampleError(f"the chat template cannot render these messages: {exc}") from exc
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        span = None
        try:
            pre = _render(tokenizer, messages[:i], True) if i else None
            upto = _render(tokenizer, messages[: i + 1], False)
        except Exception:
            pre = upto = None
        if pre is not None and upto is not None and full.startswith(pre) and full.startswith(upto) \
                and len(upto) > len(pre) >= cursor:
            start, end = len(pre), len(upto)
            while end > start and full[end - 1].isspace():
                end -= 1
            span = (start, end)
        else:  # template rewrites earlier turns: find the content, then the end-of-turn marker after it
            content = msg.get("content") or ""
            pos = full.find(content, cursor) if content else -1
            if pos >= 0:
                end = pos + len(content)
                for tok in specials:
                    if full.startswith(tok, end):
                        end += len(tok)
                        break
                span = (pos, end)
        if span is not None:
            cursor = span[1]
            if i >= first_trainable and span[1] > span[0]:
                spans.append(span)
    return full, spans


def _ids_and_mask(example: dict, tokenizer) -> tuple[list[int], list[bool], str]:
    """``(input_ids, mask, anchor rule)`` of a normalized example, untruncated; ``mask[t]``: token ``t``
    is learned (``labels[0]`` not yet cleared). Raises :class:`ExampleError`."""
    eos = tokenizer.eos_token_id
    fast = _byte_level_ids_and_mask(example, tokenizer)
    if fast is not None:
        return fast
    if "messages" in example:
        text, spans = assistant_spans(tokenizer, example["messages"])
        ids, offsets = _encode(tokenizer, text, add_special_tokens=False)
        return ids, _mask_from_spans(tokenizer, text, ids, offsets, spans, False), ANCHOR_LAST_TURN
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            completion = completion if isinstance(completion, list) else [{"role": "assistant",
                                                                            "content": completion}]
            text, spans = assistant_spans(tokenizer, prompt + completion, first_trainable=len(prompt))
            ids, offsets = _encode(tokenizer, text, add_special_tokens=False)
            return ids, _mask_from_spans(tokenizer, text, ids, offsets, spans, False), ANCHOR_FIRST_TRAINED
        text = prompt + completion
        ids, offsets = _encode(tokenizer, text, add_special_tokens=True)
        mask = _mask_from_spans(tokenizer, text, ids, offsets, [(len(prompt), len(text))], True)
        if eos is not None:
            ids.append(eos)
            mask.append(True)
        return ids, mask, ANCHOR_FIRST_TRAINED
    if "text" in example:
        ids, _ = _encode(tokenizer, example["text"], add_special_tokens=True)
        mask = [True] * len(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            mask.append(True)
        return ids, mask, ANCHOR_START
    raise ExampleError(f"not a normalized example (keys {sorted(example)}); expected text, "
                       "prompt+completion or messages")


def _byte_level_ids_and_mask(example: dict, tokenizer) -> tuple[list[int], list[bool], str] | None:
    """:func:`_ids_and_mask` of a ``text`` or string ``prompt``/``completion`` example under a byte-level
    tokenizer (the embedded default hero's): token ids are the UTF-8 bytes, no tokenizer call -- the same
    result (tested) about 20x faster. None for any other case (and a text holding an added token's text)."""
    specials = _byte_level_specials(tokenizer)
    if specials is None:
        return None
    eos = tokenizer.eos_token_id
    tail = [] if eos is None else [eos]  # byte ids never equal the EOS id
    if "text" in example and "messages" not in example and "prompt" not in example:
        text = example["text"]
        if not isinstance(text, str) or any(t in text for t in specials):
            return None
        ids = list(text.encode("utf-8")) + tail
        return ids, [True] * len(ids), ANCHOR_START
    prompt, completion = example.get("prompt"), example.get("completion")
    if "messages" in example or not isinstance(prompt, str) or not isinstance(completion, str) \
            or any(t in prompt + completion for t in specials):
        return None
    head, learned = list(prompt.encode("utf-8")), list(completion.encode("utf-8")) + tail
    return head + learned, [False] * len(head) + [True] * len(learned), ANCHOR_FIRST_TRAINED


def tokenize_example(example: dict, tokenizer, max_length: int | None, line: int = 0) -> TokenizedExample:
    """Tokenize a normalized example (see the module doc) into ids and labels.

    ``max_length`` (tokens): keep the window of at most ``max_length`` tokens the module doc describes
    (the prompt side is cut first) and set ``truncated``; None keeps all.
    Raises :class:`ExampleError` for an unknown shape or a chat template that cannot render it.
    """
    ids, mask, rule = _ids_and_mask(example, tokenizer)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        start = truncation_start(len(ids), max_length, anchor_of(mask, rule))
        ids, mask = ids[start:start + max_length], mask[start:start + max_length]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return TokenizedExample(input_ids=ids, labels=labels, line=line, truncated=truncated)


def count_tokens(example: dict, tokenizer) -> tuple[int, int]:
    """``(tokens, trainable tokens)`` of the untruncated example (for length checks against max_length)."""
    te = tokenize_example(example, tokenizer, None)
    return len(te.input_ids), te.trainable_tokens


def measure(example: dict, tokenizer, max_length: int | None) -> TokenCount:
    """The :class:`TokenCount` of one example: as written, and in the window training keeps at
    ``max_length`` (the same as ``tokenize_example(example, tokenizer, max_length)`` holds). Raises
    :class:`ExampleError`."""
    ids, mask, rule = _ids_and_mask(example, tokenizer)
    return _count(len(ids), mask, rule, max_length)


_BYTE_PROBE = "Hi  there,\n\tcaf\u00e9 \u20ac5 \U0001f389 x_y-z 123\r\n"


def _byte_level_specials(tokenizer) -> tuple[str, ...] | None:
    """The added tokens' strings when ``tokenizer`` is a pure byte-level tokenizer (one token per UTF-8
    byte, token id = byte value, no merges and nothing added around the text: the embedded default hero's,
    :func:`core.hero.build_byte_tokenizer`), else None. Cached on the tokenizer."""
    cached = getattr(tokenizer, "_realm_byte_specials", False)
    if cached is not False:
        return cached
    specials = None
    try:
        import json as _json

        backend = tokenizer.backend_tokenizer
        model = _json.loads(backend.to_str()).get("model", {})
        if model.get("type") == "BPE" and not model.get("merges") and len(model.get("vocab", {})) == 256 \
                and backend.normalizer is None:
            ok = all(tokenizer(t, add_special_tokens=True)["input_ids"] == list(t.encode("utf-8"))
                     for t in (_BYTE_PROBE, "a", " leading space", "\u00ff\u0100"))
            if ok:
                specials = tuple(t.content for t in backend.get_added_tokens_decoder().values() if t.content)
    except Exception:  # noqa: BLE001 - anything unusual: not the byte-level fast path
        specials = None
    try:
        tokenizer._realm_byte_specials = specials
    except Exception:  # noqa: BLE001
        pass
    return specials


def count_tokens_batch(examples: list[dict], tokenizer) -> list[tuple[int, int] | Exception]:
    """:func:`count_tokens` for a list of examples; identical results (tested), much faster. Returns one
    ``(tokens, trainable tokens)`` per example, or the exception that example raised (e.g.
    :class:`ExampleError`), in order. See :func:`measure_batch`."""
    return [r if isinstance(r, Exception) else (r.tokens, r.trainable) for r in measure_batch(examples, tokenizer)]


def _byte_prompt_completion(n_prompt: int, n_completion: int, extra: int, max_length: int | None) -> TokenCount:
    """:func:`_count` of a prompt/completion example under the byte-level tokenizer: ``n_prompt`` bytes
    not learned, then ``n_completion`` bytes and ``extra`` EOS learned (no mask list built)."""
    n, learned = n_prompt + n_completion + extra, n_completion + extra
    trainable = learned - (n_prompt == 0 and learned > 0)
    if max_length is None or n <= max_length:
        return TokenCount(n, trainable, n, trainable)
    start = truncation_start(n, max_length, n_prompt if learned else 0)
    return TokenCount(n, trainable, max_length, max(0, min(n, start + max_length) - max(n_prompt, start + 1)))


def measure_batch(examples: list[dict], tokenizer, max_length: int | None = None) -> list[TokenCount | Exception]:
    """:func:`measure` for a list of examples; identical results (tested), much faster. Returns one
    :class:`TokenCount` per example, or the exception that example raised (e.g. :class:`ExampleError`), in
    order.

    - A byte-level tokenizer (the embedded default hero's): ``text`` and string ``prompt``/``completion``
      examples are counted in UTF-8 bytes, no tokenizer call (unless they contain an added token's text);
    - a fast tokenizer: one batched ``encode_batch`` per kind (the Rust tokenizer, no Python per example);
    - a slow tokenizer: :func:`measure` one example at a time.
    """
    if not getattr(tokenizer, "is_fast", False):
        out: list[TokenCount | Exception] = []
        for example in examples:
            try:
                out.append(measure(example, tokenizer, max_length))
            except Exception as exc:  # noqa: BLE001 - that example's problem, reported by the caller
                out.append(exc)
        return out
    eos = tokenizer.eos_token_id
    extra = 0 if eos is None else 1
    specials = _byte_level_specials(tokenizer)
    results: list[TokenCount | Exception | None] = [None] * len(examples)
    # per add_special_tokens flag: (index, text, spans or None for all tokens, append_eos
    # "always"|"text"|"never", anchor rule)
    jobs: dict[bool, list[tuple[int, str, list[tuple[int, int]] | None, str, str]]] = {True: [], False: []}
    for i, example in enumerate(examples):
        try:
            if "messages" in example:
                text, spans = assistant_spans(tokenizer, example["messages"])
                jobs[False].append((i, text, spans, "never", ANCHOR_LAST_TURN))
            elif "prompt" in example and "completion" in example:
                prompt, completion = example["prompt"], example["completion"]
                if isinstance(prompt, list) or isinstance(completion, list):
                    results[i] = measure(example, tokenizer, max_length)
                    continue
                text = prompt + completion
                if specials is not None and not any(t in text for t in specials):
                    results[i] = _byte_prompt_completion(len(prompt.encode("utf-8")),
                                                         len(completion.encode("utf-8")), extra, max_length)
                    continue
                jobs[True].append((i, text, [(len(prompt), len(text))], "always", ANCHOR_FIRST_TRAINED))
            elif "text" in example:
                text = example["text"]
                if specials is not None and not any(t in text for t in specials):
                    n = len(text.encode("utf-8")) + extra  # byte ids never equal the EOS id
                    kept = n if max_length is None else min(n, max_length)
                    results[i] = TokenCount(n, max(n - 1, 0), kept, max(kept - 1, 0))
                    continue
                jobs[True].append((i, text, None, "text", ANCHOR_START))
            else:
                raise ExampleError(f"not a normalized example (keys {sorted(example)}); expected text, "
                                   "prompt+completion or messages")
        except Exception as exc:  # noqa: BLE001
            results[i] = exc
    backend = tokenizer.backend_tokenizer
    direct = backend.truncation is None and backend.padding is None
    for add_special, batch in jobs.items():
        if not batch:
            continue
        texts = [job[1] for job in batch]
        if direct:  # what the transformers wrapper calls, without converting every encoding to Python dicts
            encodings = backend.encode_batch(texts, add_special_tokens=add_special)
            pairs = [(e.ids, e.offsets) for e in encodings]
        else:
            enc = tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=True)
            pairs = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
        for (i, _, spans, eos_rule, rule), (ids, offsets) in zip(batch, pairs, strict=True):
            if spans is None:
                mask = [True] * len(ids)
            elif len(spans) == 1:
                a, b = spans[0]
                mask = [s < b and e > a for s, e in offsets]
            else:
                mask = [any(s < b and e > a for a, b in spans) for s, e in offsets]
            if eos is not None and (eos_rule == "always" or (eos_rule == "text" and (not ids or ids[-1] != eos))):
                mask.append(True)
            results[i] = _count(len(mask), mask, rule, max_length)
    return results  # type: ignore[return-value]


def trainable_ratio(examples: Iterable[TokenizedExample]) -> float:
    """Share of tokens that carry loss over ``examples`` (0.0 when there are no tokens)."""
    total = trainable = 0
    for te in examples:
        total += len(te.input_ids)
        trainable += te.trainable_tokens
    return trainable / total if total else 0.0


def check_trainable_ratio(tokens: int, trainable: int, min_ratio: float) -> str | None:
    """Masked-ratio sanity check: a message when fewer than ``min_ratio`` of ``tokens`` carry loss (the
    loss mask is probably wrong, e.g. a chat template that hides the assistant turns), else None."""
    if tokens <= 0:
        return "no tokens at all"
    ratio = trainable / tokens
    if trainable == 0:
        return f"no token carries loss (0 of {tokens}); nothing would be learned"
    if ratio < min_ratio:
        return (f"only {ratio:.2%} of tokens carry loss ({trainable} of {tokens}), below "
                f"training.min_trainable_token_ratio={min_ratio:.2%}: check the chat template / assistant turns")
    return None


def trainable_segments(example: TokenizedExample, tokenizer) -> list[str]:
    """Decoded runs of consecutive trainable tokens, for eyeballing a loss mask (and tests)."""
    out: list[list[int]] = []
    prev = False
    for tok, lab in zip(example.input_ids, example.labels, strict=True):
        on = lab != IGNORE_INDEX
        if on and not prev:
            out.append([])
        if on:
            out[-1].append(tok)
        prev = on
    return [tokenizer.decode(seg, skip_special_tokens=False) for seg in out]
