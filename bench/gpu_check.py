"""GPU readiness in one command (a few minutes) on a machine with one NVIDIA GPU and a CUDA build of torch:

    .venv/bin/python bench/gpu_check.py            # or --steps 8 --max-length 2048

A Qwen3-0.6B-shaped model (its published configuration, random init, vocabulary 151,936; nothing is
downloaded) is trained by our engine and by TRL's ``SFTTrainer`` with the same settings in the same run:

- full fine-tuning in bf16 mixed precision, and LoRA (r 16 on every decoder-block linear layer, PEFT) with
  our engine and with TRL + PEFT; QLoRA (4-bit NF4 base, bitsandbytes) with our engine when bitsandbytes is
  installed (``pip install bitsandbytes``);
- tokens/s (real tokens over whole optimizer steps after one warm-up step) and MFU against the GPU's dense
  bf16 peak (the datasheet figure for known GPUs, else the measured ``torch.mm`` peak; both are printed),
  with nanoGPT's FLOPs per token ``6 N + 12 L H Q T`` (LoRA: ``4 N + 6 N_adapter + 12 L H Q T``: no weight
  gradients for the frozen base);
- our engine's peak CUDA memory (``max_memory_allocated``) against :mod:`core.memory`'s estimate;
- the out-of-memory path on a real CUDA OOM: a micro-batch sized so the estimate is about twice the free
  memory; the engine's start-of-quest probe must halve it until it fits (``out_of_memory`` events) and
  the quest must train with the same rows per optimizer step;
- the NVML readings the Tavern's System page shows (utilization, memory, temperature, power).

The data is synthetic prompt/completion text (a GPU machine may not have ../shared). On a machine without
a CUDA GPU it exits at once with status 2 and says why. Prints a table and one JSON line; writes
bench/out/gpu_check.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import OUT, emit_json, machine, matmul_peak_gflops, median, print_table  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 1234
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}
# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets, by name substring
DATASHEET_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                         ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
                         ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("A6000", 155.0), ("V100", 125.0),
                         ("T4", 65.0)]


def datasheet_peak(name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def synthetic_examples(n: int, seed: int = SEED) -> list[dict]:
    """Deterministic prompt/completion pairs of varied length (a few hundred to ~1,500 bytes)."""
    rng = random.Random(seed)
    words = ("the hero trains on quests in the realm while the tavern keeps the ledger of every step and the "
             "oracle answers questions about numbers stories and the sea under a quiet sky").split()
    out = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(10, 60))) + "?\n"
        completion = " ".join(rng.choice(words) for _ in range(rng.randint(40, 250))) + "."
        out.append({"prompt": prompt, "completion": completion})
    return out


def run_engine_cuda(model_dir: Path, examples: list[dict], workdir: Path, *, max_length: int, rows: int,
                    steps: int, adapter: str | None = None, accumulation: int = 1) -> dict:
    """Our engine on a temporary realm, fed as the daemon feeds it: tokens/s, losses, peak memory, the
    estimate, and the engine's events."""
    import json

    from core.engine import Engine
    from core.formats import iter_valid_records
    from core.ledger import Ledger
    from core.memory import estimate_for_realm
    from core.quest_queue import QuestQueue
    from core.realm import init_realm

    root = Path(tempfile.mkdtemp(prefix="engine-", dir=workdir))
    training = {"max_length": max_length, "micro_batch_size": rows, "gradient_accumulation_steps": accumulation,
                "learning_rate": 1e-4, "warmup_steps": 0, "lr_scheduler_type": "constant", "eval_steps": 0,
                "eval_holdout_every": 0, "save_steps": 10 ** 6, "save_interval_minutes": 10 ** 6, "seed": SEED,
                "mixed_precision": "bf16", "adapter": adapter, "lora": LORA}
    realm = init_realm(root, base_model=str(model_dir), overrides={"training": training})
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    src = root / "data.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    qid = QuestQueue(realm, ledger).admit(src, "normal")
    quest = ledger.get_quest(qid)
    path = QuestQueue(realm, ledger).path_of(quest)
    estimate = estimate_for_realm(realm, config, device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(realm, config, ledger)
    engine.setup()
    stamps: list[float] = []
    warmup = 1

    def should_stop() -> bool:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return len(stamps) > warmup + steps

    try:
        engine.train_quest(qid, iter_valid_records(path, quest["name"], config.validation), should_stop=should_stop)
        rows_done = ledger.steps()
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        info = dict(engine.hero_info)
        events = [e for e in ledger.events(limit=10 ** 6) if e["kind"] in ("out_of_memory", "memory_warning")]
        micro = engine.micro_batch_size
    finally:
        engine.cleanup()
        ledger.close()
        shutil.rmtree(root, ignore_errors=True)
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][warmup:warmup + steps]
    tokens = [s["tokens"] for s in rows_done][warmup:warmup + steps]
    return {"tokens_per_s": sum(tokens) / sum(times) if times else 0.0, "steps": len(times),
            "losses": [s["loss"] for s in rows_done], "peak_bytes": peak, "reserved_bytes": reserved,
            "estimate_bytes": estimate.total_bytes, "parameters": info["parameters"],
            "trainable_parameters": info["trainable_parameters"], "events": events, "micro_batch_size": micro,
            "tokens_per_step": median(tokens) if tokens else 0}


