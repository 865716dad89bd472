"""How fast does a newborn hero earn BIN levels? SFT rounds through the real daemon, trials between them.

    .venv/bin/python bench/skills_learnability.py                      # micro hero, default training config
    .venv/bin/python bench/skills_learnability.py --size nano --learning-rate 1e-3 --target-level 4
    .venv/bin/python bench/skills_learnability.py --threads 1         # OMP_NUM_THREADS=1 for the daemon

A fresh realm with the embedded default hero. Each round writes a quest of ``--items`` BIN training items
(uniform over levels 0..L+1, L the hero's level: the current level, the next one, and the lower ones
against forgetting) into the inbox with :mod:`core.skills.quests`, runs ``python -m training daemon
--until-idle`` (a real process), then loads the round's last checkpoint and runs 50-item trials at levels
0-3 (measurement) and promotion trials at the hero's level, recorded in the ledger (promoted again on the
same checkpoint while it keeps passing). Stops at ``--target-level`` or after ``--budget-minutes``.

Prints a table per round (global step, cumulative seconds, accuracy per level, level) and one JSON line
(also bench/out/skills_learnability.json).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PYTHON, ROOT, emit_json, machine, print_table  # noqa: E402

from core.checkpoint import latest_checkpoint, step_of  # noqa: E402
from core.ledger import Ledger  # noqa: E402
from core.realm import init_realm  # noqa: E402
from core.skills.binary import BinarySkill  # noqa: E402
from core.skills.quests import mixed_items, quest_file_name, quest_record, write_quest  # noqa: E402
from core.skills.trials import run_trial, trial_seed  # noqa: E402

MEASURE_LEVELS = (0, 1, 2, 3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="micro", choices=["nano", "micro", "tiny"])
    p.add_argument("--items", type=int, default=6000, help="items per round's quest")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the daemon and of this process")
    p.add_argument("--target-level", type=int, default=4)
    p.add_argument("--budget-minutes", type=float, default=15.0)
    p.add_argument("--realm", type=Path, help="a realm folder: new, or one of an earlier run to go on with")
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    training = {k: v for k, v in (("learning_rate", a.learning_rate), ("micro_batch_size", a.micro_batch_size),
                                  ("max_length", a.max_length)) if v is not None}
    root = a.realm or Path(tempfile.mkdtemp(prefix="realm-bin-"))
    realm = init_realm(root, overrides={"hero": {"default_size": a.size}, "training": training})
    config = realm.load_config()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    skill, hero = BinarySkill(), config.hero.name
    ledger = Ledger(realm.ledger_path)
    level = ledger.skill_level(hero, skill.name)  # 0 in a new realm
    rows, started, train_seconds, trial_seconds = [], time.monotonic(), 0.0, 0.0
    reached: dict[int, dict] = {}
    round_no = 0
    while level < a.target_level and time.monotonic() - started < a.budget_minutes * 60:
        round_no += 1
        levels = list(range(0, min(level + 1, skill.max_level) + 1))
        last = latest_checkpoint(realm.checkpoints_dir(hero))
        key = f"bench-{step_of(last) if last else 0}-{round_no}"  # unique when a run goes on in the same realm
        items = mixed_items(skill, levels, a.items, key)  # levels interleaved (the engine reads in file order)
        write_quest(realm.inbox / quest_file_name(skill.name, level, key), (quest_record(it) for it in items))
        t = time.monotonic()
        proc = subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon", "--until-idle"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        train_seconds += time.monotonic() - t
        if proc.returncode != 0:
            print(proc.stderr[-4000:])
            return 1
        ckpt = latest_checkpoint(realm.checkpoints_dir(hero))
        step = step_of(ckpt)
        from core.hero import load_model, load_tokenizer

        model, tokenizer = load_model(ckpt, config.hero), load_tokenizer(ckpt, config.hero)
        t = time.monotonic()
        row = {"round": round_no, "global_step": step, "levels_trained": f"{levels[0]}-{levels[-1]}"}
        for lv in MEASURE_LEVELS:
            r = run_trial(model, tokenizer, skill, lv, n=50, seed=trial_seed(hero, "BIN-measure", lv, step))
            row[f"acc_L{lv}"] = r.accuracy
        while level <= skill.max_level:  # promotion trials at the current level, recorded
            r = run_trial(model, tokenizer, skill, level, n=config.skills.trial_samples,
                          seed=trial_seed(hero, skill.name, level, step), batch_size=config.skills.trial_batch_size)
            rec = r.record(hero=hero, current_level=level, threshold=config.skills.promotion_threshold,
                           global_step=step, checkpoint=ckpt.name, sample_answers=config.skills.sample_answers)
            ledger.record_trial(rec)
            if not rec.promoted:
                break
            level = rec.level_after
            reached[level] = {"global_step": step, "seconds": round(time.monotonic() - started, 1),
                              "train_seconds": round(train_seconds, 1), "correct": r.correct, "n": r.n}
        trial_seconds += time.monotonic() - t
        row.update(level=level, seconds=time.monotonic() - started, train_seconds=train_seconds,
                   trial_seconds=trial_seconds)
        rows.append(row)
        print_table(rows[-1:], [(k, k, ".2f" if k.startswith("acc") else (".0f" if "seconds" in k else ""))
                                for k in row])
    print()
    print_table(rows, [("round", "round", ""), ("global_step", "step", ""), ("levels_trained", "trained", ""),
                       *((f"acc_L{lv}", f"acc L{lv}", ".2f") for lv in MEASURE_LEVELS), ("level", "level", ""),
                       ("seconds", "s total", ".0f"), ("train_seconds", "s daemon", ".0f"),
                       ("trial_seconds", "s trials", ".0f")])
    emit_json({"machine": machine(), "size": a.size, "items_per_round": a.items, "training": training,
               "threads": a.threads, "reached": reached, "rounds": rows, "realm": str(realm.root)},
              "skills_learnability")
    return 0


if __name__ == "__main__":
    sys.exit(main())
