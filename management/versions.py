"""Named versions of a realm's hero: promote a checkpoint, list versions, restore one as the starting point.

``models/<hero>/versions/<name>/`` holds a full, SHA-256-verified copy of a checkpoint, its ``SHA256SUMS``
and ``metadata.json`` (base model, quests seen, metrics, file hashes). Errors: :class:`VaultOpsError`
(bad or taken name, unknown or damaged version, daemon running during a restore),
:class:`BackupError` (a copy differs from its source), ``OSError``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.checkpoint_layout import (
    KEY_ADAPTER,
    KEY_ADAPTER_TYPE,
    KEY_CURSOR,
    KEY_EVAL_LOSS,
    KEY_GLOBAL_STEP,
    KEY_HERO,
    KEY_LOSS,
    KEY_OPTIMIZER_REMOVED,
    KEY_REASON,
    KEY_RESTORED_FROM,
    KEY_RNG,
    KEY_SCHEDULER,
    KEY_TIME,
    TMP_PREFIX,
    TRAINER_STATE_JSON,
    TRAINER_STATE_PT,
    VERSION_NAME_RE,
    checkpoint_name,
)
from core.config import RealmConfig
from core.fsutil import ExclusiveLock, fsync_tree, write_json_atomic
from core.ledger import Ledger
from core.realm import DAEMON_LOCK, Realm
from core.vault import list_checkpoints_info
from management.vault_ops import (
    METADATA_FILE,
    SUMS_FILE,
    VaultOpsError,
    checkpoint_path,
    copy_verified,
    read_json,
    tree_hashes,
    verify_copy,
)


def versions_dir(realm: Realm, hero: str) -> Path:
    return realm.versions_dir(hero)


def quests_seen(ledger: Ledger, global_step: int) -> list[dict[str, Any]]:
    """Quests trained into the weights at ``global_step``: ``{id, name, steps, examples_trained}``."""
    return ledger.quests_trained_until(global_step)


def _metadata(name: str, source: Path, state: dict[str, Any], ledger: Ledger, hashes: dict[str, str],
              kind: str) -> dict[str, Any]:
    step = int(state.get(KEY_GLOBAL_STEP, 0))
    hero = state.get(KEY_HERO) or {}
    evals = ledger.evals_until(step, limit=20)
    return {"name": name, "kind": kind, "created_at": time.time(), "source_checkpoint": source.name,
            "global_step": step, "base_model": hero.get("base_model"), "hero": hero,
            "adapter": (state.get(KEY_ADAPTER) or {}).get(KEY_ADAPTER_TYPE),
            "metrics": {"loss": state.get(KEY_LOSS), "eval_loss": state.get(KEY_EVAL_LOSS), "recent_evals": evals},
            "quests_seen": quests_seen(ledger, step), "files": hashes}


def promote(realm: Realm, config: RealmConfig, ledger: Ledger, step: int, name: str) -> dict[str, Any]:
    """Make checkpoint ``step`` the named version ``models/<hero>/versions/<name>/`` (a verified full copy
    with ``metadata.json``: base model, quests seen, metrics, file hashes). Returns the metadata.

    Raises :class:`VaultOpsError` for a bad or taken name or a missing checkpoint; :class:`BackupError`.
    """
    if not isinstance(name, str) or not VERSION_NAME_RE.fullmatch(name):
        raise VaultOpsError(f"{name!r} is not a version name: 1-64 letters, digits, '_', '.', '-' "
                            "(not starting with '.', '_' or '-')")
    hero = config.hero.name
    src = checkpoint_path(realm, hero, step)
    dest = versions_dir(realm, hero) / name
    if dest.exists():
        raise VaultOpsError(f"version {name!r} exists; choose another name")
    hashes = copy_verified(src, dest)
    meta = _metadata(name, src, read_json(src / TRAINER_STATE_JSON), ledger, hashes, "promoted")
    write_json_atomic(dest / METADATA_FILE, meta)
    ledger.event("version_promoted", f"checkpoint {src.name} promoted to version {name}", version=name,
                 checkpoint=src.name, global_step=meta["global_step"])
    return meta


def list_versions(realm: Realm, hero: str) -> list[dict[str, Any]]:
    """Metadata of every named version (without the file hashes), newest first."""
    root = versions_dir(realm, hero)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and VERSION_NAME_RE.fullmatch(p.name):
            meta = read_json(p / METADATA_FILE)
            meta.pop("files", None)
            out.append({"name": p.name, "path": str(p), **meta})
    return sorted(out, key=lambda m: m.get("created_at") or 0, reverse=True)


@contextmanager
def _daemon_lock(realm: Realm) -> Iterator[None]:
    """Hold the daemon's single-instance lock (:data:`core.realm.DAEMON_LOCK`) so no daemon runs
    meanwhile. Raises :class:`VaultOpsError` when a daemon holds it."""
    lock = ExclusiveLock(realm.lock_file(DAEMON_LOCK))
    if not lock.acquire():
        raise VaultOpsError("the daemon is running: stop it first (`python -m training stop-all`), then restore")
    try:
        yield
    finally:
        lock.release()


def _merged_trainer_state(version: Path, latest: Path | None, dest: Path) -> None:
    """``trainer_state.pt`` of a restored checkpoint: the version's optimizer state (it belongs to its
    weights), the latest checkpoint's scheduler and RNG (the schedule continues at the current step)."""
    import torch

    blob = torch.load(version / TRAINER_STATE_PT, map_location="cpu", weights_only=True)
    if latest is not None:
        current = torch.load(latest / TRAINER_STATE_PT, map_location="cpu", weights_only=True)
        blob = {**blob, KEY_SCHEDULER: current[KEY_SCHEDULER], KEY_RNG: current[KEY_RNG]}
    torch.save(blob, dest / TRAINER_STATE_PT)