def oom_micro_batch(model_dir: Path, max_length: int) -> int:
    """A micro-batch whose estimate is about twice the free GPU memory (a real OOM, by construction)."""
    from core.config import TrainingConfig
    from core.memory import estimate, shape_from_folder

    shape = shape_from_folder(model_dir)
    free, _ = torch.cuda.mem_get_info()
    rows = 1
    while estimate(shape, TrainingConfig(max_length=max_length, micro_batch_size=rows, mixed_precision="bf16"),
                   device="cuda").total_bytes < 2 * free and rows < 4096:
        rows *= 2
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="measured optimizer steps per run (after 1 warm-up)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--rows", type=int, default=8, help="rows of max_length tokens per optimizer step")
    p.add_argument("--skip-trl", action="store_true", help="our engine only")
    p.add_argument("--skip-oom", action="store_true", help="skip the out-of-memory halving check")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print(f"bench/gpu_check.py needs an NVIDIA GPU and a CUDA build of torch; torch {torch.__version__} "
              "sees no CUDA device here, so there is nothing to check (the CPU benchmarks are "
              "bench/throughput.py and bench/memory_estimate.py).", file=sys.stderr)
        return 2
    from throughput import QWEN3_0_6B, flops_per_token, materialize, run_trl, trl_batch_size

    from tavern.pages.system import gpu_info

    started = time.time()
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory
    measured_peak = matmul_peak_gflops(n=8192, repeats=5, dtype=torch.bfloat16, device="cuda") * 1e9
    sheet = datasheet_peak(name)
    peak = sheet or measured_peak
    print(f"GPU {name}, {total / 2 ** 30:.1f} GiB; bf16 peak: datasheet "
          f"{'%.0f TFLOP/s' % (sheet / 1e12) if sheet else 'unknown'}, measured torch.mm {measured_peak / 1e12:.0f} "
          f"TFLOP/s; MFU below is against the {'datasheet' if sheet else 'measured'} peak", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    spec = dict(name="qwen3-0.6b", source=("config", QWEN3_0_6B), max_length=a.max_length, rows=a.rows,
                steps=a.steps)
    examples = synthetic_examples(max(400, a.rows * (a.steps + 3) * 4))
    rows: list[dict] = []
    try:
        model_dir = materialize(spec, workdir)
        bs, mean_len = trl_batch_size(examples, model_dir, spec)
        params, fpt_full = flops_per_token(model_dir, round(mean_len))
        attention = fpt_full - 6 * params
        has_bnb = _has_bitsandbytes()
        plan = [("full bf16", None), ("LoRA r16", "lora")] + ([("QLoRA r16", "qlora")] if has_bnb else [])
        for label, adapter in plan:
            r = _safe(lambda adapter=adapter: run_engine_cuda(model_dir, examples, workdir, max_length=a.max_length,
                                                               rows=a.rows, steps=a.steps, adapter=adapter))
            fpt = fpt_full if adapter is None else 4 * params + 6 * r.get("trainable_parameters", 0) + attention
            rows.append(_row(label, "engine", r, fpt, peak))
            if not a.skip_trl and adapter != "qlora":
                t = _safe(lambda adapter=adapter: _trl(run_trl, model_dir, examples, spec, bs, workdir, adapter))
                rows.append(_row(label, "trl", t, fpt, peak))
                if "tokens_per_s" in t and r.get("tokens_per_s"):
                    rows[-2]["engine_vs_trl"] = round(r["tokens_per_s"] / t["tokens_per_s"], 2)
            gc.collect()
            torch.cuda.empty_cache()
        if not has_bnb:
            rows.append({"run": "QLoRA r16", "system": "engine", "status": "skipped: pip install bitsandbytes"})
        oom = None
        if not a.skip_oom:
            want = oom_micro_batch(model_dir, a.max_length)
            r = _safe(lambda: run_engine_cuda(model_dir, synthetic_examples(want * 4, seed=7), workdir,
                                              max_length=a.max_length, rows=want, steps=1))
            halvings = [e for e in r.get("events", []) if e["kind"] == "out_of_memory"]
            oom = {"configured_micro_batch_size": want, "final_micro_batch_size": r.get("micro_batch_size"),
                   "out_of_memory_events": len(halvings), "steps_trained": r.get("steps"),
                   "ok": bool(halvings) and r.get("steps", 0) >= 1 and "error" not in r, "error": r.get("error")}
            rows.append({"run": f"OOM halving ({want} rows)", "system": "engine",
                         "status": "ok" if oom["ok"] else f"FAILED {r.get('error') or ''}"[:80],
                         "tokens_per_s": r.get("tokens_per_s"), "micro_batch": f"{want} -> {r.get('micro_batch_size')}"})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(rows, [("run", "run", ""), ("system", "system", ""), ("status", "status", ""),
                       ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"),
                       ("engine_vs_trl", "engine/TRL", ".2f"), ("peak_gib", "peak GiB", ".2f"),
                       ("estimate_gib", "estimate GiB", ".2f"), ("estimate_ratio", "estimate/peak", ".2f"),
                       ("micro_batch", "micro-batch", "")])
    nvml = gpu_info()
    print("\nNVML (the System page):")
    for g in nvml.get("gpus", []):
        print(f"  GPU {g['index']} {g['name']}: utilization {g['utilization_percent']}%, memory "
              f"{g['memory_used_bytes'] / 2 ** 30:.1f}/{g['memory_total_bytes'] / 2 ** 30:.1f} GiB, "
              f"{g['temperature_c']} C, {g['power_w']} W of {g['power_limit_w']} W")
    if not nvml.get("available"):
        print(f"  {nvml.get('reason')}")
    failed = [r for r in rows if str(r.get("status", "")).startswith("FAILED")]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} runs ok; {time.time() - started:.0f} s")
    emit_json({"bench": "gpu_check", "machine": machine(), "gpu": name, "peak_flops": peak,
               "measured_peak_flops": measured_peak, "datasheet_peak_flops": sheet, "max_length": a.max_length,
               "rows": a.rows, "results": rows, "oom": oom, "nvml": nvml}, "gpu_check")
    print(f"json: {OUT / 'gpu_check.json'}")
    return 1 if failed else 0


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _safe(fn) -> dict:
    """Run one measurement; a failure becomes a row (``error``), never the end of the check."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report and go on to the next row
        import traceback

        traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _trl(run_trl, model_dir, examples, spec, batch_size, workdir, adapter) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    r = run_trl(model_dir, examples, spec, 1, batch_size, workdir, True, lora=adapter == "lora")
    return {"tokens_per_s": r.tokens_per_second, "steps": len(r.times), "peak_bytes": torch.cuda.max_memory_allocated()}


def _row(label: str, system: str, r: dict, flops_per_token: float, peak: float) -> dict:
    if "error" in r:
        return {"run": label, "system": system, "status": f"FAILED {r['error']}"[:120]}
    row = {"run": label, "system": system, "status": "ok", "tokens_per_s": round(r["tokens_per_s"], 1),
           "mfu": round(r["tokens_per_s"] * flops_per_token / peak, 4), "peak_gib": r["peak_bytes"] / 2 ** 30}
    if "estimate_bytes" in r:
        row["estimate_gib"] = r["estimate_bytes"] / 2 ** 30
        row["estimate_ratio"] = round(r["estimate_bytes"] / r["peak_bytes"], 3) if r["peak_bytes"] else None
        row["micro_batch"] = str(r["micro_batch_size"])
    return row


if __name__ == "__main__":
    sys.exit(main())
