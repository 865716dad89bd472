"""Fortune Teller's effect on held-out loss: surprise-weighted SFT vs plain SFT, the same text and steps.

Model: ../shared/models/stories260K (trained on TinyStories). Text: ../shared/data/tinyshakespeare_input.txt
split into speeches (blank-line separated); the first ``--train`` speeches train, the last ``--heldout``
(never trained) measure. Every run trains one quest of the same speeches, in file order, packed rows,
through the real engine (:meth:`core.engine.Engine.train_quest`), the same learning rate, batch and steps;
only the school differs: ``sft`` (Scribe) and ``fortune_teller`` with each ``weighting`` (entropy,
confidence, margin). Measured: the held-out cross-entropy per loss-carrying token (nats), before and after.

    python bench/fortune_teller_effect.py [--train 600 --heldout 150 --epochs 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import SHARED, STORIES260K, emit_json, machine, print_table, require  # noqa: I001 - sys.path first
from _school_runs import heldout, train_quest

SHAKESPEARE = SHARED / "data" / "tinyshakespeare_input.txt"


def speeches() -> list[str]:
    """The blank-line separated speeches of tinyshakespeare, in order."""
    return [s.strip() for s in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--heldout", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--weightings", default="entropy,confidence,margin")
    args = parser.parse_args()
    require(STORIES260K)
    require(SHAKESPEARE)
    from transformers.utils import logging as hf_logging

    from core.config import HeroConfig
    from core.hero import load_tokenizer

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fortune-teller-"))
    texts = speeches()
    train, held = texts[:args.train] * args.epochs, texts[-args.heldout:]
    tokenizer = load_tokenizer(STORIES260K, HeroConfig())
    training = {"learning_rate": args.lr, "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 5,
                "micro_batch_size": args.batch, "gradient_accumulation_steps": 1, "max_length": args.max_length,
                "packing": True, "eval_holdout_every": 0, "save_steps": 1_000_000, "save_interval_minutes": 1e6,
                "seed": 0}
    measure = lambda d: heldout(d, held, tokenizer, args.max_length)  # noqa: E731
    rows = [{"run": "stories260K (before)", **measure(STORIES260K)}]
    runs = [("sft", {"school": "sft"})] + [(f"fortune_teller {w}", {"school": "fortune_teller", "weighting": w})
                                           for w in args.weightings.split(",") if w]
    for k, (label, rule) in enumerate(runs):
        run = train_quest(work, f"run{k}", STORIES260K, rule, train, training)
        rows.append({"run": label, **measure(run["checkpoint"]), "steps": run["steps"], "seconds": run["seconds"],
                     "train_loss": run["loss"]})
    sft = rows[1]["ce"]
    for r in rows[1:]:
        r["vs_sft"] = r["ce"] - sft
    print_table(rows, [("run", "run", ""), ("steps", "steps", "d"), ("ce", "held-out CE", ".4f"),
                       ("vs_sft", "minus sft", "+.4f"), ("seconds", "train s", ".1f")])
    emit_json({"bench": "fortune_teller_effect", "settings": vars(args), "train_speeches": len(train),
               "heldout_speeches": len(held), "heldout_tokens": rows[0]["tokens"], "rows": rows,
               "seconds": round(time.perf_counter() - started, 1), "machine": machine()}, "fortune_teller_effect")


if __name__ == "__main__":
    main()
