"""JSON Schemas served by ``/api/schema`` besides the config's (which comes from :mod:`core.config`).

``QUEST_RECORD_SCHEMA``: one line of a quest file, one of the formats of :mod:`core.formats` (TRL's
dataset types). ``QUEST_SCHEMA``: a quest as the Tavern's API returns it (a row of the ledger's ``quests``).
Draft 2020-12. The validator in :mod:`core.validation` is the authority; these schemas document it.
"""

from __future__ import annotations

from core.ledger import QuestState
from core.realm import PRIORITIES

_S = {"type": "string"}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {"role": {"enum": ["system", "user", "assistant", "tool"]}, "content": _S},
}
_MESSAGES = {"type": "array", "items": _MESSAGE, "minItems": 1}
_TEXT_OR_MESSAGES = {"anyOf": [_S, _MESSAGES]}

QUEST_RECORD_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "quest record (one JSON object per line of a .jsonl quest file)",
    "description": "Other field names can be mapped with validation.field_map in config.json.",
    "oneOf": [
        {"title": "text", "type": "object", "required": ["text"], "properties": {"text": _S}},
        {"title": "messages", "type": "object", "required": ["messages"], "properties": {"messages": _MESSAGES},
         "not": {"required": ["label"]}},
        {"title": "prompt_completion", "type": "object", "required": ["prompt", "completion"],
         "properties": {"prompt": _TEXT_OR_MESSAGES, "completion": _TEXT_OR_MESSAGES},
         "not": {"anyOf": [{"required": ["chosen"]}, {"required": ["label"]}]}},
        {"title": "preference", "type": "object", "required": ["prompt", "chosen", "rejected"],
         "properties": {"prompt": _TEXT_OR_MESSAGES, "chosen": _TEXT_OR_MESSAGES, "rejected": _TEXT_OR_MESSAGES}},
        {"title": "preference_implicit", "type": "object", "required": ["chosen", "rejected"],
         "properties": {"chosen": _TEXT_OR_MESSAGES, "rejected": _TEXT_OR_MESSAGES},
         "not": {"anyOf": [{"required": ["prompt"]}, {"required": ["conversations"]}]}},
        {"title": "preference_sharegpt", "type": "object", "required": ["conversations", "chosen", "rejected"],
         "properties": {"conversations": {"type": "array"}, "chosen": {"type": ["object", "array"]},
                        "rejected": {"type": ["object", "array"]}}},
        {"title": "unpaired_preference", "type": "object", "required": ["prompt", "completion", "label"],
         "properties": {"prompt": _TEXT_OR_MESSAGES, "completion": _TEXT_OR_MESSAGES, "label": {"type": "boolean"}}},
        {"title": "messages_rated", "type": "object", "required": ["messages", "label"],
         "properties": {"messages": _MESSAGES, "label": {"type": "boolean"}}},
        {"title": "alpaca", "type": "object", "required": ["instruction", "output"],
         "properties": {"instruction": _S, "input": _S, "output": _S, "system": _S,
                        "history": {"type": "array", "items": {"type": "array", "items": _S,
                                                               "minItems": 2, "maxItems": 2}}}},
        {"title": "sharegpt", "type": "object", "required": ["conversations"], "not": {"required": ["chosen"]},
         "properties": {"system": _S, "conversations": {"type": "array", "minItems": 1, "items": {
             "type": "object", "required": ["from", "value"],
             "properties": {"from": _S, "value": _S}}}}},
    ],
}

_INT_OR_NULL = {"type": ["integer", "null"]}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}

QUEST_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "quest (a training data file and its progress)",
    "type": "object",
    "required": ["id", "name", "state", "priority"],
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "description": "the file name as dropped (shown as text, never as HTML)"},
        "stored_name": {"type": "string", "description": "<id>-<name> inside the queue folders"},
        "state": {"enum": [s.value for s in QuestState]},
        "priority": {"enum": list(PRIORITIES)},
        "attempts": {"type": "integer"},
        "content_hash": _STR_OR_NULL,
        "format": _STR_OR_NULL,
        "size_bytes": _INT_OR_NULL,
        "records": {**_INT_OR_NULL, "description": "lines in the file"},
        "bad_records": _INT_OR_NULL,
        "examples_total": {**_INT_OR_NULL, "description": "valid examples to train (held-out excluded)"},
        "examples_trained": {"type": "integer"},
        "tokens": _INT_OR_NULL,
        "steps": {"type": "integer", "description": "optimizer steps spent on this quest"},
        "first_global_step": _INT_OR_NULL,
        "last_global_step": _INT_OR_NULL,
        "error": _STR_OR_NULL,
        "note": _STR_OR_NULL,
        "created_at": {"type": "number", "description": "Unix time, seconds"},
        "updated_at": {"type": "number", "description": "Unix time, seconds"},
        "started_at": _NUM_OR_NULL,
        "finished_at": _NUM_OR_NULL,
        "source_url": {**_STR_OR_NULL, "description": "the address it was downloaded from (enqueue URL)"},
        "source_sha256": {**_STR_OR_NULL, "description": "SHA-256 of the downloaded bytes, hex"},
    },
}
