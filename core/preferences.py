"""Preference data from people talking to checkpoints: ratings and chosen/rejected pairs, in the ledger.

Rows live in the realm's ledger (``ledger.sqlite``), table ``preferences`` (its schema:
:data:`core.ledger.FEEDBACK_SCHEMA`, with the ledger's other tables). Two kinds of row:

* a **rating** (``kind='rating'``): one answer marked good (``rating=+1``; the answer is in ``chosen``) or
  bad (``rating=-1``; the answer is in ``rejected``);
* a **pair** (``kind='pair'``): the user picked the better of two answers to the same prompt
  (``chosen`` and ``rejected`` both set, ``rating`` NULL).

``prompt`` is the conversation before the answer, a JSON list of ``{"role", "content"}`` messages ending
with a user message. Exports follow TRL's conversational formats: pairs as *preference* records
(``prompt``/``chosen``/``rejected``, for DPO) and ratings as *unpaired preference* records
(``prompt``/``completion``/``label``, for KTO).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from core.fsutil import atomic_write
from core.ledger import Ledger

ROLES = ("system", "user", "assistant")
MAX_PROMPT_MESSAGES = 256
MAX_TEXT_CHARS = 200_000

class PreferenceKind(str, Enum):
    RATING = "rating"
    PAIR = "pair"


class PreferenceError(ValueError):
    """Raised for invalid preference input (bad messages, empty answers, unknown ids)."""


def validate_prompt(prompt: Any) -> list[dict[str, str]]:
    """Return ``prompt`` as a clean list of ``{"role", "content"}`` dicts.

    Raises :class:`PreferenceError` unless it is a non-empty list (at most 256 messages) of dicts with a
    role in ``system``/``user``/``assistant`` and a string content, the last message from the user.
    """
    if not isinstance(prompt, list) or not prompt:
        raise PreferenceError("prompt must be a non-empty list of messages")
    if len(prompt) > MAX_PROMPT_MESSAGES:
        raise PreferenceError(f"prompt has {len(prompt)} messages; at most {MAX_PROMPT_MESSAGES}")
    clean = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PreferenceError(f"prompt[{i}] must be {{'role': one of {list(ROLES)}, 'content': str}}")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "user":
        raise PreferenceError("the last prompt message must come from the user")
    if sum(len(m["content"]) for m in clean) > MAX_TEXT_CHARS:
        raise PreferenceError(f"prompt is longer than {MAX_TEXT_CHARS} characters")
    return clean


def _answer(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PreferenceError(f"{name} must be a non-empty string")
    if len(value) > MAX_TEXT_CHARS:
        raise PreferenceError(f"{name} is longer than {MAX_TEXT_CHARS} characters")
    return value


def _checkpoint(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise PreferenceError("checkpoint must be a non-empty name (at most 200 characters)")
    return value


def _insert(ledger: Ledger, row: dict[str, Any], replaces: int | None) -> int:
    with ledger.transaction() as c:
        if replaces is not None:
            gone = c.execute("DELETE FROM preferences WHERE id=?", (int(replaces),)).rowcount
            if not gone:
                raise PreferenceError(f"no preference with id {replaces} to replace")
        cur = c.execute(
            "INSERT INTO preferences(time, kind, checkpoint, prompt, chosen, rejected, rating, source) "
            "VALUES (:time, :kind, :checkpoint, :prompt, :chosen, :rejected, :rating, :source)", row)
        return int(cur.lastrowid)


def record_rating(ledger: Ledger, *, checkpoint: str, prompt: list[dict[str, str]], completion: str,
                  rating: int, source: str = "oracle", replaces: int | None = None) -> int:
    """Store a 👍 (``rating=+1``) or 👎 (``rating=-1``) on one answer. Returns the new row id.

    ``replaces``: id of an earlier row (the user changed their mind) deleted in the same transaction.
    Raises :class:`PreferenceError` on invalid input or an unknown ``replaces`` id (nothing is written).
    """
    if rating not in (1, -1) or isinstance(rating, bool):
        raise PreferenceError("rating must be +1 (good) or -1 (bad)")
    prompt = validate_prompt(prompt)
    completion = _answer(completion, "completion")
    row = {"time": time.time(), "kind": PreferenceKind.RATING.value, "checkpoint": _checkpoint(checkpoint),
           "prompt": json.dumps(prompt, ensure_ascii=False), "chosen": completion if rating > 0 else None,
           "rejected": completion if rating < 0 else None, "rating": rating, "source": str(source)}
    return _insert(ledger, row, replaces)


def record_pair(ledger: Ledger, *, checkpoint: str, prompt: list[dict[str, str]], chosen: str, rejected: str,
                source: str = "oracle", replaces: int | None = None) -> int:
    """Store a choice between two answers to the same prompt. Returns the new row id.

    Raises :class:`PreferenceError` on invalid input, identical answers or an unknown ``replaces`` id.
    """
    prompt = validate_prompt(prompt)
    chosen, rejected = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    if chosen == rejected:
        raise PreferenceError("chosen and rejected are the same text; a pair needs two different answers")
    row = {"time": time.time(), "kind": PreferenceKind.PAIR.value, "checkpoint": _checkpoint(checkpoint),
           "prompt": json.dumps(prompt, ensure_ascii=False), "chosen": chosen, "rejected": rejected,
           "rating": None, "source": str(source)}
    return _insert(ledger, row, replaces)


def delete_preference(ledger: Ledger, preference_id: int) -> None:
    """Delete one row. Raises :class:`PreferenceError` when no row has that id."""
    with ledger.transaction() as c:
        if not c.execute("DELETE FROM preferences WHERE id=?", (int(preference_id),)).rowcount:
            raise PreferenceError(f"no preference with id {preference_id}")


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["prompt"] = json.loads(row["prompt"])
    return row


def list_preferences(ledger: Ledger, kind: PreferenceKind | str | None = None, limit: int = 100,
                     before_id: int | None = None) -> list[dict[str, Any]]:
    """Newest first, at most ``limit`` rows (ids below ``before_id`` when given, for paging).

    Each row: ``id, time, kind, checkpoint, prompt`` (list of messages), ``chosen, rejected, rating,
    source``.
    """
    where, params = ["1=1"], []
    if kind is not None:
        where.append("kind=?")
        params.append(PreferenceKind(kind).value)
    if before_id is not None:
        where.append("id<?")
        params.append(int(before_id))
    rows = ledger.query(f"SELECT * FROM preferences WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
                        (*params, max(0, int(limit))))
    return [_decode(r) for r in rows]


def preference_counts(ledger: Ledger) -> dict[str, int]:
    """``{"pair": n, "rating_up": n, "rating_down": n}``."""
    out = {"pair": 0, "rating_up": 0, "rating_down": 0}
    for r in ledger.query("SELECT kind, rating, COUNT(*) AS n FROM preferences GROUP BY kind, rating"):
        key = "pair" if r["kind"] == "pair" else ("rating_up" if r["rating"] > 0 else "rating_down")
        out[key] += r["n"]
    return out


def _rows(ledger: Ledger, kind: PreferenceKind) -> Iterator[dict[str, Any]]:
    last = 0
    while True:  # pages of 500 keep memory flat on big ledgers
        rows = ledger.query("SELECT * FROM preferences WHERE kind=? AND id>? ORDER BY id LIMIT 500",
                            (kind.value, last))
        if not rows:
            return
        for r in rows:
            yield _decode(r)
        last = rows[-1]["id"]


def preference_records(ledger: Ledger) -> Iterator[dict[str, list[dict[str, str]]]]:
    """Pairs as TRL conversational preference records, oldest first::

        {"prompt": [...messages], "chosen": [{"role": "assistant", "content": ...}],
         "rejected": [{"role": "assistant", "content": ...}]}
    """
    for r in _rows(ledger, PreferenceKind.PAIR):
        yield {"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
               "rejected": [{"role": "assistant", "content": r["rejected"]}]}


def rating_records(ledger: Ledger) -> Iterator[dict[str, Any]]:
    """Ratings as TRL conversational unpaired preference records (KTO), oldest first::

        {"prompt": [...messages], "completion": [{"role": "assistant", "content": ...}], "label": true}
    """
    for r in _rows(ledger, PreferenceKind.RATING):
        text = r["chosen"] if r["rating"] > 0 else r["rejected"]
        yield {"prompt": r["prompt"], "completion": [{"role": "assistant", "content": text}],
               "label": r["rating"] > 0}


def _write_jsonl(records: Iterator[dict[str, Any]], path: Path | str) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_write(path) as f:  # readers never see a half-written file
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def export_preferences_jsonl(ledger: Ledger, path: Path | str) -> int:
    """Write every pair to ``path`` as JSON lines (:func:`preference_records`), atomically.

    Returns the number of records written. Raises ``OSError`` when the file cannot be written.
    """
    return _write_jsonl(preference_records(ledger), path)


def export_ratings_jsonl(ledger: Ledger, path: Path | str) -> int:
    """Write every rating to ``path`` as JSON lines (:func:`rating_records`), atomically. Returns the count."""
    return _write_jsonl(rating_records(ledger), path)
