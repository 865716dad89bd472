"""The checkpoint layout: the one place that knows how checkpoint folders and their files are named.

Torch-free on purpose: the Tavern, ``status`` and the vault tools read checkpoints without paying for torch;
:mod:`core.checkpoint` (the engine's writer and loader, which imports torch) builds on this module.

A hero's checkpoints live in ``<realm>/models/<hero>/checkpoints/`` (:meth:`core.realm.Realm.checkpoints_dir`)::

    step-00001234/                 one checkpoint: "step-" and the global step, zero-padded to 8 digits
        config.json, model.safetensors, generation_config.json   Hugging Face format (save_pretrained)
        -- or, for an adapter (training.adapter lora/qlora), instead of those three:
        adapter_config.json, adapter_model.safetensors            PEFT format (the adapter weights only)
        tokenizer.json, tokenizer_config.json, ...                the tokenizer (chat template included)
        trainer_state.pt           optimizer, LR scheduler, RNG states (torch; keys KEY_OPTIMIZER...)
        trainer_state.json         global_step, cursor, metrics, hero, config (keys KEY_GLOBAL_STEP...)
    .tmp-step-00001234-<pid>/      a save in progress (renamed to its final name when complete)
    .old-step-00001234/            the checkpoint a re-save of the same step is replacing
    .trash-step-00001234-<hex>/    a checkpoint being deleted (renamed first, then removed)
    step-00001234.corrupt/         a checkpoint that failed to load, kept for inspection

Only a real folder (not a symlink) whose whole name is ``step-`` followed by exactly 8 ASCII digits is a
checkpoint; everything else in the folder is ignored by every reader. Backups
(``<backup.folder>/<hero>/step-00001234/``) use the same names.
"""

from __future__ import annotations

import json
import operator
import os
import re
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "step-"
STEP_DIGITS = 8
MAX_GLOBAL_STEP = 10 ** STEP_DIGITS - 1  # the largest step a checkpoint name can hold
#: A checkpoint folder's whole name; group 1 is the global step. ASCII digits only (``\d`` would also take
#: other scripts' digits, which ``int()`` then parses: "step-١٢٣٤٥٦٧٨" is not a checkpoint).
CHECKPOINT_NAME_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}([0-9]{{{STEP_DIGITS}}})$")
#: What a user may type for a checkpoint: the name, or the bare global step (1 to 8 ASCII digits).
_STEP_ARGUMENT_RE = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}([0-9]{{{STEP_DIGITS}}})|([0-9]{{1,{STEP_DIGITS}}})")

#: A named version's folder name (``models/<hero>/versions/<name>``, :meth:`core.realm.Realm.versions_dir`,
#: written by ``management.versions``).
VERSION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# sibling folders that are not checkpoints (see the module docstring)
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
TRASH_PREFIX = ".trash-"
CORRUPT_SUFFIX = ".corrupt"

# files of a checkpoint
FORMAT_VERSION = 1
TRAINER_STATE_PT = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's save_pretrained: an adapter checkpoint has these two
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # instead of config.json + model.safetensors

# trainer_state.json keys
KEY_FORMAT_VERSION = "format_version"
KEY_GLOBAL_STEP = "global_step"
KEY_CURSOR = "cursor"
KEY_TIME = "time"  # unix seconds of the save
KEY_LOSS = "loss"
KEY_EVAL_LOSS = "eval_loss"
KEY_REASON = "reason"
KEY_HERO = "hero"
KEY_CONFIG = "config"
KEY_OPTIMIZER_REMOVED = "optimizer_state_removed"  # {"time", "bytes_freed"} once the optimizer was stripped
KEY_RESTORED_FROM = "restored_from"  # {"version", "global_step"} on a checkpoint made by a version restore
KEY_WORLD_SIZE = "world_size"  # processes of the run that saved it (information only: any number resumes it)
KEY_ADAPTER = "adapter"  # adapter checkpoints: {"type", "base": {identity + weights hash}, "trainable_parameters", ...}
# keys of KEY_ADAPTER
KEY_ADAPTER_TYPE = "type"  # "lora" | "qlora"
KEY_ADAPTER_BASE = "base"  # {"base_model", "path", "architecture", "parameters", "weights_sha256"}
KEY_TRAINABLE_PARAMETERS = "trainable_parameters"
# cursor keys
KEY_QUEST_ID = "quest_id"
KEY_EXAMPLES_DONE = "examples_done"
KEY_QUEST_DONE = "quest_done"
KEY_HOLDOUT_EVERY = "eval_holdout_every"  # the quest's held-out spacing: its train example indices depend on it
KEY_EPOCHS = "epochs"  # the quest's epochs (schools.<glob>.epochs): the cursor runs to epochs x train examples
KEY_SHUFFLE = "shuffle"  # whether its epochs are shuffled (core.epochs.permutation): the order depends on it
# trainer_state.pt keys
KEY_OPTIMIZER = "optimizer"
KEY_SCHEDULER = "scheduler"
KEY_RNG = "rng"
KEY_RNG_PYTHON = "python"
KEY_RNG_TORCH = "torch"
KEY_RNG_CUDA = "cuda"


