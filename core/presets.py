"""Training presets by the memory of the machine: ``python -m training init DIR --preset 24gb``.

A preset sets five ``training`` keys: ``adapter``, ``micro_batch_size``, ``gradient_accumulation_steps``,
``gradient_checkpointing`` and ``mixed_precision``; the rest of the config is untouched. Every GPU preset
takes 16 rows of ``max_length`` tokens per optimizer step, so switching presets changes memory and speed,
not what an optimizer step means. Whether a given model fits is the estimate's job
(:mod:`core.memory`): ``init`` prints it and warns when it exceeds the preset's memory.

The table is :func:`preset_table_markdown` (in the README too, kept in sync by a test).
``bf16`` falls back to fp32 without a CUDA GPU, as ``mixed_precision`` does; QLoRA needs bitsandbytes and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024 ** 3


@dataclass(frozen=True)
class Preset:
    name: str
    memory_gib: float | None  # None: a CPU (system RAM decides)
    description: str
    training: dict[str, Any]


def _gpu(adapter, micro: int, accumulation: int) -> dict[str, Any]:
    return {"adapter": adapter, "micro_batch_size": micro, "gradient_accumulation_steps": accumulation,
            "gradient_checkpointing": True, "mixed_precision": "bf16"}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cpu", None, "no GPU: full fine-tuning of small heroes in fp32",
           {"adapter": None, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
            "gradient_checkpointing": False, "mixed_precision": "no"}),
    Preset("8gb", 8, "8 GB GPU: QLoRA (4-bit NF4 base), one row per pass", _gpu("qlora", 1, 16)),
    Preset("16gb", 16, "16 GB GPU: LoRA on a bf16 base", _gpu("lora", 2, 8)),
    Preset("24gb", 24, "24 GB GPU: LoRA on a bf16 base", _gpu("lora", 4, 4)),
    Preset("80gb", 80, "80 GB GPU: full fine-tuning in bf16 mixed precision", _gpu(None, 8, 2)),
)}


def preset_overrides(name: str) -> dict[str, dict[str, Any]]:
    """The config sections a preset sets (``{"training": {...}}``). Raises ``KeyError`` naming the presets."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {"training": dict(PRESETS[name].training)}


def preset_table_markdown() -> str:
    """The presets as a Markdown table (for the README)."""
    rows = ["| preset | for | adapter | micro-batch x accumulation | gradient checkpointing | precision |",
            "|---|---|---|---|---|---|"]
    for p in PRESETS.values():
        t = p.training
        rows.append(f"| `{p.name}` | {p.description} | {t['adapter'] or 'none (full)'} | "
                    f"{t['micro_batch_size']} x {t['gradient_accumulation_steps']} | "
                    f"{'on' if t['gradient_checkpointing'] else 'off'} | "
                    f"{'fp32' if t['mixed_precision'] == 'no' else t['mixed_precision']} |")
    return "\n".join(rows)
