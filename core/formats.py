"""Record formats of quest files: detection, field mapping and normalization to the engine's examples.

Formats follow TRL's dataset types and their standard field names:

==========================  ==================================================================
``text``                    ``{"text": str}``
``messages``                ``{"messages": [{"role", "content"}, ...]}``, roles system/user/assistant/tool
``prompt_completion``       ``{"prompt", "completion"}``: both strings, or both lists of messages
``preference``              ``{"prompt", "chosen", "rejected"}`` (explicit prompt)
``preference_implicit``     ``{"chosen", "rejected"}`` (prompt inside each, e.g. hh-rlhf)
``preference_sharegpt``     ``{"conversations", "chosen", "rejected"}``: sharegpt turns as the prompt, each answer a
                            turn (or a list of turns), LLaMA-Factory's sharegpt preference data
``unpaired_preference``     ``{"prompt", "completion", "label"}`` with a boolean ``label`` (TRL's unpaired
                            preference type, for KTO)
``messages_rated``          ``{"messages", "label"}``: the last (assistant) message rated by a boolean ``label``
                            (LLaMA-Factory's KTO data)
``alpaca``                  ``{"instruction", "input"?, "output", "system"?, "history"?}``
``sharegpt``                ``{"conversations": [{"from", "value"}, ...], "system"?}``
``prompt_only``             ``{"prompt", ...}``: a prompt (string or list of messages) and any other columns
                            (e.g. ``answer``), TRL's prompt-only type for GRPO (the columns go to the rewards);
                            never detected: a file is prompt-only when its school is ``grpo``
==========================  ==================================================================

:func:`normalize` turns a record into exactly one canonical example shape:

- SFT: ``{"text": str}``, ``{"prompt": str, "completion": str}`` or
  ``{"messages": [{"role": str, "content": str}, ...]}`` (message-list prompt/completion, alpaca and
  sharegpt all become ``messages``; the loss is then on every assistant message).
- preference: ``{"prompt": str | list[message] | None, "chosen": str | list, "rejected": str | list}``.
- unpaired preference: ``{"prompt": str | list[message], "completion": str | list[message], "label": bool}``.
- prompt only: ``{"prompt": str | list[message], **columns}`` (the other fields as written).

Every problem with a record raises :class:`RecordError` with a human reason. Files are read by
:func:`open_text_lines` (plain or gzip by magic bytes, UTF-8 with optional BOM, CRLF tolerated, one
undecodable or over-long line is one bad line) and :func:`iter_valid_records` is what the trainer reads.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from core.config import ValidationConfig, file_name_matches

TEXT = "text"
MESSAGES = "messages"
PROMPT_COMPLETION = "prompt_completion"
PREFERENCE = "preference"
PREFERENCE_IMPLICIT = "preference_implicit"
ALPACA = "alpaca"
SHAREGPT = "sharegpt"
PREFERENCE_SHAREGPT = "preference_sharegpt"
UNPAIRED_PREFERENCE = "unpaired_preference"
MESSAGES_RATED = "messages_rated"
PROMPT_ONLY = "prompt_only"

SFT_FORMATS = frozenset({TEXT, MESSAGES, PROMPT_COMPLETION, ALPACA, SHAREGPT})
PREFERENCE_FORMATS = frozenset({PREFERENCE, PREFERENCE_IMPLICIT, PREFERENCE_SHAREGPT})
UNPAIRED_FORMATS = frozenset({UNPAIRED_PREFERENCE, MESSAGES_RATED})
PROMPT_FORMATS = frozenset({PROMPT_ONLY})
ALL_FORMATS = (PREFERENCE, PREFERENCE_SHAREGPT, PREFERENCE_IMPLICIT, UNPAIRED_PREFERENCE, MESSAGES_RATED, MESSAGES,
               SHAREGPT, PROMPT_COMPLETION, ALPACA, TEXT)
"""The formats detected from a record's fields, in detection order. ``prompt_only`` is not among them (a lone
``prompt`` is more often an SFT record missing its ``completion``): a file is read as prompt-only when its
school trains prompts (GRPO, :mod:`core.schools.champion`), see :func:`parse_record`."""
EVERY_FORMAT = (*ALL_FORMATS, PROMPT_ONLY)
"""Every format a quest can have: the detected ones and ``prompt_only``."""

#: Fields that identify each format (all required), in detection order (first match wins).
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    PREFERENCE: ("prompt", "chosen", "rejected"),
    PREFERENCE_SHAREGPT: ("conversations", "chosen", "rejected"),
    PREFERENCE_IMPLICIT: ("chosen", "rejected"),
    UNPAIRED_PREFERENCE: ("prompt", "completion", "label"),
    MESSAGES_RATED: ("messages", "label"),
    MESSAGES: ("messages",),
    SHAREGPT: ("conversations",),
    PROMPT_COMPLETION: ("prompt", "completion"),
    ALPACA: ("instruction", "output"),
    TEXT: ("text",),
    PROMPT_ONLY: ("prompt",),
}

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "function_call": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool",
}
_SHAREGPT_ROLE_TEXT = "human/user, gpt/assistant/model, system, tool/function/observation, function_call"

UTF8_BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b"
_READ_BUFFER_BYTES = 1 << 20
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class RecordError(ValueError):
    """A record (one line) that cannot be used; ``str(exc)`` is the human reason."""


class CorruptFileError(ValueError):
    """The file as a whole cannot be read (broken or truncated gzip stream)."""


# --------------------------------------------------------------------------------------------------
# field_map
# --------------------------------------------------------------------------------------------------
def field_map_for(file_name: str, field_map: dict[str, dict[str, str]]) -> dict[str, str]:
    """Merge the mappings of every glob in ``field_map`` that matches ``file_name``.

    Only the base name is matched (``fnmatch`` rules), as given, without a ``.gz`` suffix and without a
    ``high_``/``low_`` priority prefix, so ``"gsm8k*.jsonl"`` also maps ``gsm8k_train.jsonl.gz`` and
    ``high_gsm8k.jsonl``. Later globs win for the same source field.
    Returns ``{source_field: target_field}`` (empty when nothing matches).
    """
    merged: dict[str, str] = {}
    for pattern, mapping in field_map.items():
        if file_name_matches(file_name, pattern):
            merged.update(mapping)
    return merged


def apply_field_map(record: dict, mapping: dict[str, str]) -> dict:
    """Return ``record`` with keys renamed by ``mapping`` (``{source: target}``; swaps work).

    Raises :class:`RecordError` when a target field already exists in the record and is not itself
    renamed away (the two values would collide).
    """
    if not mapping or not any(src in record for src in mapping):
        return record
    out: dict = {}
    for key, value in record.items():
        if key not in mapping:
            out[key] = value
    for src, dst in mapping.items():
        if src in record:
            if dst in out:
                raise RecordError(f"field_map renames '{src}' to '{dst}' but the record already has '{dst}'")
            out[dst] = record[src]
    return out


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------
def _fits(record: dict, fmt: str) -> bool:
    return all(f in record for f in FORMAT_FIELDS[fmt])


def detect_format(record: dict) -> str:
    """Name of the format whose identifying fields the record has (see :data:`FORMAT_FIELDS`).

    Raises :class:`RecordError` naming the fields found, a missing partner field when one is evident
    (``"missing field 'completion'"``), and the formats that exist.
    """
    if not isinstance(record, dict):
        raise RecordError(f"record must be a JSON object, got {_type_name(record)}")
    for fmt in ALL_FORMATS:
        if _fits(record, fmt):
            return fmt
    found = sorted(str(k) for k in record)
    for fmt in (PREFERENCE_IMPLICIT, PROMPT_COMPLETION, ALPACA):
        present = [f for f in FORMAT_FIELDS[fmt] if f in record]
        if present:
            missing = [f for f in FORMAT_FIELDS[fmt] if f not in record]
            raise RecordError(f"missing field '{missing[0]}' (found fields {found}; format '{fmt}' needs "
                              f"{list(FORMAT_FIELDS[fmt])})")
    formats = "; ".join(f"{fmt} {{{', '.join(fields)}}}" for fmt, fields in FORMAT_FIELDS.items())
    shown = found[:20] + (["..."] if len(found) > 20 else [])
    raise RecordError(f"no known format: found fields {shown}; formats are {formats}; other names can be "
                      "mapped with validation.field_map in config.json")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# normalization
# --------------------------------------------------------------------------------------------------
def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where} must be a non-empty string, got {_type_name(value)}")
    if not value.strip():
        raise RecordError(f"{where} must be a non-empty string")
    return value


def _content(value: Any, where: str) -> str:
    """Message content: a string, or text-only content parts ``[{"type": "text", "text": str}]``."""
    if isinstance(value, list) and value:
        texts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RecordError(f"{where}[{i}]: only text content parts are supported")
            texts.append(part["text"])
        value = "".join(texts)
    return _text(value, where)


def _messages(value: Any, where: str, *, need_assistant: bool) -> list[dict[str, str]]:
    """Validate a list of messages; empty system messages are dropped. Returns fresh role/content dicts."""
    if not isinstance(value, list):
        raise RecordError(f"{where} must be a list of messages, got {_type_name(value)}")
    if not value:
        raise RecordError(f"{where} must not be empty")
    out = []
    has_assistant = False
    for i, msg in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(f"{here} must be an object with role and content, got {_type_name(msg)}")
        role = msg.get("role")
        if role not in ROLES:
            if "role" not in msg:
                raise RecordError(f"{here}: missing field 'role'")
            raise RecordError(f"{here}.role: {_short(role)} is not one of {'/'.join(ROLES)}")
        if msg.get("tool_calls"):
            raise RecordError(f"{here}.tool_calls: tool calls are not supported yet")
        if "content" not in msg:
            raise RecordError(f"{here}: missing field 'content'")
        content = msg["content"]
        if role == "system" and content == "":
            continue
        out.append({"role": role, "content": _content(content, f"{here}.content")})
        has_assistant = has_assistant or role == "assistant"
    if need_assistant and not has_assistant:
        raise RecordError(f"{where} has no assistant message (nothing to learn)")
    if not out:
        raise RecordError(f"{where} must not be empty")
    return out


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)[:60]
    return text[:60] + ("..." if len(text) > 60 else "")


def _optional_str(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{key} must be a string, got {_type_name(value)}")
    return value


def _normalize_text(record: dict) -> dict:
    return {"text": _text(record["text"], "text")}


def _normalize_messages(record: dict) -> dict:
    return {"messages": _messages(record["messages"], "messages", need_assistant=True)}


def _normalize_prompt_completion(record: dict) -> dict:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": _text(prompt, "prompt"), "completion": _text(completion, "completion")}
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt_messages = _messages(prompt, "prompt", need_assistant=False)
        completion_messages = _messages(completion, "completion", need_assistant=True)
        if any(m["role"] == "assistant" for m in prompt_messages):
            # TRL: loss on the completion only, never on an assistant turn of the prompt (e.g. a wrong
            # answer a sparring correction shows, core.skills.sparring): kept apart for core.chat
            return {"prompt": prompt_messages, "completion": completion_messages}
        return {"messages": prompt_messages + completion_messages}
    raise RecordError("prompt and completion must both be strings or both be lists of messages, got "
                      f"{_type_name(prompt)} and {_type_name(completion)}")


def _normalize_alpaca(record: dict) -> dict:
    instruction = _text(record["instruction"], "instruction")
    extra = _optional_str(record, "input")
    output = _text(record["output"], "output")
    system = _optional_str(record, "system")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise RecordError(f"history must be a list of [instruction, output] pairs, got {_type_name(history)}")
        for i, turn in enumerate(history):
            if not (isinstance(turn, list) and len(turn) == 2):
                raise RecordError(f"history[{i}] must be an [instruction, output] pair")
            messages.append({"role": "user", "content": _text(turn[0], f"history[{i}][0]")})
            messages.append({"role": "assistant", "content": _text(turn[1], f"history[{i}][1]")})
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": output})
    return {"messages": messages}


def _normalize_sharegpt(record: dict, need_assistant: bool = True) -> dict:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise RecordError(f"conversations must be a list of turns, got {_type_name(turns)}")
    if not turns:
        raise RecordError("conversations must not be empty")
    system = _optional_str(record, "system")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    has_assistant = False
    for i, turn in enumerate(turns):
        here = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{here} must be an object with from and value, got {_type_name(turn)}")
        speaker_key, text_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        if speaker_key not in turn:
            raise RecordError(f"{here}: missing field 'from'")
        if text_key not in turn:
            raise RecordError(f"{here}: missing field '{text_key}'")
        speaker = turn[speaker_key]
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise RecordError(f"{here}.{speaker_key}: {_short(speaker)} is not one of {_SHAREGPT_ROLE_TEXT}")
        if role == "system" and turn[text_key] == "":
            continue
        messages.append({"role": role, "content": _content(turn[text_key], f"{here}.{text_key}")})
        has_assistant = has_assistant or role == "assistant"
    if need_assistant and not has_assistant:
        raise RecordError("conversations has no assistant (gpt) turn (nothing to learn)")
    return {"messages": messages}


def _normalize_preference(record: dict, explicit: bool) -> dict:
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record["prompt"] if explicit else None
    if explicit and not isinstance(prompt, (str, list)):
        raise RecordError(f"prompt must be a string or a list of messages, got {_type_name(prompt)}")
    both_str = isinstance(chosen, str) and isinstance(rejected, str)
    if not both_str and not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise RecordError("chosen and rejected must both be strings or both be lists of messages, got "
                          f"{_type_name(chosen)} and {_type_name(rejected)}")
    if explicit and type(prompt) is not type(chosen):
        raise RecordError(f"prompt is a {_type_name(prompt)} but chosen/rejected are {_type_name(chosen)}s: "
                          "use strings for all three, or lists of messages for all three")
    if isinstance(chosen, str):
        out_prompt = _text(prompt, "prompt") if explicit else None
        out = {"prompt": out_prompt, "chosen": _text(chosen, "chosen"), "rejected": _text(rejected, "rejected")}
    else:
        out_prompt = _messages(prompt, "prompt", need_assistant=False) if explicit else None
        out = {"prompt": out_prompt,
               "chosen": _messages(chosen, "chosen", need_assistant=True),
               "rejected": _messages(rejected, "rejected", need_assistant=True)}
    if out["chosen"] == out["rejected"]:
        raise RecordError("chosen and rejected are identical (nothing to learn)")
    return out


def _label(record: dict) -> bool:
    label = record["label"]
    if not isinstance(label, bool):
        raise RecordError(f"label must be true (a good completion) or false (a bad one), got {_type_name(label)}")
    return label


def _normalize_unpaired(record: dict) -> dict:
    label = _label(record)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": _text(prompt, "prompt"), "completion": _text(completion, "completion"), "label": label}
    if isinstance(prompt, list) and isinstance(completion, list):
        return {"prompt": _messages(prompt, "prompt", need_assistant=False),
                "completion": _messages(completion, "completion", need_assistant=True), "label": label}
    raise RecordError("prompt and completion must both be strings or both be lists of messages, got "
                      f"{_type_name(prompt)} and {_type_name(completion)}")


def _normalize_messages_rated(record: dict) -> dict:
    label = _label(record)
    messages = _messages(record["messages"], "messages", need_assistant=True)
    if messages[-1]["role"] != "assistant":
        raise RecordError("the last message must be the assistant's (the rated answer)")
    if len(messages) < 2:
        raise RecordError("messages needs a prompt before the rated assistant message")
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": label}


def _normalize_prompt_only(record: dict) -> dict:
    """TRL's prompt-only type: the prompt (a string, or messages ending with a user turn) and every other
    column unchanged (rewards read them, e.g. ``answer``)."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        out_prompt: str | list = _text(prompt, "prompt")
    elif isinstance(prompt, list):
        out_prompt = _messages(prompt, "prompt", need_assistant=False)
        if out_prompt[-1]["role"] != "user":
            raise RecordError("prompt (a list of messages) must end with a user message: the completion is "
                              "generated after it")
    else:
        raise RecordError(f"prompt must be a string or a list of messages, got {_type_name(prompt)}")
    return {**{k: v for k, v in record.items() if k != "prompt"}, "prompt": out_prompt}


