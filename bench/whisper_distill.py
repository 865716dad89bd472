"""Does Whisper distil? A trained checkpoint (../shared/models/stories260K, trained on TinyStories) taught to a
newborn hero (the same architecture and tokenizer, random weights), against plain SFT on the same text.

Text: ``--train`` + ``--heldout`` stories sampled from the teacher (seeded, temperature 1, from its BOS token,
``--story-tokens`` new tokens each): text the teacher knows, as in sequence-level distillation. Both runs
train one quest of the same ``--train`` stories for ``--epochs`` through the real engine
(:meth:`core.engine.Engine.train_quest`), the same steps, learning rate, batch and order; only the school
differs: ``sft`` (Scribe) vs ``distill`` (Whisper: ``--alpha``, ``--temperature``, ``--loss-type``).
Measured on the held-out stories (never trained), per loss-carrying token: KL(teacher || hero) at T = 1 and
the hero's cross-entropy, before (newborn) and after each run; the teacher's own cross-entropy is the
floor.

    python bench/whisper_distill.py [--train 256 --heldout 48 --epochs 2] [--extra-runs]

``--extra-runs`` also trains Whisper with alpha 0.5 and with the generalized JSD (beta 0.5).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import STORIES260K, emit_json, machine, print_table, require  # noqa: I001 - sys.path first
from _school_runs import heldout, train_quest


def sample_stories(n: int, new_tokens: int, seed: int) -> list[str]:
    """``n`` stories sampled from stories260K (temperature 1, no top-k/top-p), decoded to text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    torch.manual_seed(seed)
    out = []
    for i in range(0, n, 64):
        k = min(64, n - i)
        ids = torch.full((k, 1), model.config.bos_token_id)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=new_tokens, pad_token_id=0)
        out += [t.strip() for t in tokenizer.batch_decode(gen[:, 1:], skip_special_tokens=True)]
    return [t for t in out if t]


def newborn_student(dest: Path, seed: int) -> Path:
    """stories260K's architecture and tokenizer with random weights (seeded), saved to ``dest``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(STORIES260K))
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(STORIES260K).save_pretrained(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=48)
    parser.add_argument("--story-tokens", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss-type", choices=["kl", "jsd"], default="kl")
    parser.add_argument("--extra-runs", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    require(STORIES260K)
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from core.config import HeroConfig
    from core.hero import load_tokenizer

    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="whisper-distill-"))
    started = time.perf_counter()
    stories = sample_stories(args.train + args.heldout, args.story_tokens, args.seed)
    train, held = stories[:args.train], stories[args.train:]
    student = newborn_student(work / "newborn", args.seed + 1)
    tokenizer = load_tokenizer(STORIES260K, HeroConfig())
    teacher = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()
    max_length = args.story_tokens + 8
    training = {"learning_rate": args.lr, "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 10,
                "micro_batch_size": args.batch, "gradient_accumulation_steps": 1, "max_length": max_length,
                "packing": False, "eval_holdout_every": 0, "save_steps": 1_000_000, "save_interval_minutes": 1e6,
                "seed": args.seed}
    measure = lambda d: heldout(d, held, tokenizer, max_length, teacher)  # noqa: E731
    rows = [{"run": "teacher (stories260K)", **measure(STORIES260K)}, {"run": "newborn (before)", **measure(student)}]
    runs = [("sft", {"school": "sft"}),
            (f"distill {args.loss_type} alpha {args.alpha:g} T {args.temperature:g}",
             {"school": "distill", "teacher": str(STORIES260K), "alpha": args.alpha,
              "temperature": args.temperature, "loss_type": args.loss_type})]
    if args.extra_runs:
        runs += [("distill kl alpha 0.5 T 1", {"school": "distill", "teacher": str(STORIES260K), "alpha": 0.5}),
                 ("distill jsd beta 0.5 alpha 1", {"school": "distill", "teacher": str(STORIES260K), "alpha": 1.0,
                                                   "loss_type": "jsd", "beta": 0.5})]
    for k, (label, rule) in enumerate(runs):
        run = train_quest(work, f"run{k}", student, rule, train * args.epochs, training)  # file order, E times
        rows.append({"run": label, **measure(run["checkpoint"]), "steps": run["steps"], "seconds": run["seconds"]})
    print_table(rows, [("run", "run", ""), ("steps", "steps", "d"), ("kl", "held-out KL(teacher||hero)", ".4f"),
                       ("ce", "held-out CE", ".4f"), ("seconds", "train s", ".1f")])
    sft, whisper = rows[2], rows[3]
    before = rows[1]["kl"]
    emit_json({"bench": "whisper_distill", "settings": vars(args), "train_stories": len(train),
               "heldout_stories": len(held), "heldout_tokens": rows[0]["tokens"], "rows": rows,
               "kl_drop_sft": before - sft["kl"], "kl_drop_whisper": before - whisper["kl"],
               "whisper_beats_sft": whisper["kl"] < sft["kl"], "seconds": round(time.perf_counter() - started, 1),
               "machine": machine()}, "whisper_distill")


if __name__ == "__main__":
    main()
