"""Checkpoints and restarts on ../shared/models/stories260K: save and restore time, SIGKILL -> training again.

    .venv/bin/python bench/restart.py           # 5 saves/restores, 3 kill/restart cycles
    .venv/bin/python bench/restart.py --quick   # 3 saves/restores, 2 cycles

1. **Save / restore** (in this process): :meth:`core.engine.Engine.save_checkpoint` (HF safetensors,
   tokenizer, optimizer + scheduler + RNG, trainer state JSON, fsync, atomic rename) and a fresh
   :meth:`core.engine.Engine.setup` that resumes from it (model, tokenizer, optimizer, scheduler, RNG,
   ledger rollback); medians.
2. **SIGKILL -> training again**: a daemon process (``python -m training --realm R daemon``) trains a GSM8K
   quest with ``save_steps`` 5; after a checkpoint it is killed with SIGKILL mid-quest and started again at
   once (as the supervisor does, minus its back-off); the time from the kill to the next optimizer step's
   ledger row, and the steps lost (global step at the kill minus the checkpoint's: at most one save
   interval) are reported, with the new process's own phases (interpreter + imports, setup).

Prints a table and one JSON line (also bench/out/restart.json).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    GSM8K,
    PYTHON,
    ROOT,
    STORIES260K,
    emit_json,
    gsm8k_jsonl,
    machine,
    median,
    print_table,
    require,  # noqa: E402
)

from core.realm import init_realm  # noqa: E402

TRAINING = {"save_steps": 5, "eval_steps": 0, "eval_holdout_every": 0, "max_length": 512, "micro_batch_size": 8}


def save_restore(work: Path, repeats: int) -> dict:
    from core.engine import Engine
    from core.formats import iter_valid_records
    from core.ledger import Ledger
    from core.quest_queue import QuestQueue

    realm = init_realm(work / "save", base_model=str(STORIES260K), overrides={"training": TRAINING})
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    src = realm.root / "q.jsonl"
    src.write_text(gsm8k_jsonl(40), encoding="utf-8")
    qq = QuestQueue(realm, ledger)
    qid = qq.admit(src, "normal")
    path = qq.path_of(ledger.get_quest(qid))
    engine = Engine(realm, config, ledger)
    engine.setup()
    records = list(iter_valid_records(path, "q.jsonl", config.validation))
    calls = []

    def four_steps() -> bool:
        calls.append(1)
        return len(calls) > 4

    engine.train_quest(qid, records, should_stop=four_steps)
    saves = []
    for _ in range(repeats):
        t = time.perf_counter()
        ckpt = engine.save_checkpoint("bench")
        saves.append(time.perf_counter() - t)
    size = sum(f.stat().st_size for f in Path(ckpt).iterdir())
    engine.cleanup()
    restores = []
    for _ in range(repeats):
        e = Engine(realm, config, ledger)
        t = time.perf_counter()
        e.setup()
        restores.append(time.perf_counter() - t)
        e.cleanup()
    ledger.close()
    return {"save_s": saves, "restore_s": restores, "checkpoint_bytes": size}


class Daemon:
    def __init__(self, root: Path, log: Path):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        env.pop("REALM_HOME", None)
        self.log = open(log, "a")
        self.started = time.time()
        self.proc = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(root), "daemon"], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)


def kill_restart(work: Path, cycles: int) -> list[dict]:
    from core import checkpoint_layout as ckpt
    from core.ledger import Ledger

    realm = init_realm(work / "kill", base_model=str(STORIES260K), overrides={"training": TRAINING})
    (realm.inbox / "gsm8k.jsonl").write_text(gsm8k_jsonl(3000), encoding="utf-8")
    log = realm.root / "bench-daemon.log"
    d = Daemon(realm.root, log)
    out = []
    ledger = None
    try:
        for _ in range(cycles):
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:  # train past a checkpoint and two more steps
                if ledger is None and realm.ledger_path.exists():
                    ledger = Ledger(realm.ledger_path)
                last = ckpt.latest_checkpoint(realm.checkpoints_dir("hero"))
                step = (ledger.last_step() or {}).get("global_step", 0) if ledger else 0
                if last is not None and step >= ckpt.step_of(last) + 2:
                    break
                time.sleep(0.05)
            step_at_kill = ledger.last_step()["global_step"]
            d.proc.send_signal(signal.SIGKILL)
            killed = time.time()
            d.proc.wait()
            saved = ckpt.step_of(ckpt.latest_checkpoint(realm.checkpoints_dir("hero")))
            d = Daemon(realm.root, log)
            while True:  # the next step row written by the new process
                rows = ledger.query("SELECT global_step, time FROM steps WHERE time > ? ORDER BY global_step "
                                    "LIMIT 1", (killed,))
                if rows:
                    break
                if d.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited; see {log}")
                time.sleep(0.02)
            loaded = [e["time"] for e in ledger.query("SELECT time FROM events WHERE kind = 'hero_loaded' AND "
                                                      "time > ? ORDER BY id LIMIT 1", (killed,))]
            started = [e["time"] for e in ledger.query("SELECT time FROM events WHERE kind = 'daemon_started' "
                                                       "AND time > ? ORDER BY id LIMIT 1", (killed,))]
            out.append({"kill_to_step_s": rows[0]["time"] - killed, "steps_lost": step_at_kill - saved,
                        "save_steps": TRAINING["save_steps"], "resumed_at_step": rows[0]["global_step"] - 1,
                        "kill_to_hero_loaded_s": loaded[0] - killed if loaded else None,
                        "kill_to_daemon_started_s": started[0] - killed if started else None})
            print(f"  cycle {len(out)}: {out[-1]['kill_to_step_s']:.2f} s, {out[-1]['steps_lost']} steps lost",
                  flush=True)
    finally:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                d.proc.kill()
        if ledger is not None:
            ledger.close()
    return out


def import_seconds() -> float:
    """A fresh interpreter importing what the daemon imports before it can train (torch, transformers)."""
    code = "import time; t=time.time(); import torch, transformers, accelerate; from core.engine import Engine; " \
           "print(time.time()-t)"
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)
    return float(re.findall(r"[\d.]+", proc.stdout)[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 saves/restores and 2 kill/restart cycles")
    a = p.parse_args()
    require(STORIES260K)
    require(GSM8K)
    repeats, cycles = (3, 2) if a.quick else (5, 3)
    work = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    try:
        sr = save_restore(work, repeats)
        kills = kill_restart(work, cycles)
        imports = import_seconds()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    k2s = [k["kill_to_step_s"] for k in kills]
    loaded = [k["kill_to_hero_loaded_s"] for k in kills if k["kill_to_hero_loaded_s"] is not None]
    rows = [
        {"what": "checkpoint save (stories260K, model + optimizer + RNG, fsync)", "median_s": median(sr["save_s"]),
         "max_s": max(sr["save_s"]), "target": "-"},
        {"what": "restore (Engine.setup from the checkpoint)", "median_s": median(sr["restore_s"]),
         "max_s": max(sr["restore_s"]), "target": "-"},
        {"what": "SIGKILL -> next optimizer step (restart at once)", "median_s": median(k2s), "max_s": max(k2s),
         "target": "<= 10 s"},
        {"what": "  of which: SIGKILL -> new process up, hero restored", "median_s": median(loaded),
         "max_s": max(loaded), "target": "-"},
    ]
    print_table(rows, [("what", "what", ""), ("median_s", "median s", ".2f"), ("max_s", "max s", ".2f"),
                       ("target", "target", "")])
    lost = max(k["steps_lost"] for k in kills)
    print(f"steps lost per kill: {[k['steps_lost'] for k in kills]} (save_steps {TRAINING['save_steps']}); "
          f"checkpoint {sr['checkpoint_bytes'] / 1e6:.1f} MB")
    emit_json({"bench": "restart", "machine": machine(), "save_restore": sr, "kills": kills,
               "import_seconds": imports,
               "targets": {"kill_to_step": {"value": round(median(k2s), 3), "target": 10.0, "met": max(k2s) <= 10.0},
                           "steps_lost": {"value": lost, "target": TRAINING["save_steps"],
                                          "met": lost <= TRAINING["save_steps"]}}}, "restart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