def prompt_as_sft(example: dict) -> dict:
    """A normalized prompt-only example's prompt as an SFT-shaped example (``text`` or ``messages``), e.g. to
    measure its token length."""
    prompt = example["prompt"]
    return {"text": prompt} if isinstance(prompt, str) else {"messages": prompt}


def _sharegpt_answer(value: Any, name: str) -> list[dict[str, str]]:
    """A sharegpt answer: one turn ``{"from": "gpt", "value": ...}`` or a list of turns, as messages."""
    turns = value if isinstance(value, list) else [value]
    try:
        return _normalize_sharegpt({"conversations": turns})["messages"]
    except RecordError as exc:
        raise RecordError(f"{name}: {str(exc).replace('conversations', 'turns')}") from None


def _normalize_preference_sharegpt(record: dict) -> dict:
    prompt = _normalize_sharegpt({"conversations": record["conversations"], "system": record.get("system")},
                                 need_assistant=False)["messages"]
    if prompt[-1]["role"] != "user":
        raise RecordError("conversations (the prompt) must end with a human/user turn")
    chosen, rejected = _sharegpt_answer(record["chosen"], "chosen"), _sharegpt_answer(record["rejected"], "rejected")
    if chosen == rejected:
        raise RecordError("chosen and rejected are identical (nothing to learn)")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


