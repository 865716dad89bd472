"""Vault operations on a realm's hero: prune (apply a retention plan), strip optimizer state, backup with
SHA-256 verification (named versions: :mod:`management.versions`).

Layout (``core.realm``/``core.checkpoint_layout``)::

    models/<hero>/checkpoints/step-00001234/    checkpoints (trainer_state.pt holds the optimizer state)
    models/<hero>/versions/<name>/               named versions: a full checkpoint copy + metadata.json
                                                 + SHA256SUMS
    <backup.folder>/<hero>/step-00001234/        backups: a full checkpoint copy + SHA256SUMS

Deletion goes through :func:`core.vault.delete_checkpoint` (rename to ``.trash-...`` then remove; it
re-checks at that moment that the checkpoint is not the latest, the best or pinned). Copies are written
to a ``.tmp-...`` folder, verified file by file against the source's SHA-256 and only then renamed, so a
folder under its final name is always complete and verified.

Stripping keeps ``trainer_state.pt`` loadable by the engine: the optimizer entry keeps its
``param_groups`` with an empty ``state`` (AdamW restarts its moments), the scheduler and RNG states stay;
``trainer_state.json`` gets :data:`OPTIMIZER_REMOVED_KEY`. Errors: :class:`VaultOpsError` (bad name,
missing checkpoint or version, daemon running during a restore), :class:`BackupError` (a copy differs
from its source), ``OSError`` from the filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.checkpoint_layout import (
    KEY_OPTIMIZER,
    KEY_OPTIMIZER_REMOVED,
    KEY_TIME,
    TMP_PREFIX,
    TRAINER_STATE_JSON,
    TRAINER_STATE_PT,
    checkpoint_name,
    list_checkpoints,
)
from core.config import RealmConfig
from core.fsutil import ExclusiveLock, atomic_write, fsync_tree, sha256_file, write_json_atomic
from core.ledger import Ledger
from core.realm import PRUNE_LOCK, Realm
from core.vault import TAG_PINNED, VaultError, delete_checkpoint, list_checkpoints_info
from management.retention import CheckpointFacts, RetentionPlan, RetentionPolicy, plan_retention

OPTIMIZER_REMOVED_KEY = KEY_OPTIMIZER_REMOVED  # trainer_state.json: {"time", "bytes_freed"} once stripped
SUMS_FILE = "SHA256SUMS"
METADATA_FILE = "metadata.json"


class VaultOpsError(ValueError):
    """A vault operation that cannot be done; the message says why and what to do."""


class BackupError(RuntimeError):
    """A copy does not match its source (SHA-256); nothing was left under the final name."""


# hashing and verified copies (sha256_file: core.fsutil) ------------------------------------------------
def tree_hashes(folder: Path, exclude: frozenset[str] = frozenset({SUMS_FILE})) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every regular file under ``folder`` (symlinks skipped)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not p.is_symlink() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


_copy_file = shutil.copy2  # module attribute: the fault-injection test replaces it with a corrupting copy


def copy_verified(src: Path, dest: Path, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Copy the files of ``src`` into a temporary sibling of ``dest``, check every copy's SHA-256 against
    the source, write ``SHA256SUMS``, fsync, and rename it to ``dest`` (which must not exist).

    Returns the hashes. Raises :class:`BackupError` on a mismatch (the temporary copy is removed) and
    ``FileExistsError`` when ``dest`` exists.
    """
    if dest.exists():
        raise FileExistsError(f"{dest} exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        expected = {k: v for k, v in tree_hashes(src).items() if k not in skip}
        for rel in expected:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _copy_file(src / rel, tmp / rel)
        got = tree_hashes(tmp)
        bad = sorted(k for k in expected if got.get(k) != expected[k])
        if bad:
            raise BackupError(f"copy of {src} differs from its source in {', '.join(bad)}")
        (tmp / SUMS_FILE).write_text("".join(f"{h}  {rel}\n" for rel, h in expected.items()), encoding="utf-8")
        fsync_tree(tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return expected


def verify_copy(folder: Path) -> list[str]:
    """Check a backup or version against its ``SHA256SUMS``. Returns the problems ([] when intact):
    a missing, changed or unlisted file, or a missing/unreadable ``SHA256SUMS``."""
    sums = folder / SUMS_FILE
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        return [f"{sums}: cannot read: {exc}"]
    expected = {}
    for line in lines:
        digest, _, rel = line.partition("  ")
        expected[rel] = digest
    got = tree_hashes(folder, exclude=frozenset({SUMS_FILE, METADATA_FILE}))
    problems = [f"{rel}: missing" for rel in expected if rel not in got]
    problems += [f"{rel}: SHA-256 differs (corrupted)" for rel in expected if rel in got and got[rel] != expected[rel]]
    problems += [f"{rel}: not listed in {SUMS_FILE}" for rel in got if rel not in expected]
    return problems


# facts and pruning --------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_facts(realm: Realm, hero_name: str, ledger: Ledger) -> list[CheckpointFacts]:
    """:class:`CheckpointFacts` of every checkpoint of ``hero_name`` (oldest first), from the vault listing
    and each ``trainer_state.json`` (no torch)."""
    out = []
    root = realm.checkpoints_dir(hero_name)
    for info in reversed(list_checkpoints_info(realm, hero_name, ledger)):
        path = root / info["name"]
        state = read_json(path / TRAINER_STATE_JSON)
        has_optimizer = OPTIMIZER_REMOVED_KEY not in state
        try:
            pt_bytes = (path / TRAINER_STATE_PT).stat().st_size
        except OSError:
            pt_bytes, has_optimizer = 0, False
        out.append(CheckpointFacts(
            name=info["name"], step=info["step"], time=info["time"], loss=info["loss"],
            eval_loss=info["eval_loss"], pinned=TAG_PINNED in info["tags"], has_optimizer=has_optimizer,
            size_bytes=info["size_bytes"], optimizer_bytes=pt_bytes if has_optimizer else 0))
    return out


def strip_optimizer_state(path: Path) -> int:
    """Drop the optimizer moments of the checkpoint at ``path``, keeping it loadable (see the module doc).

    Returns the bytes freed (0 when already stripped). Imports torch. Raises ``OSError`` or the loader's
    error for an unreadable ``trainer_state.pt``.
    """
    import torch

    state_json = path / TRAINER_STATE_JSON
    pt = path / TRAINER_STATE_PT
    before = pt.stat().st_size
    blob = torch.load(pt, map_location="cpu", weights_only=True)
    optimizer = blob.get(KEY_OPTIMIZER) or {}
    if optimizer.get("state"):
        blob[KEY_OPTIMIZER] = {"state": {}, "param_groups": optimizer.get("param_groups", [])}
        with atomic_write(pt, "wb") as f:
            torch.save(blob, f)
    freed = max(0, before - pt.stat().st_size)
    state = read_json(state_json)
    if state:
        state[OPTIMIZER_REMOVED_KEY] = {KEY_TIME: time.time(), "bytes_freed": freed}
        write_json_atomic(state_json, state)
    return freed


@dataclass
class PruneResult:
    """What :func:`prune` did (or would do, with ``dry_run``). ``removed``/``stripped``: checkpoint names;
    ``refused``: ``{name: why}`` for removals the vault refused at the last moment (a new pin, a new
    latest); ``bytes_freed``: measured (estimated for a dry run)."""

    plan: RetentionPlan
    dry_run: bool
    removed: list[str] = field(default_factory=list)
    stripped: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    bytes_freed: int = 0
    skipped: str | None = None  # why nothing was done (another prune holds the lock)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "dry_run": self.dry_run, "removed": self.removed,
                "stripped": self.stripped, "refused": self.refused, "bytes_freed": self.bytes_freed,
                "skipped": self.skipped}


@contextmanager
def _prune_lock(realm: Realm) -> Iterator[bool]:
    """Non-blocking exclusive lock ``run/prune.lock``: yields False when another prune holds it."""
    lock = ExclusiveLock(realm.lock_file(PRUNE_LOCK))
    try:
        yield lock.acquire()
    finally:
        lock.release()


def prune(realm: Realm, config: RealmConfig, ledger: Ledger, *, dry_run: bool = False,
          now: float | None = None) -> PruneResult:
    """Plan retention for the configured hero and apply it (unless ``dry_run``): remove, then strip.

    Applies the plan even when ``retention.enabled`` is false (this is the explicit command; automatic
    callers check ``enabled``). Logs ``vault_pruned`` when something changed.
    """
    hero = config.hero.name
    now = time.time() if now is None else now
    policy = RetentionPolicy.from_config(config.retention)
    with _prune_lock(realm) as locked:
        plan = plan_retention(checkpoint_facts(realm, hero, ledger), policy, now)
        result = PruneResult(plan=plan, dry_run=dry_run)
        if not locked:
            result.skipped = "another prune is running"
            return result
        if dry_run:
            result.bytes_freed = plan.bytes_freed
            return result
        root = realm.checkpoints_dir(hero)
        for d in plan.remove:
            try:
                done = delete_checkpoint(realm, hero, ledger, d.name, confirm=d.name)
            except VaultError as exc:
                result.refused[d.name] = str(exc)
                continue
            result.removed.append(d.name)
            result.bytes_freed += done["size_bytes"]
        for d in plan.strip_optimizer:
            try:
                freed = strip_optimizer_state(root / d.name)
            except FileNotFoundError:
                continue  # removed meanwhile
            result.stripped.append(d.name)
            result.bytes_freed += freed
        if result.removed or result.stripped:
            ledger.event("vault_pruned", f"vault pruned: {len(result.removed)} checkpoint(s) removed, "
                         f"{len(result.stripped)} stripped of optimizer state, {result.bytes_freed} bytes freed",
                         removed=result.removed, stripped=result.stripped, bytes_freed=result.bytes_freed,
                         reasons={d.name: d.reasons[0] for d in plan.remove})
    return result


def prune_after_save(realm: Realm, config: RealmConfig, ledger: Ledger) -> PruneResult | None:
    """The after-save hook: :func:`prune` when ``retention.enabled``, else None. Never raises for a
    pruning problem (the save itself succeeded): it logs a ``vault_prune_failed`` warning instead."""
    if not config.retention.enabled:
        return None
    try:
        return prune(realm, config, ledger)
    except Exception as exc:  # noqa: BLE001 - a failed prune must not stop training
        ledger.event("vault_prune_failed", f"pruning after a save failed: {type(exc).__name__}: {exc}",
                     level="warning")
        return None


# backups -----------------------------------------------------------------------------------------------
def checkpoint_path(realm: Realm, hero: str, step: int) -> Path:
    name = checkpoint_name(step)
    path = realm.checkpoints_dir(hero) / name
    if not path.is_dir():
        raise VaultOpsError(f"no checkpoint {name} in the vault of {hero} (see `python -m training vault list`)")
    return path


def backup_root(realm: Realm, config: RealmConfig, override: str | None = None) -> Path:
    """``<backup.folder>/<hero>`` (``backup.folder`` relative to the realm or absolute)."""
    folder = Path(override or config.backup.folder).expanduser()
    return (folder if folder.is_absolute() else realm.root / folder) / config.hero.name


def backup(realm: Realm, config: RealmConfig, ledger: Ledger, step: int, folder: str | None = None) -> dict:
    """Copy checkpoint ``step`` to ``<backup folder>/<hero>/<checkpoint name>/`` and verify every file's
    SHA-256 against the source. An existing, intact backup of the same step is kept as is; a damaged
    one is replaced.

    Returns ``{"path", "files", "bytes", "already"}``. Raises :class:`VaultOpsError` (no such checkpoint),
    :class:`BackupError` (the copy differs from the source), ``OSError`` (e.g. disk full).
    """
    src = checkpoint_path(realm, config.hero.name, step)
    dest = backup_root(realm, config, folder) / src.name
    if dest.exists():
        if not verify_copy(dest) and tree_hashes(dest, frozenset({SUMS_FILE})) == tree_hashes(src):
            return {"path": str(dest), "files": len(tree_hashes(src)), "bytes": _bytes(dest), "already": True}
        damaged = dest.with_name(f".damaged-{dest.name}-{os.getpid()}")
        os.rename(dest, damaged)
        shutil.rmtree(damaged, ignore_errors=True)
    hashes = copy_verified(src, dest)
    result = {"path": str(dest), "files": len(hashes), "bytes": _bytes(dest), "already": False}
    ledger.event("checkpoint_backed_up", f"checkpoint {src.name} backed up to {dest} ({len(hashes)} files, "
                 "SHA-256 verified)", checkpoint=src.name, path=str(dest))
    return result


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_backups(realm: Realm, config: RealmConfig) -> list[dict[str, Any]]:
    """``{"name", "path", "bytes"}`` of each backup of the hero, newest step first."""
    found = list_checkpoints(backup_root(realm, config))  # backups are named as checkpoints are
    return [{"name": p.name, "path": str(p), "bytes": _bytes(p)} for p in reversed(found)]
