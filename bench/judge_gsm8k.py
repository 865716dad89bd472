"""Does the Judge learn? GSM8K preference pairs on ../shared/models/stories260K, our engine vs TRL's DPOTrainer.

Pairs: ``prompt`` = the question, ``chosen`` = its GSM8K solution, ``rejected`` = the same solution with a
wrong final answer (``#### X`` -> ``#### X+d``, d in 1..9). Training pairs from the first ``--train``
records of ``gsm8k_train.jsonl``, held-out pairs from the next ``--heldout`` records (never trained).
Held-out preference accuracy is measured with :func:`core.evaluation.evaluate_preferences` (what
``python -m training eval`` prints) on the base model and on each trained model, the same rule for both.
Both trainers: the same pairs in the same order (TRL's sampler set to ``sequential``), ``--epochs``, ``--beta``,
``--lr`` (constant, no warmup), batch ``--batch`` (in ``--accumulation`` micro-batches), AdamW (0.9, 0.95), no
weight decay, grad clip 1.0, fp32, ``--max-length``. The report gives each trainer's loss and gradient norm of its
first steps: the same to about 4 digits when the two compute the same update; they drift apart later, as
floating-point sums in another order do through many steps at a high learning rate.

    python bench/judge_gsm8k.py --train 1500 --heldout 300 [--skip-trl] [--loss-type sigmoid|ipo]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

from _common import GSM8K, STORIES260K, require  # noqa: I001 - puts the repository root on sys.path

from core.config import parse_config  # noqa: E402
from core.evaluation import evaluate_preferences  # noqa: E402

FINAL = re.compile(r"####\s*(-?[\d,]+)\s*$")


def pairs(start: int, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + start)
    out = []
    with open(GSM8K, encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(start + n), f, strict=False)][start:]
    for r in rows:
        m = FINAL.search(r["answer"])
        if not m:
            continue
        value = int(m.group(1).replace(",", ""))
        wrong = r["answer"][:m.start()] + f"#### {value + rng.randint(1, 9)}"
        out.append({"prompt": r["question"] + "\n", "chosen": r["answer"], "rejected": wrong})
    return out


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


FIRST_STEPS = 5  # steps whose loss and grad norm are reported for both trainers


def ours(train: list[dict], args, work: Path) -> tuple[Path, float, list[list[float]]]:
    """Train the pairs as one Judge quest; returns the checkpoint, training seconds and ``[loss, grad_norm]`` of
    the first :data:`FIRST_STEPS` steps."""
    from core.engine import Engine
    from core.ledger import Ledger
    from core.quest_queue import QuestQueue
    from core.realm import init_realm

    realm = init_realm(work / "realm", overrides={
        "hero": {"base_model": str(STORIES260K)},
        "training": {"learning_rate": args.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
                     "micro_batch_size": args.batch // args.accumulation,
                     "gradient_accumulation_steps": args.accumulation, "max_length": args.max_length,
                     "eval_holdout_every": 0, "save_steps": 1_000_000, "save_interval_minutes": 1e6,
                     "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.95, "max_grad_norm": 1.0},
        "schools": {"*.jsonl": {"school": "dpo", "loss_type": args.loss_type, "beta": args.beta}}})
    ledger = Ledger(realm.ledger_path)
    records = [(i + 1, {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
               for i, r in enumerate(train * args.epochs)]
    path = write(work / "train.jsonl", [r for _, r in records])
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    ledger.update_quest(qid, format="preference", school="ipo" if args.loss_type == "ipo" else "dpo")
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    started = time.perf_counter()
    result = engine.train_quest(qid, records, reference_path=work / "reference.safetensors")
    seconds = time.perf_counter() - started
    engine.cleanup()
    first = [[round(r["loss"], 5), round(r["grad_norm"], 5)] for r in ledger.steps()[:FIRST_STEPS]]
    ledger.close()
    return Path(result.checkpoint), seconds, first


def trl(train: list[dict], args, work: Path) -> tuple[Path, float, list[list[float]]]:
    """TRL's ``DPOTrainer`` on the same pairs, order and settings; returns as :func:`ours` does."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = DPOConfig(output_dir=str(work / "trl"), beta=args.beta, loss_type=[args.loss_type],
                       learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                       per_device_train_batch_size=args.batch // args.accumulation,
                       gradient_accumulation_steps=args.accumulation,
                       num_train_epochs=args.epochs, max_length=args.max_length, weight_decay=0.0, adam_beta1=0.9,
                       adam_beta2=0.95, max_grad_norm=1.0, save_strategy="no", report_to=[], logging_steps=1,
                       use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
                       train_sampling_strategy="sequential")  # the same order as ours (the default shuffles)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                         processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    out = work / "trl-final"
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    logged = [e for e in trainer.state.log_history if "loss" in e and "grad_norm" in e]
    return out, seconds, [[round(e["loss"], 5), round(e["grad_norm"], 5)] for e in logged[:FIRST_STEPS]]


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The training settings both Judge benchmarks share (the same for our engine and for TRL)."""
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--accumulation", type=int, default=1, help="the step in this many micro-batches of "
                        "batch/accumulation pairs (the same update, another floating-point summation order)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--loss-type", choices=["sigmoid", "ipo"], default="sigmoid")


def heldout_measure(held: list[dict], work: Path, max_length: int):
    """Write ``held`` to ``work/heldout.jsonl``; return ``model folder -> evaluate_preferences(...)`` on it."""
    heldout_file = write(work / "heldout.jsonl", held)
    config = parse_config({"hero": {"base_model": str(STORIES260K)}, "training": {"max_length": max_length}})
    return lambda folder: evaluate_preferences(folder, heldout_file, config, max_examples=len(held))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--heldout", type=int, default=300)
    add_judge_arguments(parser)
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    require(STORIES260K)
    require(GSM8K)
    train, held = pairs(0, args.train), pairs(args.train, args.heldout)
    work = Path(tempfile.mkdtemp(prefix="judge-gsm8k-"))
    measure = heldout_measure(held, work, args.max_length)
    report = {"settings": vars(args), "train_pairs": len(train), "heldout_pairs": len(held),
              "base": measure(STORIES260K)}
    folder, seconds, first = ours(train, args, work)
    report["ours"] = {**measure(folder), "train_seconds": round(seconds, 1), "first_steps_loss_grad_norm": first}
    if not args.skip_trl:
        folder, seconds, first = trl(train, args, work)
        report["trl"] = {**measure(folder), "train_seconds": round(seconds, 1), "first_steps_loss_grad_norm": first}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