_NORMALIZERS = {
    TEXT: _normalize_text,
    MESSAGES: _normalize_messages,
    PROMPT_COMPLETION: _normalize_prompt_completion,
    ALPACA: _normalize_alpaca,
    SHAREGPT: _normalize_sharegpt,
    PREFERENCE: lambda r: _normalize_preference(r, explicit=True),
    PREFERENCE_IMPLICIT: lambda r: _normalize_preference(r, explicit=False),
    PREFERENCE_SHAREGPT: _normalize_preference_sharegpt,
    UNPAIRED_PREFERENCE: _normalize_unpaired,
    MESSAGES_RATED: _normalize_messages_rated,
    PROMPT_ONLY: lambda r: _normalize_prompt_only(r),
}


def normalize(record: dict, fmt: str) -> dict:
    """Validate ``record`` as format ``fmt`` and return its canonical example (see the module doc).

    Raises :class:`RecordError` (a missing field, a wrong type, a bad role, empty text, ...);
    ``ValueError`` for an unknown ``fmt``.
    """
    normalizer = _NORMALIZERS.get(fmt)
    if normalizer is None:
        raise ValueError(f"unknown format {fmt!r}; formats are {', '.join(ALL_FORMATS)}")
    if not isinstance(record, dict):
        raise RecordError(f"record must be a JSON object, got {_type_name(record)}")
    missing = [f for f in FORMAT_FIELDS[fmt] if f not in record]
    if missing:
        raise RecordError(f"missing field '{missing[0]}' (format '{fmt}')")
    return normalizer(record)