class CheckpointError(RuntimeError):
    """Raised when a checkpoint is missing files or a file cannot be read (e.g. truncated)."""


def checkpoint_name(global_step: int) -> str:
    """``1234`` -> ``"step-00001234"``. Raises ``ValueError`` for a step outside 0..99,999,999 (its name
    would not be read back as a checkpoint), ``TypeError`` for a non-integer."""
    global_step = operator.index(global_step)
    if not 0 <= global_step <= MAX_GLOBAL_STEP:
        raise ValueError(f"global step {global_step} has no checkpoint name (0 to {MAX_GLOBAL_STEP})")
    return f"{CHECKPOINT_PREFIX}{global_step:0{STEP_DIGITS}d}"


#: A name to show in help texts and error messages.
EXAMPLE_NAME = checkpoint_name(1234)


def match_step(name: object) -> int | None:
    """The global step of a checkpoint folder name (``"step-00001234"`` -> 1234), or None for anything else
    (another name, a path, a non-string)."""
    m = CHECKPOINT_NAME_RE.fullmatch(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None


def is_checkpoint_name(name: object) -> bool:
    """True when ``name`` is exactly a checkpoint folder name."""
    return match_step(name) is not None


def step_of(path: Path | str) -> int:
    """The global step in a checkpoint folder's name (the last path component). Raises ``ValueError`` for
    another name."""
    step = match_step(Path(path).name)
    if step is None:
        raise ValueError(f"{path} is not a checkpoint folder ({CHECKPOINT_PREFIX}{'X' * STEP_DIGITS})")
    return step


def parse_step_argument(text: str) -> int:
    """What a user typed for a checkpoint: ``"1234"`` or ``"step-00001234"`` -> 1234 (surrounding blanks
    ignored; exact otherwise: never a prefix or a pattern). Raises ``ValueError`` for anything else."""
    m = _STEP_ARGUMENT_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a global step (1234) or checkpoint name ({EXAMPLE_NAME})")
    return int(m.group(1) or m.group(2))


def list_checkpoints(checkpoints_dir: Path | str) -> list[Path]:
    """Checkpoint folders under ``checkpoints_dir``, oldest (lowest global step) first; [] when the folder is
    absent. Only real folders named exactly like :func:`checkpoint_name` count (symlinks, temporary,
    trashed and quarantined folders do not). Raises ``OSError`` when the folder cannot be read."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    found = []
    with os.scandir(d) as it:
        for entry in it:
            step = match_step(entry.name)
            try:
                if step is not None and entry.is_dir(follow_symlinks=False):
                    found.append((step, Path(entry.path)))
            except OSError:
                continue  # removed while we listed
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path | str) -> Path | None:
    """The checkpoint with the highest global step (:func:`list_checkpoints`), or None."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def is_adapter_checkpoint(path: Path | str) -> bool:
    """True when the folder holds a PEFT adapter (:data:`ADAPTER_CONFIG_FILE`) rather than a whole model."""
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def read_checkpoint_info(path: Path | str) -> dict[str, Any]:
    """``trainer_state.json`` of the checkpoint at ``path`` as a dict (cheap: no tensors).

    Raises :class:`CheckpointError` when the file is missing, unreadable, not JSON, not an object or has no
    ``global_step``.
    """
    f = Path(path) / TRAINER_STATE_JSON
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{f}: cannot read: {exc}") from exc
    if not isinstance(state, dict) or KEY_GLOBAL_STEP not in state:
        raise CheckpointError(f"{f}: no {KEY_GLOBAL_STEP}")
    return state
