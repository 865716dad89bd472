"""The memory estimate (core/memory.py) against measured peak RSS on this CPU.

    .venv/bin/python bench/memory_estimate.py            # every size, full and LoRA (+ checkpointing rows)
    .venv/bin/python bench/memory_estimate.py --quick    # nano, micro, stories260K only

Each configuration runs in its own process: it imports everything training needs (torch, transformers,
accelerate, PEFT, the engine), reads its RSS (the baseline), then sets up the real :class:`core.engine.Engine`
on a temporary realm and trains 3 optimizer steps of full rows (``micro_batch_size x max_length`` tokens,
examples truncated to ``max_length``). Measured = peak RSS of the process (``ru_maxrss``) minus the baseline:
the model, gradients, AdamW state, activations and the loss, plus what the CPU allocator keeps (freed
blocks glibc has not returned, per-thread arenas), the tokenizer and the engine's own objects. The estimate
is :func:`core.memory.estimate_for_realm` for the same realm. Models: the embedded default heroes (nano,
micro, tiny, small; random init) and ../shared/models/stories260K.

Prints a table and one JSON line; writes bench/out/memory_estimate.json. ``--gpu-table`` instead prints
the estimates (no measurement) for the Qwen3 0.6B-8B shapes under each GPU preset, for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PYTHON, ROOT, STORIES260K, emit_json, machine, print_table  # noqa: E402

STEPS = 3
TOLERANCE = 0.25


QWEN3 = {  # the published Qwen3 configurations (shapes only; nothing is downloaded)
    "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def gpu_table(max_length: int) -> None:
    """Estimated peak GPU memory (GiB) of each Qwen3 size under each GPU preset at ``max_length``."""
    from core.config import TrainingConfig
    from core.memory import GIB, estimate, shape_from_config
    from core.presets import PRESETS

    names = [n for n, p in PRESETS.items() if p.memory_gib is not None]
    print("| model | " + " | ".join(f"`{n}`" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for model, cfg in QWEN3.items():
        shape = shape_from_config({**cfg, "vocab_size": 151936, "model_type": "qwen3"}, model)
        cells = []
        for n in names:
            est = estimate(shape, TrainingConfig(max_length=max_length, **PRESETS[n].training), device="cuda")
            gib = est.total_bytes / GIB
            cells.append(f"{gib:.1f}" + ("" if gib <= PRESETS[n].memory_gib else " (too big)"))
        print(f"| {model} ({shape.parameters / 1e9:.2f}B) | " + " | ".join(cells) + " |")


def configurations(quick: bool) -> list[dict]:
    models = [("nano", 8, 512), ("micro", 8, 512), ("stories260K", 8, 512)]
    if not quick:
        models += [("tiny", 8, 512), ("small", 4, 512)]
    out = []
    for model, rows, length in models:
        for adapter in (None, "lora"):
            out.append(dict(model=model, adapter=adapter, gradient_checkpointing=False, micro_batch_size=rows,
                            max_length=length))
    for model in (["micro"] if quick else ["micro", "small"]):
        rows = 4 if model == "small" else 8
        for adapter in (None, "lora"):
            out.append(dict(model=model, adapter=adapter, gradient_checkpointing=True, micro_batch_size=rows,
                            max_length=512))
    if not quick:  # held out: shapes core.memory.CPU_ALLOCATOR_RETENTION was not fitted on
        for model, rows, length in (("micro", 2, 1024), ("tiny", 16, 128), ("stories260K", 4, 256)):
            for adapter in (None, "lora"):
                out.append(dict(model=model, adapter=adapter, gradient_checkpointing=False, micro_batch_size=rows,
                                max_length=length, heldout=True))
    return out


def realm_for(cfg: dict, workdir: Path):
    from core.realm import init_realm

    name = (f"{cfg['model']}-{cfg['adapter'] or 'full'}-{'gc' if cfg['gradient_checkpointing'] else 'plain'}-"
            f"{cfg['micro_batch_size']}x{cfg['max_length']}")
    training = {"max_length": cfg["max_length"], "micro_batch_size": cfg["micro_batch_size"],
                "gradient_accumulation_steps": 1, "adapter": cfg["adapter"], "lora": {"r": 16, "alpha": 32},
                "gradient_checkpointing": cfg["gradient_checkpointing"], "eval_steps": 0, "eval_holdout_every": 0,
                "save_steps": 10 ** 6, "save_interval_minutes": 10 ** 6, "warmup_steps": 0,
                "mixed_precision": "no"}
    hero = {"base_model": str(STORIES260K)} if cfg["model"] == "stories260K" else {"default_size": cfg["model"]}
    realm = init_realm(workdir / name, overrides={"training": training, "hero": hero})
    if cfg["model"] != "stories260K":  # create the random-init hero here, not in the measured process
        from core.hero import default_hero_dir, resolve_model_source

        resolve_model_source(realm, realm.load_config().hero)
        assert default_hero_dir(realm, realm.load_config().hero).is_dir()
    return realm


class _LiveSampler:
    """Peak of the bytes malloc has handed out and not taken back (glibc ``mallinfo2``: in-use heap chunks +
    mmapped chunks), sampled every millisecond in a thread, minus its value at start: the live tensors,
    without what the allocator keeps. None where mallinfo2 is unavailable (not glibc >= 2.33)."""

    def __init__(self):
        import ctypes
        import threading

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = Info
            self._read = lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())
            self._start = self._peak = self._read()
        except (OSError, AttributeError):
            self._read = None
            return
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.001):
            self._peak = max(self._peak, self._read())

    def stop(self) -> int | None:
        if self._read is None:
            return None
        self._done.set()
        self._thread.join()
        return self._peak - self._start


def child(realm_root: str) -> None:
    """Runs in the measured process: imports, baseline, engine setup and STEPS steps; prints JSON."""
    import psutil

    sys.path.insert(0, str(ROOT))
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from core.engine import Engine
    from core.ledger import Ledger
    from core.quest_queue import QuestQueue
    from core.realm import Realm

    realm = Realm.at(realm_root)
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    path = realm.root / "long.jsonl"
    text = "Once upon a time, a little fox ran over the hill to see the sea. " * (config.training.max_length // 8)
    n = config.training.micro_batch_size * (STEPS + 2)
    path.write_text("".join(json.dumps({"text": f"{i} {text}"}) + "\n" for i in range(n)), encoding="utf-8")
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    records = [(i + 1, {"text": f"{i} {text}"}) for i in range(n)]
    sampler = _LiveSampler()
    baseline = psutil.Process().memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engine = Engine(realm, config, ledger)
    engine.setup()
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > STEPS

    started = time.perf_counter()
    engine.train_quest(qid, records, should_stop=stop)
    steps = ledger.steps()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    live = sampler.stop()
    print(json.dumps({"baseline_bytes": baseline, "live_peak_bytes": live, "peak_before_bytes": peak_before, "peak_bytes": peak,
                      "tokens_per_step": [s["tokens"] for s in steps], "seconds": time.perf_counter() - started,
                      "trainable_parameters": engine.hero_info["trainable_parameters"]}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="nano, micro and stories260K only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--gpu-table", type=int, metavar="MAX_LENGTH", help="print the Qwen3 x GPU preset estimates "
                   "at this max_length and exit")
    a = p.parse_args()
    if a.gpu_table:
        gpu_table(a.gpu_table)
        return 0
    if a.child:
        child(a.child)
        return 0
    from core.memory import estimate_for_realm

    if not STORIES260K.exists():
        sys.exit(f"{STORIES260K} is absent: this benchmark needs ../shared/models/stories260K")
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for cfg in configurations(a.quick):
            realm = realm_for(cfg, Path(tmp))
            est = estimate_for_realm(realm, realm.load_config(), device="cpu")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
            out = subprocess.run([PYTHON, __file__, "--child", str(realm.root)], capture_output=True, text=True,
                                 env=env, timeout=1800)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            m = json.loads(out.stdout.strip().splitlines()[-1])
            measured = m["peak_bytes"] - m["baseline_bytes"]
            row = {**cfg, "adapter": cfg["adapter"] or "full", "parameters": est.parameters,
                   "heldout": cfg.get("heldout", False),
                   "trainable_parameters": m["trainable_parameters"],
                   "estimate_trainable": est.trainable_parameters,
                   "tokens": cfg["micro_batch_size"] * cfg["max_length"],
                   "estimate_mb": round(est.total_bytes / 2 ** 20, 1), "measured_mb": round(measured / 2 ** 20, 1),
                   "live_estimate_mb": round((est.total_bytes - est.allocator_bytes) / 2 ** 20, 1),
                   "baseline_mb": round(m["baseline_bytes"] / 2 ** 20, 1),
                   "live_mb": round(m["live_peak_bytes"] / 2 ** 20, 1) if m["live_peak_bytes"] else None,
                   "ratio": round(est.total_bytes / measured, 3) if measured > 0 else None,
                   "weights_mb": round(est.weights_bytes / 2 ** 20, 1),
                   "activations_mb": round((est.activations_bytes + est.loss_bytes) / 2 ** 20, 1),
                   "seconds": round(m["seconds"], 1)}
            row["within_tolerance"] = row["ratio"] is not None and abs(row["ratio"] - 1) <= TOLERANCE
            rows.append(row)
            print(f"  {row['model']:12} {row['adapter']:5} gc={cfg['gradient_checkpointing']!s:5} estimate "
                  f"{row['estimate_mb']:8.1f} MB measured {row['measured_mb']:8.1f} MB ratio {row['ratio']} (live "
                  f"malloc peak {row['live_mb']} MB)",
                  flush=True)
    print()
    print_table(rows, [("model", "model", ""), ("adapter", "mode", ""), ("gradient_checkpointing", "grad ckpt", ""),
                       ("heldout", "held out", ""),
                       ("parameters", "params", ","), ("trainable_parameters", "trainable", ","),
                       ("micro_batch_size", "rows", ""), ("max_length", "max_length", ""),
                       ("estimate_mb", "estimate MB", ",.1f"),
                       ("measured_mb", "peak RSS - baseline MB", ",.1f"), ("ratio", "estimate/measured", ".2f"),
                       ("live_estimate_mb", "formula (live) MB", ",.1f"), ("live_mb", "live malloc peak MB", ",.1f"),
                       ("baseline_mb", "baseline MB", ",.0f")])
    ok = all(r["within_tolerance"] for r in rows)
    print(f"\nwithin +-{TOLERANCE:.0%}: {sum(r['within_tolerance'] for r in rows)}/{len(rows)}; "
          f"{time.time() - started:.0f} s")
    emit_json({"bench": "memory_estimate", "quick": a.quick, "machine": machine(), "steps": STEPS,
               "tolerance": TOLERANCE, "results": rows, "all_within_tolerance": ok}, "memory_estimate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