def preference_as_sft(example: dict) -> tuple[dict, dict]:
    """The (chosen, rejected) sides of a normalized preference example as SFT-shaped examples
    (``prompt``/``completion``, ``messages`` or ``text``), e.g. to measure their token lengths."""
    if "label" in example:  # unpaired: one side
        side = {"prompt": example["prompt"], "completion": example["completion"]}
        if isinstance(example["prompt"], list):
            side = {"messages": example["prompt"] + example["completion"]}
        return (side,)  # type: ignore[return-value]
    prompt, sides = example["prompt"], (example["chosen"], example["rejected"])
    if prompt is None:
        return tuple({"text": s} if isinstance(s, str) else {"messages": s} for s in sides)  # type: ignore[return-value]
    if isinstance(prompt, str):
        return tuple({"prompt": prompt, "completion": s} for s in sides)  # type: ignore[return-value]
    return tuple({"messages": prompt + s} for s in sides)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# lines and records
# --------------------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def parse_line(text: str, mapping: dict[str, str], expected_format: str | None = None) -> tuple[str, dict]:
    """Parse one JSONL line into ``(format, normalized example)``.

    ``mapping`` is the file's field map (:func:`field_map_for`); ``expected_format`` is the file's format
    once fixed: a record detected as another format is an error (so an explicit-prompt preference record
    in an implicit-preference file is refused, never silently stripped of its prompt). Raises :class:`RecordError` for invalid JSON
    (NaN/Infinity and out-of-range numbers included), too-deep nesting, a non-object, a format error.
    """
    try:
        record = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise RecordError("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise RecordError(f"invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise RecordError(f"line must be a JSON object, got {_type_name(record)}")
    check = "\\u" in text and _LONE_SURROGATE_ESCAPE.search(text) is not None
    return parse_record(record, mapping, expected_format, check_surrogates=check)


#: CSV/TSV columns always read as JSON (after field_map); an empty cell is null.
JSON_COLUMNS = ("messages", "conversations", "history")
#: CSV/TSV columns read as JSON when the cell is a JSON array of message objects, else as the string.
MESSAGE_LIST_COLUMNS = ("prompt", "completion", "chosen", "rejected")


def decode_json_cells(record: dict) -> dict:
    """A CSV/TSV row (string cells, after ``field_map``) with its structured columns decoded: every
    :data:`JSON_COLUMNS` cell as JSON (empty: null), a :data:`MESSAGE_LIST_COLUMNS` cell when it is a JSON
    array of objects (a message list), else kept as the string. Raises :class:`RecordError` naming the
    column when a :data:`JSON_COLUMNS` cell is not JSON."""
    out = dict(record)
    for key in JSON_COLUMNS:
        value = out.get(key)
        if isinstance(value, str):
            if not value.strip():
                out[key] = None
                continue
            try:
                out[key] = _DECODER.decode(value)
            except (ValueError, RecursionError) as exc:
                raise RecordError(f"column '{key}' must hold JSON (a list of messages): {exc}"[:300]) from None
    for key in MESSAGE_LIST_COLUMNS:
        value = out.get(key)
        if isinstance(value, str) and value.lstrip().startswith("[") and "{" in value:
            try:
                decoded = _DECODER.decode(value)
            except (ValueError, RecursionError):
                continue
            if isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded):
                out[key] = decoded
    return out