def restore(realm: Realm, config: RealmConfig, ledger: Ledger, name: str) -> dict[str, Any]:
    """Make version ``name`` the hero's starting point again; the daemon must be stopped.

    The global step never goes back: the version's weights (and its optimizer state) become a new
    checkpoint at the *current* latest global step, keeping that checkpoint's data cursor, scheduler and
    RNG, so training resumes on the version's weights with the next unseen example. The replaced latest
    checkpoint is not lost: it is first moved to the version ``before-restore-<UTC time>``.

    Returns ``{"version", "checkpoint", "global_step", "previous_saved_as"}``. Raises
    :class:`VaultOpsError` (unknown version, damaged version, daemon running).
    """
    hero = config.hero.name
    version = versions_dir(realm, hero) / name
    if not VERSION_NAME_RE.fullmatch(name or "") or not version.is_dir():
        known = ", ".join(v["name"] for v in list_versions(realm, hero)) or "none"
        raise VaultOpsError(f"no version {name!r} (versions: {known})")
    problems = verify_copy(version)
    if problems:
        raise VaultOpsError(f"version {name} is damaged: {'; '.join(problems)}")
    with _daemon_lock(realm):
        root = realm.checkpoints_dir(hero)
        root.mkdir(parents=True, exist_ok=True)
        infos = list_checkpoints_info(realm, hero, ledger)
        latest = root / infos[0]["name"] if infos else None
        vstate = read_json(version / TRAINER_STATE_JSON)
        base = read_json(latest / TRAINER_STATE_JSON) if latest else dict(vstate)
        step = int(base.get(KEY_GLOBAL_STEP, 0)) if latest else 0
        if not latest:
            base[KEY_CURSOR] = None
        base.update({KEY_GLOBAL_STEP: step, KEY_TIME: time.time(), KEY_REASON: "restore",
                     KEY_LOSS: vstate.get(KEY_LOSS), KEY_EVAL_LOSS: vstate.get(KEY_EVAL_LOSS),
                     KEY_HERO: vstate.get(KEY_HERO, base.get(KEY_HERO)),
                     KEY_RESTORED_FROM: {"version": name, "global_step": vstate.get(KEY_GLOBAL_STEP)}})
        base.pop(KEY_OPTIMIZER_REMOVED, None)
        base.pop(KEY_ADAPTER, None)  # the weights are the version's: so is the adapter record (base + hash)
        if isinstance(vstate.get(KEY_ADAPTER), dict):
            base[KEY_ADAPTER] = vstate[KEY_ADAPTER]
        tmp = root / f"{TMP_PREFIX}restore-{checkpoint_name(step)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            skip = {SUMS_FILE, METADATA_FILE, TRAINER_STATE_JSON, TRAINER_STATE_PT}
            for rel in tree_hashes(version, exclude=frozenset(skip)):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(version / rel, tmp / rel)
            _merged_trainer_state(version, latest, tmp)
            write_json_atomic(tmp / TRAINER_STATE_JSON, base)
            fsync_tree(tmp)
            saved_as = saved = None
            if latest is not None:
                saved_as = f"before-restore-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
                saved = versions_dir(realm, hero) / saved_as
                saved.parent.mkdir(parents=True, exist_ok=True)
                hashes = tree_hashes(latest)
                _write_sums(latest, hashes)
                os.rename(latest, saved)
            final = root / checkpoint_name(step)
            try:
                os.rename(tmp, final)
            except OSError:
                if saved is not None:
                    os.rename(saved, latest)  # put the latest back: nothing changed
                raise
            if saved is not None:
                meta = _metadata(saved_as, latest, read_json(saved / TRAINER_STATE_JSON), ledger, hashes,
                                 "before_restore")
                write_json_atomic(saved / METADATA_FILE, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    ledger.event("version_restored", f"version {name} restored as checkpoint {final.name}: training resumes "
                 f"from its weights at global step {step}" + (f" (the previous one was kept as version "
                                                              f"{saved_as})" if saved_as else ""),
                 version=name, checkpoint=final.name, global_step=step, previous_saved_as=saved_as)
    return {"version": name, "checkpoint": str(final), "global_step": step, "previous_saved_as": saved_as}


def _write_sums(folder: Path, hashes: dict[str, str]) -> None:
    (folder / SUMS_FILE).write_text("".join(f"{h}  {rel}\n" for rel, h in hashes.items()), encoding="utf-8")
