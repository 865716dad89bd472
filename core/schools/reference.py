"""The reference model of a quest, exact across kill and restart: log-probabilities precomputed at the
quest's start and stored beside the quest's file.

Why precomputed values and not a frozen copy of the model: the reference of a quest is the hero as it was
when the quest started. Keeping a second model in memory doubles the weights held (and, on a GPU, their
memory) for the whole quest, and after a restart the engine would have to find and reload exactly those
weights (the checkpoint before the quest may have been pruned by retention). The reference enters the
losses only through the log-probabilities of each record's responses, so they are computed once, in one
no-grad pass before the first step, and written next to the quest's stored file as
``<stored name>.reference.safetensors`` (atomically: temporary file, fsync, rename; moved with the quest by
:class:`core.quest_queue.QuestQueue`). A resume reads the same numbers, so the losses after a SIGKILL are
those of an uninterrupted run. Cost: one forward pass per record (no backward), and the quest's tokenized
records held in memory while it trains.

Layout: tensors ``train`` ``(n_train, k)`` and ``eval`` ``(n_eval, k)`` fp32 (k and meaning per school:
:meth:`core.schools.base.School.reference_values`); metadata ``quest_id``, ``school``, ``global_step`` (of
the reference weights), ``rows_per_step`` (records per optimizer step, pinned for the quest: KTO's KL
pairs and the step boundaries depend on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core import checkpoint as ckpt
from core.fsutil import atomic_write
from core.schools import REFERENCE_SUFFIX  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from core.engine import Engine
    from core.schools.base import School


class ReferenceError(RuntimeError):
    """The stored reference of a quest is missing (the quest started already) or does not match it."""


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a damaged reference
        raise ReferenceError(f"reference log-probs {path.name} cannot be read: {exc}") from None


def save_reference(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write the sidecar atomically. Raises ``OSError``."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={k: str(v) for k, v in metadata.items()})
    with atomic_write(path, "wb") as f:
        f.write(data)


def prepare(engine: Engine, school: School, quest_id: int, train: list[Any], evals: list[Any],
            path: Path | None, rows_per_step: int, examples_done: int) -> int:
    """Attach the reference values to ``train`` and ``evals`` (all the quest's items, in order): read from
    ``path`` when it exists, else computed now with the current weights (only at the quest's start,
    ``examples_done == 0``) and saved there. Returns the records per step pinned for the quest.

    Raises :class:`ReferenceError` when the quest started already and its reference is missing, or the
    stored one belongs to another quest or other records."""
    if path is not None and path.exists():
        tensors, meta = _load(path)
        pinned = int(meta.get("rows_per_step", rows_per_step))
        if meta.get("quest_id") != str(quest_id) or meta.get("school") != school.name:
            raise ReferenceError(f"{path.name} holds the reference of quest {meta.get('quest_id')} "
                                 f"({meta.get('school')}), not of quest {quest_id} ({school.name})")
        if tensors["train"].shape[0] != len(train) or tensors["eval"].shape[0] != len(evals):
            raise ReferenceError(f"{path.name} holds {tensors['train'].shape[0]} + {tensors['eval'].shape[0]} "
                                 f"records, the quest {len(train)} + {len(evals)}")
        if pinned != rows_per_step:
            engine._warn("rows_per_step_pinned", f"quest {quest_id} started with {pinned} records per step; "
                         f"keeping it (not {rows_per_step}) so its reference and steps stay valid", quest_id=quest_id)
        school.prepare_items(train, pinned)
        school.prepare_items(evals, pinned)
        school.attach_reference(train, tensors["train"])
        school.attach_reference(evals, tensors["eval"])
        return pinned
    if examples_done > 0:
        raise ReferenceError(f"quest {quest_id} trained {examples_done} records already but its reference "
                             f"log-probs{f' ({path.name})' if path else ''} are missing: it cannot resume exactly; "
                             "drop the file again as a new quest")
    school.prepare_items(train, rows_per_step)
    school.prepare_items(evals, rows_per_step)
    rng = ckpt.rng_state()
    engine.model.eval()
    try:
        values = {"train": school.reference_values(engine, train), "eval": school.reference_values(engine, evals)}
    finally:
        engine.model.train()
        ckpt.set_rng_state(rng)
    if path is not None:
        save_reference(path, values, {"quest_id": quest_id, "school": school.name, "global_step": engine.global_step,
                                      "rows_per_step": rows_per_step})
    school.attach_reference(train, values["train"])
    school.attach_reference(evals, values["eval"])
    return rows_per_step
