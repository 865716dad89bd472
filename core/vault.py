"""The vault: a hero's checkpoints as the Tavern shows them, with pins, guarded deletion and disk usage.

Checkpoints are named and found as :mod:`core.checkpoint_layout` says (one folder per global step under
``<realm>/models/<hero>/checkpoints/``); each holds ``trainer_state.json`` with ``global_step``, ``time``
(unix seconds), ``loss``, ``eval_loss`` (may be null) and more. Folders whose name is not exactly a
checkpoint name (``.tmp-...`` being written, ``.trash-...`` being deleted, anything else) are not
checkpoints.

Pins are a list of checkpoint names in the ledger's key/value table under :data:`PINNED_KEY`; retention
(``management/``) reads the same key. Deletion is by exact name only: the caller must type the name again
(``confirm``), and the latest (the resume point), the best and pinned checkpoints are refused.

No Flask here: the Tavern's vault page calls these functions. Nor torch: the layout module is torch-free,
while :mod:`core.checkpoint` (the engine's writer) imports torch, which the Tavern process must not pay for.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from core.checkpoint_layout import (
    CHECKPOINT_PREFIX,
    EXAMPLE_NAME,
    KEY_ADAPTER,
    KEY_ADAPTER_BASE,
    KEY_ADAPTER_TYPE,
    KEY_EVAL_LOSS,
    KEY_LOSS,
    KEY_OPTIMIZER_REMOVED,
    KEY_REASON,
    KEY_TIME,
    STEP_DIGITS,
    TRAINER_STATE_JSON,
    TRASH_PREFIX,
    is_checkpoint_name,
    list_checkpoints,
    match_step,
)
from core.ledger import Ledger
from core.realm import Realm

PINNED_KEY = "pinned_checkpoints"

TAG_LATEST = "latest"
TAG_BEST = "best"
TAG_PINNED = "pinned"

_MAX_STATE_BYTES = 4 * 1024 * 1024  # a larger trainer_state.json is not read (it is not ours)


class VaultError(ValueError):
    """A vault action that cannot be done (bad name, unknown, latest, best or pinned checkpoint).

    The message says why and what to do instead; the Tavern shows it as is.
    """


def parse_checkpoint_name(name: str) -> int:
    """Global step of a checkpoint folder name (``"step-00001234"`` -> 1234).

    Raises :class:`VaultError` for anything else (path separators, ``..``, prefixes, other digits counts).
    """
    step = match_step(name)
    if step is None:
        raise VaultError(f"{name!r} is not a checkpoint name (expected {CHECKPOINT_PREFIX} and {STEP_DIGITS} digits, "
                         f"e.g. {EXAMPLE_NAME})")
    return step


def _checkpoint_dirs(realm: Realm, hero_name: str) -> list[tuple[int, str, Path]]:
    """(global_step, name, path) of each checkpoint folder, oldest first. Symlinks are not checkpoints."""
    return [(match_step(p.name), p.name, p) for p in list_checkpoints(realm.checkpoints_dir(hero_name))]


def _tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue  # removed while we walked
        except OSError:
            continue
    return total


def _read_state(path: Path) -> tuple[dict[str, Any], str | None]:
    """(trainer_state.json as a dict, problem or None)."""
    state_file = path / TRAINER_STATE_JSON
    try:
        if state_file.stat().st_size > _MAX_STATE_BYTES:
            return {}, f"{TRAINER_STATE_JSON} is larger than {_MAX_STATE_BYTES} bytes"
        data = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"{TRAINER_STATE_JSON} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{TRAINER_STATE_JSON} is unreadable: {exc}"
    if not isinstance(data, dict):
        return {}, f"{TRAINER_STATE_JSON} is not a JSON object"
    return data, None


def _number(value: Any) -> float | None:
    """A finite float, or None (null, NaN, strings...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


# pins ------------------------------------------------------------------------------------------------
def pinned_checkpoints(ledger: Ledger) -> list[str]:
    """Names of pinned checkpoints (ledger kv :data:`PINNED_KEY`), sorted. Invalid entries are ignored."""
    value = ledger.get_value(PINNED_KEY, [])
    if not isinstance(value, list):
        return []
    return sorted({v for v in value if is_checkpoint_name(v)})


def _set_pins(ledger: Ledger, name: str, pinned: bool) -> bool:
    """Add or remove ``name`` in one ledger transaction (so two Tavern tabs cannot lose a pin).
    Returns True when the list changed."""
    with ledger.transaction() as c:
        row = c.execute("SELECT value FROM kv WHERE key=?", (PINNED_KEY,)).fetchone()
        current = json.loads(row[0]) if row else []
        names = {v for v in current if isinstance(v, str)} if isinstance(current, list) else set()
        before = set(names)
        (names.add if pinned else names.discard)(name)
        if names != before:
            c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)",
                      (PINNED_KEY, json.dumps(sorted(names)), time.time()))
    return names != before