def parse_record(record: dict, mapping: dict[str, str], expected_format: str | None = None, *,
                 json_cells: bool = False, check_surrogates: bool = True) -> tuple[str, dict]:
    """``(format, normalized example)`` of a decoded record (a dict from any container), as
    :func:`parse_line` does for a JSON text: ``field_map``, then (``json_cells``: a CSV/TSV row)
    :func:`decode_json_cells`, format detection against ``expected_format``, normalization.
    ``check_surrogates``: refuse strings holding unpaired UTF-16 surrogates (they cannot be encoded).
    Raises :class:`RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(f"record must be a JSON object, got {_type_name(record)}")
    if mapping:
        record = apply_field_map(record, mapping)
    if json_cells:
        record = decode_json_cells(record)
    if expected_format == PROMPT_ONLY:  # chosen by the file's school, not detected
        if "prompt" not in record:
            raise RecordError(f"missing field 'prompt' (found fields {sorted(str(k) for k in record)[:20]}; "
                              "school grpo reads a prompt per record and passes the other fields to the rewards)")
        fmt = PROMPT_ONLY
    else:
        fmt = detect_format(record)  # a record has one format wherever it is in the file
    if expected_format is not None and fmt != expected_format:
        raise RecordError(f"record is format '{fmt}' but the file's format is '{expected_format}' "
                          f"(needs fields {list(FORMAT_FIELDS[expected_format])})")
    example = normalize(record, fmt)
    if check_surrogates:
        try:
            json.dumps(example, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError("text holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
    return fmt, example


class HashingReader(io.RawIOBase):
    """A raw reader that feeds every byte it reads into ``hasher`` (a ``hashlib`` object)."""

    def __init__(self, f: io.FileIO, hasher):
        super().__init__()
        self._f, self._hasher = f, hasher

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer) or 0
        if n:
            self._hasher.update(memoryview(buffer)[:n])
        return n


def is_gzip(path: Path) -> bool:
    """True when the file starts with the gzip magic bytes. Raises ``OSError`` if it cannot be read."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_text_lines(path: Path, *, max_line_bytes: int | None = None, hasher=None
                    ) -> Iterator[tuple[int, str | None, str | None]]:
    """Stream the lines of a plain or gzip file (chosen by the magic bytes, not the name).

    Yields ``(line_number, text, None)`` for each non-blank line (1-based physical line numbers; newline,
    a trailing ``\\r`` and a leading UTF-8 BOM removed) or ``(line_number, None, reason)`` for a line
    that is longer than ``max_line_bytes`` (read through in chunks, never held whole) or not valid UTF-8.
    Memory is bounded by ``max_line_bytes``. ``hasher`` (e.g. ``hashlib.sha256()``) receives every raw
    byte of the file (compressed bytes for gzip), including any bytes after the last line.

    Raises ``OSError`` when the file cannot be opened or read, :class:`CorruptFileError` for a broken gzip
    stream.
    """
    limit = -1 if max_line_bytes is None else max_line_bytes + 2  # room for "\r\n"
    with open(path, "rb", buffering=0) as raw_file:
        source = raw_file if hasher is None else HashingReader(raw_file, hasher)
        buffered = io.BufferedReader(source, buffer_size=_READ_BUFFER_BYTES)  # type: ignore[arg-type]
        head = buffered.peek(2)[:2]
        stream: IO[bytes] = gzip.GzipFile(fileobj=buffered, mode="rb") if head == GZIP_MAGIC else buffered
        try:
            yield from _lines(stream, limit, max_line_bytes)
            if hasher is not None:
                while buffered.read(_READ_BUFFER_BYTES):
                    pass
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise CorruptFileError(f"broken gzip stream: {exc}") from None


