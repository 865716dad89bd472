"""Data parallel training: N processes against 1 on the same quest (../shared/models/stories260K, GSM8K).

    .venv/bin/python bench/data_parallel.py                  # 2 processes vs 1, 3 repeats each
    .venv/bin/python bench/data_parallel.py --processes 4 --quick

Each run is ``python -m training daemon --until-idle`` on a fresh realm (1 process), or the same under
``accelerate launch --num_processes N`` (:func:`core.distributed.launch_command`: DDP; gloo on a CPU, NCCL
on GPUs), on the same quest with the same global batch (``micro_batch_size`` x accumulation rows per
optimizer step). Runs alternate between 1 and N processes; the median of the repeats is reported:

- ``tokens/s``: the median over the run's steps of the ledger's ``tokens_per_second`` (rank 0 counts the
  whole step's tokens, all ranks together, over the step's wall time), after the first step;
- ``wall s``: from the process start to its exit (imports, setup, training, the last checkpoint);
- ``max rel diff``: the largest relative difference between the two runs' losses and gradient norms at the
  same global step (the examples of every step are checked equal; only float addition order differs).

On a CPU the N ranks share its cores (torchrun gives each rank one thread: ``OMP_NUM_THREADS=1``), so N
processes are not expected to be faster than one process using every core; the number to look at there is
the exactness. On a machine with N GPUs the ratio is the speed-up. Prints a table and one JSON line (also
bench/out/data_parallel.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    GSM8K,
    PYTHON,
    ROOT,
    STORIES260K,
    emit_json,
    gsm8k_jsonl,
    machine,
    median,
    print_table,
    require,
)

from core.distributed import launch_command  # noqa: E402
from core.ledger import Ledger  # noqa: E402
from core.realm import init_realm  # noqa: E402

TRAINING = {"save_steps": 1000, "eval_steps": 0, "eval_holdout_every": 0, "max_length": 512,
            "micro_batch_size": 4, "gradient_accumulation_steps": 2}


def run(work: Path, name: str, processes: int, examples: int, threads: int | None = None) -> dict:
    realm = init_realm(work / name, base_model=str(STORIES260K), overrides={"training": TRAINING})
    (realm.inbox / "gsm8k.jsonl").write_text(gsm8k_jsonl(examples), encoding="utf-8")
    launcher = ["-m", *launch_command(processes)] if processes > 1 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    with open(realm.root / "daemon.log", "wb") as log:
        done = subprocess.run([PYTHON, *launcher, "-m", "training", "--realm", str(realm.root), "daemon",
                               "--until-idle"], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{name} failed: see {realm.root / 'daemon.log'}\n" + (realm.root / "daemon.log").read_text()[-2000:])
    ledger = Ledger(realm.ledger_path)
    try:
        steps = [(s["global_step"], tuple(json.loads(s["examples_json"])), s["loss"], s["grad_norm"],
                  s["tokens_per_second"]) for s in ledger.steps()]
    finally:
        ledger.close()
    return {"processes": processes, "wall_s": wall, "steps": steps,
            "tokens_per_second": median([s[4] for s in steps[1:]])}


def max_rel_diff(a: list[tuple], b: list[tuple]) -> float:
    if [s[:2] for s in a] != [s[:2] for s in b]:
        raise SystemExit("the runs trained different examples at some global step")
    return max(max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for k in (2, 3)) for x, y in zip(a, b, strict=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 repeat each, a shorter quest")
    a = p.parse_args()
    require(STORIES260K)
    require(GSM8K)
    repeats, examples = (1, 96) if a.quick else (3, 240)
    work = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    # (label, processes, OMP threads per process): torchrun gives each rank 1 thread, so "1 process, 1
    # thread" separates the effect of the thread count from the effect of the processes
    configs = [("1", 1, None), ("1, 1 thread", 1, 1), (str(a.processes), a.processes, None)]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    try:
        for r in range(repeats):
            for label, n, threads in configs:
                runs[label].append(run(work, f"n{n}-{threads}-{r}", n, examples, threads))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    diff = max(max_rel_diff(runs["1"][0]["steps"], x["steps"]) for rs in runs.values() for x in rs)
    base = median([x["tokens_per_second"] for x in runs["1"]])
    rows = [{"processes": label, "tokens_per_second": median([x["tokens_per_second"] for x in rs]),
             "wall_s": median([x["wall_s"] for x in rs]), "steps": len(rs[0]["steps"])} for label, rs in runs.items()]
    for row in rows:
        row["ratio"] = row["tokens_per_second"] / base
    print_table(rows, [("processes", "processes", ""), ("steps", "steps", ""),
                       ("tokens_per_second", "tokens/s", ".0f"), ("ratio", "vs 1", ".2f"), ("wall_s", "wall s", ".1f")])
    print(f"same examples at every global step; max relative difference of loss / grad norm: {diff:.2e}")
    emit_json({"bench": "data_parallel", "machine": machine(), "examples": examples, "training": TRAINING,
               "runs": [{k: v for k, v in row.items()} for row in rows], "max_rel_diff": diff}, "data_parallel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
