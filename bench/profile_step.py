"""Where an engine optimizer step spends its time: a torch.profiler table of one step.

    .venv/bin/python bench/profile_step.py                    # the `small` hero (~40M), GSM8K
    .venv/bin/python bench/profile_step.py --model tiny --rows 20

Trains the real :class:`core.engine.Engine` (as bench/throughput.py does) for one warm-up step, then
profiles the next optimizer step and prints the operators by self CPU time, grouped into matmuls
(``addmm``/``mm``/``bmm``/``linear``), attention (``scaled_dot_product``), the optimizer, and the rest,
plus one JSON line (also bench/out/profile_step.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import emit_json  # noqa: E402
from throughput import gsm8k_examples, materialize, model_specs  # noqa: E402

GROUPS = (("matmul", ("addmm", "aten::mm", "bmm", "linear", "matmul")),
          ("attention", ("scaled_dot_product", "_flash_attention", "attention")),
          ("optimizer", ("_foreach", "adamw", "Optimizer.step")),
          ("cross_entropy", ("cross_entropy", "log_softmax", "nll_loss")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", help="stories260K, micro, tiny or small")
    p.add_argument("--rows", type=int, default=25, help="operators listed")
    a = p.parse_args()
    from core.engine import Engine
    from core.ledger import Ledger
    from core.quest_queue import QuestQueue
    from core.realm import init_realm

    spec = next(s for s in model_specs(False, True) if s["name"] == a.model)
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    model_dir = materialize(spec, work)
    training = {"max_length": spec["max_length"], "micro_batch_size": spec["rows"], "eval_steps": 0,
                "eval_holdout_every": 0, "save_steps": 10 ** 6, "warmup_steps": 0}
    realm = init_realm(work / "realm", base_model=str(model_dir), overrides={"training": training})
    ledger = Ledger(realm.ledger_path)
    src = work / "q.jsonl"
    src.write_text("".join(__import__("json").dumps(e) + "\n" for e in gsm8k_examples(200)))
    qid = QuestQueue(realm, ledger).admit(src, "normal")
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    records = [(i + 1, e) for i, e in enumerate(gsm8k_examples(200))]
    calls = []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def should_stop() -> bool:
        calls.append(1)
        if len(calls) == 2:
            prof.__enter__()
        if len(calls) == 3:
            prof.__exit__(None, None, None)
            return True
        return False

    engine.train_quest(qid, records, should_stop=should_stop)
    engine.cleanup()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    groups = {name: 0.0 for name, _ in GROUPS}
    groups["other"] = 0.0
    for e in events:
        for name, keys in GROUPS:
            if any(k.lower() in e.key.lower() for k in keys):
                groups[name] += e.self_cpu_time_total
                break
        else:
            groups["other"] += e.self_cpu_time_total
    shares = {k: round(v / total, 4) for k, v in groups.items()}
    print("self CPU time by group: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    top = [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1), "calls": e.count}
           for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:a.rows]]
    emit_json({"bench": "profile_step", "model": a.model, "self_cpu_ms_total": round(total / 1000, 1),
               "groups": shares, "top": top}, "profile_step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
