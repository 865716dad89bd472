"""Training throughput: our Engine vs TRL's SFTTrainer (at its best here) vs a bare PyTorch loop.

    .venv/bin/python bench/throughput.py            # full run (~20 min on 2 CPU cores)
    .venv/bin/python bench/throughput.py --quick    # a few minutes: fewer steps and repeats

Same model weights, data (GSM8K prompt/completion from ../shared/data, loss on the completion), order,
optimizer (AdamW, constant learning rate, clipping at 1.0) and tokens per optimizer step for every
system; runs alternate between systems and the median of the repeats is reported. Tokens/s counts real
tokens (no padding) over whole optimizer steps (data, forward, backward, clipping, update; for the
engine also tokenization and its per-step ledger row), after one warm-up step.

Systems:

- ``engine``: :class:`core.engine.Engine` on a temporary realm, fed like the daemon feeds it; rows of
  ``max_length`` packed in order decide each step's examples; on CPU it computes them without padding and
  with causal attention within each example (:func:`core.packing.packed_sdpa_attention`, no attention
  across examples).
- ``trl``: ``trl.SFTTrainer`` configured at its best for this CPU: fp32 (its default bf16 is ~100x
  slower here), no gradient checkpointing (default on), padding per batch (its packing flattens a batch
  into one row: ~12x slower without a varlen attention kernel, ../shared/MEASURED.md), sequential order.
  TRL 1.16 always swaps in its chunked "fused" LM head (a plain-torch fallback without Triton); no option
  turns it off. Batch size chosen so that its real tokens per step match the packed systems'.
- ``bare``: a nanoGPT-style loop: pre-tokenized, pre-packed into the same rows, same block-diagonal mask,
  ``AdamW``; the floor of what any framework on top of ``transformers`` can cost.
- ``bare_causal`` (not with ``--quick``): the bare loop with plain causal attention (no mask: packed
  examples attend to each other), to show what the mask costs.
- ``engine_lora`` / ``trl_lora``: the same two with a LoRA adapter (PEFT; r 16, alpha 32, no dropout, on
  every linear layer of the decoder blocks: the engine's default targets, given to TRL as the same list),
  everything else as above. With ``--quick`` only on stories260K and ``small``.

Models: random-init Qwen3 ``micro``/``tiny``/``small`` (:data:`core.hero.HERO_SIZES`, about 2.5M, 10M,
40M parameters, byte-level tokenizer, ``max_length`` 1024 x 4 rows) and ../shared/models/stories260K
(``max_length`` 512 x 8 rows). On a machine with an NVIDIA GPU: Qwen3-0.6B's configuration (random init)
in bf16, TRL with padding-free packing when FlashAttention is installed (untested here: no GPU).

MFU = model FLOP/s / the fp32 matmul peak measured in the same run (``torch.mm`` 1024x1024 on all torch
threads, the best of 10 timings; measured before the first model and after each round of runs, the median
of those), with nanoGPT's FLOP count per token: ``6 N + 12 n_layer n_head head_dim T``, T = the mean example
length of the data (the sequence each token really attends over; the same count for every system, whatever
it computes on padding or across packed examples).

Prints a table and one JSON line; writes bench/out/throughput.json and bench/out/throughput.png
(``--docs`` also copies the PNG to docs/perf/throughput.png).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (
    GSM8K,
    OUT,
    ROOT,
    STORIES260K,
    emit_json,
    gsm8k_examples,
    machine,
    matmul_peak_gflops,
    median,
    print_table,  # noqa: E402
    require,
)

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LEARNING_RATE = 1e-3
SEED = 1234
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=40960, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})


# --- models and data ---------------------------------------------------------------------------------
def model_specs(cuda: bool, quick: bool) -> list[dict]:
    """name, source (hero size, folder, or a config dict), max_length, rows per step, measured steps."""
    if cuda:
        return [dict(name="qwen3-0.6b", source=("config", QWEN3_0_6B), max_length=2048, rows=8, steps=5)]
    q = quick
    return [
        dict(name="stories260K", source=("folder", str(STORIES260K)), max_length=512, rows=8, steps=3 if q else 8),
        dict(name="micro", source=("size", "micro"), max_length=1024, rows=4, steps=3 if q else 8),
        dict(name="tiny", source=("size", "tiny"), max_length=1024, rows=4, steps=3 if q else 5),
        dict(name="small", source=("size", "small"), max_length=1024, rows=4, steps=2 if q else 3),
    ]


def materialize(spec: dict, workdir: Path) -> Path:
    """A model folder (HF format, fp32) for ``spec``: the same initial weights for every system."""
    kind, value = spec["source"]
    if kind == "folder":
        return Path(value)
    from core.hero import build_byte_tokenizer, create_default_hero

    dest = workdir / f"model-{spec['name']}"
    if dest.exists():
        return dest
    if kind == "size":
        return create_default_hero(dest, value, seed=SEED)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3ForCausalLM(Qwen3Config(**value, eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def flops_per_token(model_dir: Path, seq_len: int) -> tuple[int, float]:
    """(parameters, nanoGPT's training FLOPs per token: 6 N + 12 L H Q T, T = ``seq_len``)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    return n, 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len


# --- the three systems -------------------------------------------------------------------------------
class Run:
    """Per-step wall times (s), real tokens and losses of one run (warm-up steps already dropped)."""

    def __init__(self, times: list[float], tokens: list[int], losses: list[float]):
        self.times, self.tokens, self.losses = times, tokens, losses

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens) / sum(self.times)


LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}


def lora_targets(model_dir: Path) -> list[str]:
    """The engine's default LoRA targets for this model (core.adapters.default_target_modules)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.adapters import default_target_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return default_target_modules(model)


def run_engine(model_dir: Path, examples: list[dict], spec: dict, warmup: int, workdir: Path, cuda: bool,
               lora: bool = False) -> Run:
    from core.chat import measure_batch
    from core.daemon import TRAINABLE_FORMATS  # noqa: F401  (the daemon's import path, as in production)
    from core.engine import Engine
    from core.ledger import Ledger
    from core.quest_queue import QuestQueue
    from core.realm import init_realm
    from core.records import RecordVerdicts, trainable_records
    from core.validation import validate_file

    root = Path(tempfile.mkdtemp(prefix="engine-", dir=workdir))
    training = {"max_length": spec["max_length"], "micro_batch_size": spec["rows"], "gradient_accumulation_steps": 1,
                "learning_rate": LEARNING_RATE, "warmup_steps": 0, "lr_scheduler_type": "constant",
                "eval_steps": 0, "eval_holdout_every": 0, "save_steps": 10 ** 6, "save_interval_minutes": 10 ** 6,
                "seed": SEED, "mixed_precision": "bf16" if cuda else "no"}
    if lora:
        training.update(adapter="lora", lora=LORA)
    realm = init_realm(root, base_model=str(model_dir), overrides={"training": training})
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    src = root / "gsm8k.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    qid = QuestQueue(realm, ledger).admit(src, "normal")
    quest = ledger.get_quest(qid)
    path = QuestQueue(realm, ledger).path_of(quest)
    engine = Engine(realm, config, ledger)
    engine.setup()

    # as the daemon feeds the engine: validation's verdict (not timed), then the records it kept
    verdicts = RecordVerdicts()
    validate_file(path, display_name=quest["name"], config=config, verdicts=verdicts,
                  count_tokens_batch=lambda exs: measure_batch(exs, engine.tokenizer, config.training.max_length))

    def records():
        return trainable_records(path, verdicts)

    stamps: list[float] = []
    total = warmup + spec["steps"]

    def should_stop() -> bool:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return len(stamps) > total

    engine.train_quest(qid, records(), should_stop=should_stop)
    steps = ledger.steps()
    engine.cleanup()
    ledger.close()
    shutil.rmtree(root, ignore_errors=True)
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][warmup:total]
    return Run(times, [s["tokens"] for s in steps][warmup:total], [s["loss"] for s in steps][warmup:total])


def _pack(tokenized, rows: int, max_length: int) -> list[list[list]]:
    """Greedy in-order packing into steps of ``rows`` rows (written out here: the bare loop is standalone)."""
    steps, current, used = [], [], 0
    for ex in tokenized:
        n = len(ex.input_ids)
        if current and used + n <= max_length:
            current[-1].append(ex)
            used += n
            continue
        if len(current) == rows:
            steps.append(current)
            current = []
        current.append([ex])
        used = n
    if current:
        steps.append(current)
    return steps


def _bare_batch(step, max_length: int, pad_id: int, block_mask: bool):
    B, L = len(step), max_length
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    doc = -torch.arange(1, L + 1).repeat(B, 1)
    for b, row in enumerate(step):
        p = 0
        for k, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[b, p:p + n] = torch.tensor(ex.input_ids)
            labels[b, p:p + n] = torch.tensor(ex.labels)
            labels[b, p] = -100
            pos[b, p:p + n] = torch.arange(n)
            doc[b, p:p + n] = k
            p += n
    mask = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()).unsqueeze(1) \
        if block_mask else None
    return ids, labels, pos, mask


def run_bare(model_dir: Path, examples: list[dict], spec: dict, warmup: int, cuda: bool,
             block_mask: bool = True) -> Run:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.chat import tokenize_example

    device = "cuda" if cuda else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenized = [tokenize_example(e, tokenizer, spec["max_length"]) for e in examples]
    total = warmup + spec["steps"]
    steps = _pack(tokenized, spec["rows"], spec["max_length"])[:total]
    batches = [_bare_batch(s, spec["max_length"], pad, block_mask) for s in steps]
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            fused=cuda)
    times, losses = [], []
    for ids, labels, pos, mask in batches:
        t = time.perf_counter()
        ids, labels, pos = ids.to(device), labels.to(device), pos.to(device)
        mask = mask.to(device) if mask is not None else None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos if mask is not None else None,
                           use_cache=False).logits
        n_trainable = int((labels[:, 1:] != -100).sum())
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum") / n_trainable
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the host sync that ends the step
        times.append(time.perf_counter() - t)
    # real tokens per step, counted from the packed examples (the pad id may equal a real token's)
    real = [sum(len(ex.input_ids) for row in s for ex in row) for s in steps]
    del model, opt
    gc.collect()
    return Run(times[warmup:], real[warmup:len(times)], losses[warmup:])


def trl_batch_size(examples: list[dict], model_dir: Path, spec: dict) -> tuple[int, float]:
    """Examples per TRL step so that its real tokens per step match the packed systems' (median step), and
    the mean example length (tokens, truncated to max_length)."""
    from transformers import AutoTokenizer

    from core.chat import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenized = [tokenize_example(e, tokenizer, spec["max_length"]) for e in examples[:2000]]
    steps = _pack(tokenized, spec["rows"], spec["max_length"])[:-1]
    per_step = median([sum(len(ex.input_ids) for row in s for ex in row) for s in steps])
    mean_len = sum(len(t.input_ids) for t in tokenized) / len(tokenized)
    return max(1, round(per_step / mean_len)), mean_len


def run_trl(model_dir: Path, examples: list[dict], spec: dict, warmup: int, batch_size: int, workdir: Path,
            cuda: bool, lora: bool = False) -> Run:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    total = warmup + spec["steps"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = Dataset.from_list(examples[: (total + 2) * batch_size])
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    packing = False
    attn = None
    if cuda:
        try:
            import flash_attn  # noqa: F401

            packing, attn = True, "flash_attention_2"
        except ImportError:
            pass
    if attn:
        model.set_attn_implementation(attn)
    args = SFTConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=total + 1,
        bf16=cuda, fp16=False, gradient_checkpointing=False, packing=packing, padding_free=packing,
        max_length=spec["max_length"], logging_steps=1, save_strategy="no", report_to=[], seed=SEED,
        dataloader_num_workers=0, train_sampling_strategy="sequential", disable_tqdm=True,
        use_cpu=not cuda, completion_only_loss=True, dataset_num_proc=None)

    stamps: list[float] = []
    losses: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            if len(stamps) > total:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=lora_targets(model_dir), bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[Clock()], peft_config=peft_config)
    collator = trainer.data_collator

    def counting(features):
        batch = collator(features)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    del trainer, model
    gc.collect()
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # the first stamp is taken at the first step's begin, after its batch was collated: step k <-> batch k
    return Run(times[warmup:total], tokens[warmup:total], losses[warmup:total])


# --- driver ------------------------------------------------------------------------------------------
def loss_agreement(curves: dict[str, list[float]], reference: str = "bare") -> dict:
    """Compare each system's mean loss over the common steps with the reference's (the bare loop; TRL +
    PEFT for the LoRA systems), in units of the per-step noise (std of the reference's step-to-step
    differences / sqrt 2, over sqrt(steps))."""
    ref = curves.get(reference)
    if not ref:
        return {}
    n = min(len(c) for c in curves.values())
    diffs = [b - a for a, b in zip(ref[:n], ref[1:n], strict=False)]
    noise = (sum(d * d for d in diffs) / max(1, len(diffs))) ** 0.5 / math.sqrt(2) if diffs else 0.0
    se = noise * math.sqrt(2 / n) if n else float("nan")
    out = {"steps": n, "step_noise": round(noise, 4)}
    for name, c in curves.items():
        delta = sum(c[:n]) / n - sum(ref[:n]) / n
        out[name] = {"mean_loss": round(sum(c[:n]) / n, 4), "delta_vs_reference": round(delta, 4),
                     "agrees": bool(abs(delta) <= max(3 * se, 0.02 * abs(sum(ref[:n]) / n)))}
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    style = {"engine": ("o-", "our Engine"), "trl": ("s-", "TRL SFTTrainer (fp32, padding)"),
             "bare": ("^-", "bare PyTorch loop (same packing + mask)"),
             "bare_causal": ("v:", "bare loop, causal only (documents attend across)"),
             "engine_lora": ("o--", "our Engine, LoRA r16"), "trl_lora": ("s--", "TRL SFTTrainer + PEFT LoRA r16")}
    for system, (marker, label) in style.items():
        pts = sorted((r["parameters"], r["tokens_per_s"], r["model"]) for r in rows if r["system"] == system)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label)
    for p, _, name in sorted({(r["parameters"], 0, r["model"]) for r in rows}):
        ax.annotate(name, (p, 0), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=7,
                    xycoords=("data", "axes fraction"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("training tokens/s (real tokens, median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and 2 repeats (a few minutes)")
    p.add_argument("--repeats", type=int, help="runs per system and model (default 3, quick 2)")
    p.add_argument("--models", help="comma-separated subset of stories260K,micro,tiny,small")
    p.add_argument("--systems", help="comma-separated subset of engine,trl,bare,bare_causal,engine_lora,trl_lora")
    p.add_argument("--threads", type=int, help="torch threads for every run (default: torch's default here)")
    p.add_argument("--docs", action="store_true", help="also copy the PNG to docs/perf/throughput.png")
    a = p.parse_args()
    require(GSM8K)
    require(STORIES260K)
    cuda = torch.cuda.is_available()
    threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    repeats = a.repeats or (2 if a.quick else 3)
    systems = a.systems.split(",") if a.systems else (["engine", "trl", "bare"] + ([] if a.quick else
                                                                                  ["bare_causal"])
                                                       + ["engine_lora", "trl_lora"])
    specs = model_specs(cuda, a.quick)
    if a.models:
        specs = [s for s in specs if s["name"] in a.models.split(",")]
    warmup = 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    examples = gsm8k_examples(4000)
    peaks = [matmul_peak_gflops(device="cuda" if cuda else "cpu",
                                dtype=torch.bfloat16 if cuda else torch.float32)]
    results: list[dict] = []
    curves: dict[str, dict[str, list[float]]] = {}
    started = time.time()
    try:
        for spec in specs:
            model_dir = materialize(spec, workdir)
            bs, mean_len = trl_batch_size(examples, model_dir, spec)
            params, fpt = flops_per_token(model_dir, round(mean_len))
            lora_here = not a.quick or a.systems or spec["name"] in ("stories260K", "small", "qwen3-0.6b")
            model_systems = [s for s in systems if lora_here or not s.endswith("_lora")]
            runs: dict[str, list[Run]] = {s: [] for s in model_systems}
            for rep in range(repeats):
                n = len(model_systems)
                order = model_systems[rep % n:] + model_systems[:rep % n]  # alternate who goes first
                for system in order:
                    torch.set_num_threads(threads)  # the same for every run (a library may change it)
                    if system in ("engine", "engine_lora"):
                        r = run_engine(model_dir, examples, spec, warmup, workdir, cuda, lora=system == "engine_lora")
                    elif system in ("trl", "trl_lora"):
                        r = run_trl(model_dir, examples, spec, warmup, bs, workdir, cuda, lora=system == "trl_lora")
                    else:
                        r = run_bare(model_dir, examples, spec, warmup, cuda, block_mask=system == "bare")
                    runs[system].append(r)
                    print(f"  {spec['name']:12} rep {rep + 1}/{repeats} {system:12} {r.tokens_per_second:9.0f} tokens/s "
                          f"({len(r.times)} steps, {median(r.tokens):.0f} tokens/step; threads after the run "
                          f"{torch.get_num_threads()})", flush=True)
                peaks.append(matmul_peak_gflops(device="cuda" if cuda else "cpu",
                                                dtype=torch.bfloat16 if cuda else torch.float32))
            curves[spec["name"]] = {s: runs[s][0].losses for s in model_systems}
            for system in model_systems:
                tps = median([r.tokens_per_second for r in runs[system]])
                results.append({"model": spec["name"], "parameters": params, "system": system,
                                "tokens_per_s": round(tps, 1), "flops_per_token": fpt,
                                "best_tokens_per_s": round(max(r.tokens_per_second for r in runs[system]), 1),
                                "step_s": round(median([median(r.times) for r in runs[system]]), 3),
                                "tokens_per_step": round(median([median(r.tokens) for r in runs[system]])),
                                "runs_tokens_per_s": [round(r.tokens_per_second, 1) for r in runs[system]],
                                "max_length": spec["max_length"], "rows": spec["rows"],
                                "mean_example_tokens": round(mean_len, 1),
                                "trl_batch_size": bs if system == "trl" else None})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    peak = median(peaks)  # measured between the runs, under the same conditions as they ran
    by = {(r["model"], r["system"]): r for r in results}
    for r in results:
        r["mfu"] = round(r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e9), 4)
        eng = by.get((r["model"], "engine_lora" if r["system"].endswith("_lora") else "engine"))
        mine = r["system"] in ("engine", "engine_lora")
        r["engine_ratio"] = round(eng["tokens_per_s"] / r["tokens_per_s"], 3) if eng and not mine else None
        r["engine_ratio_best"] = round(eng["best_tokens_per_s"] / r["best_tokens_per_s"], 3) \
            if eng and not mine else None
    print()
    print_table(results, [("model", "model", ""), ("parameters", "params", ","), ("system", "system", ""),
                          ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"), ("step_s", "s/step", ".2f"),
                          ("tokens_per_step", "tokens/step", ","), ("engine_ratio", "engine / this", ".2f"),
                          ("best_tokens_per_s", "best tokens/s", ",.0f"), ("engine_ratio_best", "engine / this (best)",
                                                                           ".2f")])
    print(f"\nfp32 matmul peak {peak:.1f} GFLOP/s (median of {len(peaks)} measurements between the runs, "
          f"max {max(peaks):.1f}); "
          f"{repeats} runs per system, median; {time.time() - started:.0f} s")
    agreement = {}
    for m, c in curves.items():
        agreement[m] = loss_agreement({k: v for k, v in c.items() if not k.endswith("_lora")})
        agreement[m + " (LoRA)"] = loss_agreement({k: v for k, v in c.items() if k.endswith("_lora")}, "trl_lora")
    for m, ag in agreement.items():
        if ag:
            print(f"loss agreement {m}: " + ", ".join(f"{s} {v['mean_loss']} ({v['delta_vs_reference']:+})"
                                                      for s, v in ag.items() if isinstance(v, dict)))
    targets = {}
    for m in ("tiny", "small"):
        e, t, b = by.get((m, "engine")), by.get((m, "trl")), by.get((m, "bare"))
        if e and t:
            targets[f"{m}_engine_vs_trl"] = {"value": round(e["tokens_per_s"] / t["tokens_per_s"], 3), "target": 1.5}
        if e and b:
            targets[f"{m}_engine_vs_bare"] = {"value": round(e["tokens_per_s"] / b["tokens_per_s"], 3), "target": 0.95}
    for m in ("stories260K", "tiny", "small", "qwen3-0.6b"):
        e, t = by.get((m, "engine_lora")), by.get((m, "trl_lora"))
        if e and t:
            targets[f"{m}_lora_engine_vs_trl"] = {"value": round(e["tokens_per_s"] / t["tokens_per_s"], 3),
                                                  "target": 1.5}
    if by.get(("small", "engine")):
        targets["small_engine_mfu"] = {"value": by[("small", "engine")]["mfu"], "target": 0.60}
    for v in targets.values():
        v["met"] = v["value"] is not None and v["value"] >= v["target"]
    title = f"Training throughput, {machine().get('cpu', 'CPU')} ({torch.get_num_threads()} threads), fp32"
    png = OUT / "throughput.png"
    plot(results, png, title)
    if a.docs:
        dest = ROOT / "docs" / "perf" / "throughput.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, dest)
    print(f"plot: {png}")
    emit_json({"bench": "throughput", "quick": a.quick, "machine": machine(), "peak_gflops": round(peak, 1),
               "repeats": repeats, "results": results, "loss_agreement": agreement, "targets": targets,
               "loss_curves": curves}, "throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