def _lines(stream: IO[bytes], limit: int, max_line_bytes: int | None):
    readline = stream.readline
    number = 0
    while True:
        raw = readline(limit)
        if not raw:
            return
        number += 1
        if max_line_bytes is not None and len(raw) >= limit and not raw.endswith(b"\n"):
            total = len(raw)
            while True:
                chunk = readline(_READ_BUFFER_BYTES)
                total += len(chunk)
                if not chunk:
                    break
                if chunk.endswith(b"\n"):
                    total -= 2 if chunk.endswith(b"\r\n") else 1
                    break
            yield number, None, f"line is longer than max_line_bytes ({total:,} > {max_line_bytes:,} bytes)"
            continue
        if number == 1 and raw.startswith(UTF8_BOM):
            raw = raw[3:]
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if max_line_bytes is not None and len(raw) > max_line_bytes:
            yield number, None, f"line is longer than max_line_bytes ({len(raw):,} > {max_line_bytes:,} bytes)"
            continue
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            yield number, None, (f"not valid UTF-8: {exc.reason} (byte 0x{raw[exc.start]:02x} at byte "
                                 f"{exc.start + 1})")


def iter_valid_records(path: Path, display_name: str, validation_config: ValidationConfig
                       ) -> Iterator[tuple[int, dict]]:
    """Yield ``(record number, normalized example)`` for every valid record of a quest file, in file order.

    The same rules as :func:`core.validation.validate_file` (the container of ``display_name``, see
    :mod:`core.containers`; its field map, record size limit, format fixed by the first valid record); bad
    records are skipped silently (the validation report lists them). The token-length policy is *not*
    applied here. Deterministic: the same file always yields the same sequence. Raises ``OSError`` when
    the file cannot be read, :class:`CorruptFileError` when it cannot be read on,
    :class:`core.containers.Unsupported` for a file that is no quest file.
    """
    from core import containers  # containers builds on this module

    mapping = field_map_for(display_name, validation_config.field_map)
    container = containers.detect(path, display_name)
    fmt: str | None = None
    for number, record, error, _ in containers.iter_items(path, container,
                                                          max_line_bytes=validation_config.max_line_bytes):
        if error is not None:
            continue
        try:
            fmt, example = containers.parse_item(record, mapping, fmt)  # type: ignore[arg-type]
        except RecordError:
            continue
        yield number, example
