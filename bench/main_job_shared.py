"""The main job end to end on real data, with the numbers: a realm on ../shared/models/stories260K,
tiny Shakespeare cut into text quests, GSM8K mapped with field_map, hh-rlhf (trained by the Judge, DPO).

    .venv/bin/python bench/main_job_shared.py [--realm DIR] [--shakespeare-chars N] [--gsm8k-lines N]

Runs ``python -m training daemon --until-idle`` in a real process and prints a table per quest (steps,
examples, held-out loss first -> last) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from shared_quests import GSM8K_FIELD_MAP, write_shared_quests  # noqa: E402

from core.ledger import Ledger  # noqa: E402
from core.realm import init_realm  # noqa: E402

STORIES = ROOT.parent / "shared" / "models" / "stories260K"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--realm", type=Path)
    p.add_argument("--shakespeare-chars", type=int)
    p.add_argument("--gsm8k-lines", type=int)
    a = p.parse_args()
    root = a.realm or Path(tempfile.mkdtemp(prefix="realm-stories-"))
    realm = init_realm(root, base_model=str(STORIES), overrides={"validation": {"field_map": GSM8K_FIELD_MAP}})
    write_shared_quests(realm.inbox, shakespeare_chars=a.shakespeare_chars, gsm8k_lines=a.gsm8k_lines)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "training", "--realm", str(realm.root), "daemon", "--until-idle"],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode != 0:
        print(proc.stderr[-5000:])
        return proc.returncode
    ledger = Ledger(realm.ledger_path)
    rows = []
    print(f"{'quest':28} {'state':10} {'format':20} {'examples':>9} {'steps':>6} {'heldout first':>14} "
          f"{'heldout last':>13}")
    for q in ledger.list_quests():
        ev = ledger.evals(q["id"])
        first, last = (ev[0]["eval_loss"], ev[-1]["eval_loss"]) if ev else (None, None)
        rows.append({"name": q["name"], "state": q["state"], "format": q["format"],
                     "examples_trained": q["examples_trained"], "steps": q["steps"],
                     "heldout_loss_first": first, "heldout_loss_last": last})
        print(f"{q['name']:28} {q['state']:10} {q['format'] or '-':20} {q['examples_trained']:>9} {q['steps']:>6} "
              f"{first if first is None else round(first, 4)!s:>14} {last if last is None else round(last, 4)!s:>13}")
    global_step = ledger.last_step()["global_step"]
    total = sum(r["steps"] for r in rows)
    print(f"global_step {global_step} = sum of quest steps {total}: {global_step == total}; {seconds:.0f} s")
    print(json.dumps({"realm": str(realm.root), "global_step": global_step, "sum_quest_steps": total,
                      "seconds": round(seconds, 1), "quests": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
