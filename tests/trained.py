"""Realms whose hero really trained, for the export and chat tests (the engine's own checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

from core.realm import Realm, init_realm
from tests.conftest import FAST_CONFIG, STORIES260K, deep_update


def trained_realm(root: Path, base_model: Path | None = STORIES260K, records: int = 24, **sections) -> Realm:
    """A realm (FAST_CONFIG, stories260K by default, or the nano default hero with ``base_model=None``)
    whose daemon trained one quest of ``records`` short stories to the end (a quest-end checkpoint)."""
    from core.daemon import Daemon

    overrides = deep_update(FAST_CONFIG, {"training": {"eval_holdout_every": 4}, **sections})
    realm = init_realm(root, base_model=str(base_model) if base_model else None, overrides=overrides)
    with open(realm.inbox / "stories.jsonl", "w", encoding="utf-8") as f:
        for i in range(records):
            f.write(json.dumps({"text": f"Once upon a time {i}, Lily saw a big red ball in the park."}) + "\n")
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    return realm
