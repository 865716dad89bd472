"""What changed between two config snapshots: the one saved in a checkpoint and the one in force now.

Torch-free and pure. :func:`config_changes` walks both ``model_dump()`` dicts and returns each changed leaf
under its dotted key (``training.learning_rate``); values of secret keys (the Tavern's access token, any
``*token``/``*secret``/``*password``/``*api_key`` or URL that may carry credentials) are shown as
:data:`REDACTED`, so a diff can go to the log and the ledger's events (which the Tavern shows).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

ABSENT = "(absent)"
"""Shown for a key that one snapshot has and the other has not (a config written by another version)."""
REDACTED = "(redacted)"
SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_key|credential|webhook|url)s?$", re.I)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
                   ) -> list[tuple[str, Any, Any]]:
    """``[(dotted_key, old_value, new_value), ...]`` for every leaf that differs, sorted by key.

    Nested mappings are compared key by key; any other value (lists included) as a whole. A key on one
    side only gives :data:`ABSENT` on the other. Secret values are :data:`REDACTED` (a changed secret is
    still reported, its values never are)."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_changes(a, b, dotted + "."))
        elif a != b:
            if SECRET_KEY.search(str(key)):
                a = a if a in (ABSENT, None) else REDACTED
                b = b if b in (ABSENT, None) else REDACTED
            out.append((dotted, a, b))
    return out


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``training.learning_rate 0.001 -> 0.0005; training.save_steps 5 -> 10``."""
    return "; ".join(f"{key} {_show(a)} -> {_show(b)}" for key, a, b in changes)


def _show(value: Any) -> str:
    return value if value in (ABSENT, REDACTED) else repr(value)
