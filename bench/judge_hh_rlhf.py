"""The Judge on Anthropic's hh-rlhf (harmless-base test split, ``../shared/data``): does DPO on 2,000 real
human preference pairs move held-out preference accuracy on ``../shared/models/stories260K``?

Pairs are implicit-prompt records (``chosen``/``rejected`` holding the whole conversation; the shared prefix is
the prompt, as the Judge's validation splits it). The first ``--train`` records are trained (one quest, our engine,
the settings of :mod:`judge_gsm8k`), the rest are held out and measured with
:func:`core.evaluation.evaluate_preferences` (what ``python -m training eval`` prints) on the base model and on
the trained one. A 260K-parameter model trained on children's stories may well not generalise to harmlessness:
the point is to report the numbers, not to tune to them. ``--trl`` also trains TRL's ``DPOTrainer`` on the
same pairs (slow here).

    python bench/judge_hh_rlhf.py [--train 2000] [--trl]
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path

from _common import SHARED, STORIES260K, require  # noqa: I001 - puts the repository root on sys.path
from judge_gsm8k import add_judge_arguments, heldout_measure, ours, trl  # noqa: E402

from core.formats import detect_format, normalize  # noqa: E402

HH_RLHF = SHARED / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=None, help="held-out pairs to measure (default: all the rest)")
    add_judge_arguments(parser)
    parser.add_argument("--trl", action="store_true", help="also train TRL's DPOTrainer on the same pairs")
    args = parser.parse_args()
    require(STORIES260K)
    require(HH_RLHF)
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    train_raw, held_raw = raw[:args.train], raw[args.train:][:args.heldout]
    work = Path(tempfile.mkdtemp(prefix="judge-hh-rlhf-"))
    measure = heldout_measure(held_raw, work, args.max_length)
    report = {"settings": vars(args), "train_pairs": len(train_raw), "heldout_pairs": len(held_raw),
              "base": measure(STORIES260K)}
    train = [normalize(r, detect_format(r)) for r in train_raw]  # prompt None: the Judge splits the shared prefix
    folder, seconds, _ = ours(train, args, work)
    report["ours"] = {**measure(folder), "train_seconds": round(seconds, 1)}
    if args.trl:
        folder, seconds, _ = trl(train_raw, args, work)  # TRL extracts the implicit prompt itself
        report["trl"] = {**measure(folder), "train_seconds": round(seconds, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
