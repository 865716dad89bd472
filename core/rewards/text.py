"""Text rewards: exact match, regex format, length penalty, JSON validity.

Every reward is a plain function ``(prompt, completion, **refs) -> float`` (strings in, a float out);
reference values and settings are keyword arguments (``answer=...``, ``pattern=...``), so a reward can be
bound with :func:`functools.partial` and combined with others (:mod:`core.rewards.combine`). Lengths are
in characters (rewards never see a tokenizer).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata

_SPACES = re.compile(r"\s+")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(.*?)\n?```$", re.DOTALL)


def normalize_text(text: str, *, ignore_case: bool = False) -> str:
    """The normalisation of :func:`exact_match`: Unicode NFC, surrounding whitespace removed, every run of
    whitespace inside collapsed to one space; lowercased (``str.casefold``) when ``ignore_case``."""
    text = _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return text.casefold() if ignore_case else text


def exact_match(prompt: str, completion: str, *, answer: str, ignore_case: bool = False, **_) -> float:
    """1.0 when ``completion`` equals the reference ``answer`` after :func:`normalize_text`, else 0.0."""
    return float(normalize_text(completion, ignore_case=ignore_case) == normalize_text(answer, ignore_case=ignore_case))


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.DOTALL)


def regex_format(prompt: str, completion: str, *, pattern: str, mode: str = "fullmatch", **_) -> float:
    """1.0 when ``completion`` has the format ``pattern`` (a Python regular expression, ``re.DOTALL``: ``.``
    matches newlines too), else 0.0.

    ``mode``: ``"fullmatch"`` (the whole completion, surrounding whitespace removed, must match) or
    ``"search"`` (a match anywhere). Raises ``re.error`` for an invalid pattern, ``ValueError`` for an
    unknown mode. Example: ``pattern=r".*#### -?\\d+"`` rewards GSM8K's answer line at the end.
    """
    if mode == "fullmatch":
        return float(_compiled(pattern).fullmatch(completion.strip()) is not None)
    if mode == "search":
        return float(_compiled(pattern).search(completion) is not None)
    raise ValueError(f"regex_format mode must be 'fullmatch' or 'search', got {mode!r}")


def length_penalty(prompt: str, completion: str, *, max_chars: int = 200, **_) -> float:
    """A penalty in [-1, 0] for completions longer than ``max_chars`` characters: 0 up to ``max_chars``,
    then linear, ``-(len − max_chars) / max_chars``, reaching -1 at twice the budget (and staying there).

    Weight it against a correctness reward to prefer brevity. Raises ``ValueError`` when ``max_chars`` < 1.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    penalty = min(1.0, max(0, len(completion) - max_chars) / max_chars)
    return -penalty if penalty else 0.0


def json_valid(prompt: str, completion: str, *, require: str = "any", **_) -> float:
    """1.0 when ``completion`` (surrounding whitespace removed; one Markdown code fence such as
    ```` ```json ... ``` ```` unwrapped) parses as strict JSON (no NaN/Infinity), else 0.0.

    ``require``: ``"any"`` JSON value, ``"object"`` or ``"array"``. Raises ``ValueError`` for another value.
    """
    if require not in ("any", "object", "array"):
        raise ValueError(f"json_valid require must be 'any', 'object' or 'array', got {require!r}")
    text = completion.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()

    def _no_constants(name: str):
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return 0.0
    if require == "object":
        return float(isinstance(value, dict))
    if require == "array":
        return float(isinstance(value, list))
    return 1.0
