"""Checkpoints of the continuous trainer: everything needed to resume exactly.

The folder and file names, the ``trainer_state.json``/``.pt`` keys and the torch-free readers
(:func:`list_checkpoints`, :func:`latest_checkpoint`, :func:`read_checkpoint_info`, :func:`step_of`,
:func:`checkpoint_name`) live in :mod:`core.checkpoint_layout` and are re-exported here; this module adds
what needs torch: saving, verifying and loading.

A checkpoint is written into a ``.tmp-<name>-<pid>`` folder beside its final place and renamed, so a
folder under a checkpoint name is always complete. Re-saving an existing step (e.g. a quest that ends
exactly on a ``save_steps`` boundary) renames the old one to ``.old-<name>`` first; :func:`clean_incomplete`
repairs what a crash between those renames leaves. A checkpoint that fails to load is renamed to
``<name>.corrupt`` by :func:`quarantine` (kept for inspection, ignored from then on).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from core.checkpoint_layout import (
    ADAPTER_CONFIG_FILE,
    CORRUPT_SUFFIX,
    FORMAT_VERSION,
    KEY_ADAPTER,
    KEY_CONFIG,
    KEY_CURSOR,
    KEY_EPOCHS,
    KEY_EVAL_LOSS,
    KEY_EXAMPLES_DONE,
    KEY_FORMAT_VERSION,
    KEY_GLOBAL_STEP,
    KEY_HERO,
    KEY_HOLDOUT_EVERY,
    KEY_LOSS,
    KEY_OPTIMIZER,
    KEY_QUEST_DONE,
    KEY_QUEST_ID,
    KEY_REASON,
    KEY_RNG,
    KEY_RNG_CUDA,
    KEY_RNG_PYTHON,
    KEY_RNG_TORCH,
    KEY_SCHEDULER,
    KEY_SHUFFLE,
    KEY_TIME,
    KEY_WORLD_SIZE,
    MODEL_CONFIG_FILE,
    OLD_PREFIX,
    TMP_PREFIX,
    TRAINER_STATE_JSON,
    TRAINER_STATE_PT,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint_info,
    step_of,
)
from core.fsutil import fsync_tree

__all__ = [  # the layout names the engine and tools use through this module
    "FORMAT_VERSION", "KEY_ADAPTER", "KEY_CONFIG", "KEY_CURSOR", "KEY_EPOCHS", "KEY_EVAL_LOSS", "KEY_EXAMPLES_DONE",
    "KEY_FORMAT_VERSION",
    "KEY_GLOBAL_STEP", "KEY_HERO", "KEY_HOLDOUT_EVERY", "KEY_LOSS", "KEY_OPTIMIZER", "KEY_QUEST_DONE",
    "KEY_QUEST_ID", "KEY_REASON", "KEY_RNG", "KEY_RNG_CUDA", "KEY_RNG_PYTHON", "KEY_RNG_TORCH", "KEY_SCHEDULER", "KEY_SHUFFLE", "KEY_WORLD_SIZE",
    "KEY_TIME", "TRAINER_STATE_JSON", "TRAINER_STATE_PT", "WEIGHTS_FILE", "CheckpointError", "checkpoint_name",
    "clean_incomplete", "latest_checkpoint", "list_checkpoints", "load_trainer_state", "prune_checkpoints",
    "quarantine", "read_checkpoint_info", "rng_state", "save_checkpoint", "set_rng_state", "step_of",
    "verify_checkpoint", "verify_weights",
]


def rng_state() -> dict[str, Any]:
    """Python, torch CPU and (when present) CUDA RNG states."""
    state: dict[str, Any] = {KEY_RNG_PYTHON: random.getstate(), KEY_RNG_TORCH: torch.get_rng_state()}
    if torch.cuda.is_available():
        state[KEY_RNG_CUDA] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state[KEY_RNG_PYTHON])
    torch.set_rng_state(state[KEY_RNG_TORCH])
    if KEY_RNG_CUDA in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state[KEY_RNG_CUDA])


def save_checkpoint(checkpoints_dir: Path | str, *, global_step: int, model, tokenizer, optimizer, scheduler,
                    info: dict[str, Any]) -> Path:
    """Write the checkpoint of ``global_step`` (:func:`checkpoint_name`) atomically and return its path.

    ``model``: a transformers model (unwrapped), or a PEFT model, whose ``save_pretrained`` writes the
    adapter only (``adapter_config.json`` + ``adapter_model.safetensors``); ``info``: the JSON part (cursor,
    loss, eval_loss, reason, hero, config; ``adapter`` for an adapter), to which ``global_step``, ``time``
    and ``format_version`` are added.
    Files are fsynced before the rename. Raises ``OSError`` (e.g. disk full) with nothing left behind.
    """
    d = Path(checkpoints_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(global_step)
    tmp = d / f"{TMP_PREFIX}{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({KEY_OPTIMIZER: optimizer.state_dict(), KEY_SCHEDULER: scheduler.state_dict(),
                    KEY_RNG: rng_state()}, tmp / TRAINER_STATE_PT)
        state = {KEY_FORMAT_VERSION: FORMAT_VERSION, KEY_GLOBAL_STEP: global_step, KEY_TIME: time.time(), **info}
        (tmp / TRAINER_STATE_JSON).write_text(json.dumps(state, indent=2, default=str) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        final = d / name
        old = d / f"{OLD_PREFIX}{name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def clean_incomplete(checkpoints_dir: Path | str) -> list[str]:
    """Remove ``.tmp-*`` folders of interrupted saves; restore an ``.old-*`` checkpoint whose replacement never
    landed (else delete it). Returns notes on what was done."""
    d = Path(checkpoints_dir)
    notes: list[str] = []
    if not d.is_dir():
        return notes
    for p in sorted(d.iterdir()):
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed the interrupted save {p.name}")
        elif p.name.startswith(OLD_PREFIX):
            final = d / p.name[len(OLD_PREFIX):]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, final)
                notes.append(f"restored {final.name} (its replacement was interrupted)")
    return notes


def quarantine(path: Path | str) -> Path:
    """Rename a broken checkpoint to ``<name>.corrupt`` (a unique suffix if taken); returns the path."""
    p = Path(path)
    dest = p.with_name(p.name + CORRUPT_SUFFIX)
    n = 1
    while dest.exists():
        n += 1
        dest = p.with_name(f"{p.name}{CORRUPT_SUFFIX}{n}")
    os.rename(p, dest)
    return dest


def verify_weights(path: Path | str) -> None:
    """Check every ``*.safetensors`` file: header readable and file as long as the header declares.

    Raises :class:`CheckpointError` for a missing, truncated or garbled file.
    """
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    for f in files:
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise CheckpointError(f"{f}: truncated header")
                header = json.loads(fh.read(header_len))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{f}: unreadable: {exc}") from exc
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise CheckpointError(f"{f}: {size} bytes, header declares {8 + header_len + end} (truncated?)")


def verify_checkpoint(path: Path | str) -> None:
    """Every ``*.json`` file parses (model or adapter config, tokenizer, trainer state) and the weights are
    whole (:func:`verify_weights`); an adapter checkpoint's trainer state names its adapter and base.
    Raises :class:`CheckpointError`."""
    folder = Path(path)
    adapter = (folder / ADAPTER_CONFIG_FILE).is_file()
    if not adapter and not (folder / MODEL_CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder}: no {MODEL_CONFIG_FILE} (nor {ADAPTER_CONFIG_FILE})")
    if adapter and not isinstance(read_checkpoint_info(folder).get(KEY_ADAPTER), dict):
        raise CheckpointError(f"{folder}: an adapter without its base's identity ({KEY_ADAPTER} in "
                              f"{TRAINER_STATE_JSON})")
    for f in sorted(folder.glob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{f}: unreadable: {exc}") from exc
    verify_weights(folder)


def load_trainer_state(path: Path | str) -> dict[str, Any]:
    """Verify a checkpoint (:func:`verify_checkpoint`) and load its trainer state.

    Returns ``trainer_state.json``'s dict plus ``optimizer``, ``scheduler`` and ``rng`` from
    ``trainer_state.pt`` (loaded with ``weights_only=True``, on CPU). Raises :class:`CheckpointError`
    when a file is missing, truncated or unreadable.
    """
    folder = Path(path)
    state = read_checkpoint_info(folder)
    verify_checkpoint(folder)
    try:
        blob = torch.load(folder / TRAINER_STATE_PT, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{folder / TRAINER_STATE_PT}: cannot load: {type(exc).__name__}: {exc}") from exc
    for key in (KEY_OPTIMIZER, KEY_SCHEDULER, KEY_RNG):
        if key not in blob:
            raise CheckpointError(f"{folder / TRAINER_STATE_PT}: no {key}")
    return {**state, **blob}


def prune_checkpoints(checkpoints_dir: Path | str, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` (>= 1) checkpoints; returns the deleted paths."""
    found = list_checkpoints(checkpoints_dir)
    doomed = found[:-keep_last] if keep_last >= 1 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