def pin(ledger: Ledger, name: str, realm: Realm | None = None, hero_name: str | None = None) -> bool:
    """Pin checkpoint ``name`` so retention and deletion keep it. Returns True if it was not pinned yet.

    When ``realm`` and ``hero_name`` are given, the checkpoint must exist. Raises :class:`VaultError`
    for a bad or unknown name.
    """
    step = parse_checkpoint_name(name)
    if realm is not None and hero_name is not None:
        if not any(s == step for s, _, _ in _checkpoint_dirs(realm, hero_name)):
            raise VaultError(f"no checkpoint {name} in the vault of {hero_name}")
    changed = _set_pins(ledger, name, True)
    if changed:
        ledger.event("checkpoint_pinned", f"checkpoint {name} pinned", checkpoint=name)
    return changed


def unpin(ledger: Ledger, name: str) -> bool:
    """Unpin checkpoint ``name`` (it need not exist any more). Returns True if it was pinned.

    Raises :class:`VaultError` for a bad name.
    """
    parse_checkpoint_name(name)
    changed = _set_pins(ledger, name, False)
    if changed:
        ledger.event("checkpoint_unpinned", f"checkpoint {name} unpinned", checkpoint=name)
    return changed


# listing ---------------------------------------------------------------------------------------------
def list_checkpoints_info(realm: Realm, hero_name: str, ledger: Ledger) -> list[dict[str, Any]]:
    """Every checkpoint of ``hero_name``, newest first, as dicts:

    ``name`` (str), ``step`` (int, global step), ``time`` (unix seconds: ``trainer_state.json``'s
    ``time``, else the folder's mtime), ``loss`` and ``eval_loss`` (float or None), ``reason`` (why it
    was saved, or None), ``size_bytes`` (int, regular files in the folder), ``tags`` (subset of
    ``["latest", "best", "pinned"]``) and ``problem`` (None, or why ``trainer_state.json`` could not be read);
    ``adapter`` (None for a full checkpoint, else ``lora``/``qlora``) and ``full_size_bytes`` (for an adapter
    checkpoint, about what a full checkpoint of the same model would take: base parameters x 4 bytes (fp32)
    x 3 with the optimizer's two AdamW moments, x 1 without; None for a full checkpoint).

    ``latest`` is the highest global step (the resume point). ``best`` is the lowest ``eval_loss`` among
    checkpoints that have one, else the lowest ``loss``; ties go to the newer checkpoint.
    """
    pins = set(pinned_checkpoints(ledger))
    infos: list[dict[str, Any]] = []
    for step, name, path in _checkpoint_dirs(realm, hero_name):
        state, problem = _read_state(path)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue  # deleted while we listed
        t = _number(state.get(KEY_TIME))
        adapter, full = _adapter_sizes(state)
        infos.append({
            "name": name, "step": step, "time": t if t is not None else mtime,
            "loss": _number(state.get(KEY_LOSS)), "eval_loss": _number(state.get(KEY_EVAL_LOSS)),
            "reason": state.get(KEY_REASON) if isinstance(state.get(KEY_REASON), str) else None,
            "size_bytes": _tree_bytes(path), "tags": [], "problem": problem,
            "adapter": adapter, "full_size_bytes": full,
        })
    if infos:
        infos[-1]["tags"].append(TAG_LATEST)
        best = _best(infos)
        if best is not None:
            best["tags"].append(TAG_BEST)
        for info in infos:
            if info["name"] in pins:
                info["tags"].append(TAG_PINNED)
    infos.reverse()
    return infos


