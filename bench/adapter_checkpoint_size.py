"""Checkpoint size on disk: a LoRA adapter checkpoint against a full fine-tuning one, same hero.

    .venv/bin/python bench/adapter_checkpoint_size.py                   # stories260K, nano, small
    .venv/bin/python bench/adapter_checkpoint_size.py --models stories260K --r 8

For each model: a temporary realm, the real :class:`core.engine.Engine`, one optimizer step of 2 x 128
tokens, then :meth:`core.engine.Engine.save_checkpoint` (full: weights + AdamW state; LoRA: PEFT's adapter
files + its AdamW state + the base's identity), both with the tokenizer. Size = the bytes of every file in the
checkpoint folder; ``weights`` = ``model.safetensors`` or ``adapter_model.safetensors`` alone. Prints a
table and one JSON line; writes bench/out/adapter_checkpoint_size.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import STORIES260K, emit_json, machine, print_table  # noqa: E402

MODELS = ("stories260K", "nano", "small")


def checkpoint_of(model: str, adapter: str | None, r: int, workdir: Path) -> Path:
    from core.engine import Engine
    from core.ledger import Ledger
    from core.quest_queue import QuestQueue
    from core.realm import init_realm

    training = {"max_length": 128, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "adapter": adapter,
                "lora": {"r": r, "alpha": 2 * r}, "eval_steps": 0, "eval_holdout_every": 0, "warmup_steps": 0,
                "save_steps": 10 ** 6, "save_interval_minutes": 10 ** 6, "mixed_precision": "no"}
    hero = {"base_model": str(STORIES260K)} if model == "stories260K" else {"default_size": model}
    realm = init_realm(workdir / f"{model}-{adapter or 'full'}", overrides={"training": training, "hero": hero})
    ledger = Ledger(realm.ledger_path)
    path = realm.root / "q.jsonl"
    records = [(i + 1, {"text": f"{i} Once upon a time, a little fox ran over the hill to see the sea."})
               for i in range(8)]
    path.write_text("".join(json.dumps(e) + "\n" for _, e in records), encoding="utf-8")
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 1

    engine.train_quest(qid, records, should_stop=stop)
    saved = engine.save_checkpoint("bench")
    engine.cleanup()
    ledger.close()
    return saved


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of "
                   "stories260K,nano,micro,tiny,small")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2 r)")
    a = p.parse_args()
    from core.checkpoint_layout import ADAPTER_WEIGHTS_FILE, KEY_ADAPTER, read_checkpoint_info

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-size-") as tmp:
        for model in a.models.split(","):
            if model == "stories260K" and not STORIES260K.exists():
                sys.exit(f"{STORIES260K} is absent: --models without stories260K")
            full = checkpoint_of(model, None, a.r, Path(tmp))
            lora = checkpoint_of(model, "lora", a.r, Path(tmp))
            info = read_checkpoint_info(lora)
            row = {"model": model, "parameters": info[KEY_ADAPTER]["base"]["parameters"],
                   "trainable_parameters": info[KEY_ADAPTER]["trainable_parameters"], "r": a.r,
                   "full_bytes": folder_bytes(full), "full_weights_bytes": (full / "model.safetensors").stat().st_size,
                   "lora_bytes": folder_bytes(lora), "lora_weights_bytes": (lora / ADAPTER_WEIGHTS_FILE).stat().st_size}
            row["share"] = round(row["lora_bytes"] / row["full_bytes"], 4)
            rows.append(row)
            print(f"  {model}: full {row['full_bytes']:,} B, LoRA r{a.r} {row['lora_bytes']:,} B "
                  f"({row['share']:.1%})", flush=True)
    print_table(rows, [("model", "model", ""), ("parameters", "params", ","), ("trainable_parameters", "trainable", ","),
                       ("full_bytes", "full checkpoint B", ","), ("full_weights_bytes", "model.safetensors B", ","),
                       ("lora_bytes", "LoRA checkpoint B", ","), ("lora_weights_bytes", "adapter_model.safetensors B",
                                                                   ","),
                       ("share", "LoRA / full", ".2%")])
    emit_json({"bench": "adapter_checkpoint_size", "machine": machine(), "results": rows}, "adapter_checkpoint_size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
