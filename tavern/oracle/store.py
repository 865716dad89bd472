"""Which models the oracle can talk to, by the names users and API clients send.

* ``hero``: the live hero, i.e. the latest checkpoint, or the base model before the first checkpoint;
* ``step-00001234``: one checkpoint of the vault (``models/<hero>/checkpoints/``), by exact name;
* ``base``: the hero's starting weights (``hero.base_model``, or the embedded default at
  ``models/<hero>/base`` once the daemon created it).

Names are looked up among the folders that exist: a request never builds a path from user text. No torch
here: the Tavern process reads checkpoint folders through :mod:`core.vault`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.config import RealmConfig
from core.ledger import Ledger
from core.realm import Realm
from core.vault import list_checkpoints_info

LIVE_MODEL_ID = "hero"
BASE_MODEL_ID = "base"
DEFAULT_BASE_DIRNAME = "base"  # core.hero.BASE_DIRNAME (core.hero imports torch, which the Tavern avoids)


class ModelNotFound(LookupError):
    """The requested model name is not ``hero``, ``base`` or an existing checkpoint; the message lists
    what is available."""


@dataclass(frozen=True)
class ModelEntry:
    """A model the oracle can load.

    ``id``: the name clients send; ``kind``: ``live``, ``checkpoint`` or ``base``; ``checkpoint``: the
    weights actually used (``step-00001234`` or ``base``); ``path``: absolute folder, or None for a base
    model resolved by the worker (a hub id in the local cache); ``global_step``: None for the base model;
    ``created``: unix seconds; ``loss``/``eval_loss``: from the checkpoint's trainer state, or None.
    """

    id: str
    kind: str
    checkpoint: str
    path: str | None
    global_step: int | None
    created: float
    label: str
    loss: float | None = None
    eval_loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")  # clients need names, not the server's folders
        return data


def _base_entry(realm: Realm, config: RealmConfig) -> ModelEntry | None:
    hero = config.hero
    if hero.base_model is None:
        folder = realm.hero_dir(hero.name) / DEFAULT_BASE_DIRNAME
        if not (folder / "config.json").is_file():
            return None  # the daemon has not created the newborn hero yet
        return ModelEntry(BASE_MODEL_ID, "base", BASE_MODEL_ID, str(folder), None, folder.stat().st_mtime,
                          "base (newborn default hero)")
    source = realm.resolve_base_model(hero.base_model)
    local = Path(source)
    created = local.stat().st_mtime if local.exists() else 0.0
    return ModelEntry(BASE_MODEL_ID, "base", BASE_MODEL_ID, None, None, created,
                      f"base ({Path(hero.base_model).name or hero.base_model})")


def list_models(realm: Realm, config: RealmConfig, ledger: Ledger) -> list[ModelEntry]:
    """``hero`` first (when anything exists), then checkpoints newest first, then ``base``."""
    checkpoints_dir = realm.checkpoints_dir(config.hero.name)
    entries = [ModelEntry(c["name"], "checkpoint", c["name"], str(checkpoints_dir / c["name"]), c["step"],
                          c["time"], c["name"], c["loss"], c["eval_loss"])
               for c in list_checkpoints_info(realm, config.hero.name, ledger)]
    base = _base_entry(realm, config)
    live_source = entries[0] if entries else base
    out = []
    if live_source is not None:
        out.append(ModelEntry(LIVE_MODEL_ID, "live", live_source.checkpoint, live_source.path,
                              live_source.global_step, time.time(),
                              f"live hero ({live_source.checkpoint})", live_source.loss, live_source.eval_loss))
    out += entries
    if base is not None:
        out.append(base)
    return out


def resolve_model(realm: Realm, config: RealmConfig, ledger: Ledger, model_id: str) -> ModelEntry:
    """The entry named ``model_id`` (exact match). Raises :class:`ModelNotFound`."""
    models = list_models(realm, config, ledger)
    for entry in models:
        if entry.id == model_id:
            return entry
    if not models:
        raise ModelNotFound("the hero has no checkpoint and no base model yet: start training first")
    names = [m.id for m in models]
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    raise ModelNotFound(f"unknown model {str(model_id)[:80]!r}; available: {shown}")