def _adapter_sizes(state: dict[str, Any]) -> tuple[str | None, int | None]:
    """(adapter type, bytes of a full checkpoint of the same model) from ``trainer_state.json``."""
    record = state.get(KEY_ADAPTER)
    if not isinstance(record, dict):
        return None, None
    kind = record.get(KEY_ADAPTER_TYPE) if isinstance(record.get(KEY_ADAPTER_TYPE), str) else "adapter"
    base = record.get(KEY_ADAPTER_BASE)
    params = _number(base.get("parameters")) if isinstance(base, dict) else None
    if params is None:
        return kind, None
    return kind, int(params * 4 * (1 if KEY_OPTIMIZER_REMOVED in state else 3))


def _best(infos: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The checkpoint with the lowest eval_loss, else the lowest loss (newest on ties); None if no metrics."""
    for key in ("eval_loss", "loss"):
        scored = [i for i in infos if i[key] is not None]
        if scored:
            return min(scored, key=lambda i: (i[key], -i["step"]))
    return None


# deletion --------------------------------------------------------------------------------------------
def delete_checkpoint(realm: Realm, hero_name: str, ledger: Ledger, name: str, confirm: str) -> dict[str, Any]:
    """Delete checkpoint ``name`` of ``hero_name``; ``confirm`` must equal ``name`` exactly.

    The folder is first renamed to ``.trash-<name>-<random>`` (one atomic step: nobody sees half a
    checkpoint), then removed; an event ``checkpoint_deleted`` is logged. Returns
    ``{"name", "step", "size_bytes", "leftover"}`` (``leftover``: a trash folder that could not be fully
    removed, else None).

    Raises :class:`VaultError` when the name is not a checkpoint name, ``confirm`` differs, the checkpoint
    does not exist, or it is the latest (the resume point), the best, or pinned.
    """
    step = parse_checkpoint_name(name)
    if confirm != name:
        raise VaultError(f"type the exact name {name} to delete it (got {confirm!r})")
    infos = {i["name"]: i for i in list_checkpoints_info(realm, hero_name, ledger)}
    info = infos.get(name)
    if info is None:
        raise VaultError(f"no checkpoint {name} in the vault of {hero_name}")
    if TAG_LATEST in info["tags"]:
        raise VaultError(f"{name} is the latest checkpoint, where training resumes; it cannot be deleted")
    if TAG_BEST in info["tags"]:
        raise VaultError(f"{name} is the best checkpoint (lowest validation loss, else loss); "
                         "it cannot be deleted")
    if TAG_PINNED in info["tags"]:
        raise VaultError(f"{name} is pinned; unpin it first")
    root = realm.checkpoints_dir(hero_name)
    path = root / name  # a checkpoint name (parse_checkpoint_name): no separators, no "..", cannot leave root
    trash = root / f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        raise VaultError(f"no checkpoint {name} in the vault of {hero_name} (deleted meanwhile)") from None
    leftover = None
    try:
        shutil.rmtree(trash)
    except OSError as exc:
        leftover = str(trash)
        ledger.event("checkpoint_delete_incomplete", f"checkpoint {name} was hidden but not fully removed: "
                     f"{exc}", level="warning", checkpoint=name, path=leftover)
    ledger.event("checkpoint_deleted", f"checkpoint {name} deleted ({info['size_bytes']} bytes freed)",
                 checkpoint=name, global_step=step, size_bytes=info["size_bytes"])
    return {"name": name, "step": step, "size_bytes": info["size_bytes"], "leftover": leftover}


# disk ------------------------------------------------------------------------------------------------
def vault_disk_usage(realm: Realm, hero_name: str) -> dict[str, int]:
    """``{"vault_bytes", "free_bytes", "total_bytes"}``: bytes under the hero's checkpoints folder
    (all of it, temporary folders included), and free/total bytes of the filesystem holding it
    (:func:`shutil.disk_usage`, free space available to this user)."""
    root = realm.checkpoints_dir(hero_name)
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"vault_bytes": _tree_bytes(root) if root.is_dir() else 0,
            "free_bytes": int(usage.free), "total_bytes": int(usage.total)}
