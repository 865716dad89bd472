"""Soak: random SIGKILLs of the daemon under the supervisor during a multi-quest run on stories260K.

    .venv/bin/python bench/soak.py [--kills 20] [--shakespeare-chars N] [--gsm8k-lines N] [--seed S]

Two realms get the same quests (tiny Shakespeare cut into text quests, GSM8K mapped with field_map):

- *reference*: ``python -m training daemon --until-idle``, uninterrupted;
- *soak*: ``python -m training start-all --no-tavern`` (the supervisor), then ``--kills`` times: wait until
  the restarted daemon has trained at least one new step, wait a random 0-3 s, SIGKILL it (the
  supervisor restarts it); finally wait until every quest is completed and ``stop-all``.

Checks (each printed, exit 1 when one fails): 0 quests lost (all completed), no example trained twice
and none skipped (each quest's trained line numbers equal the reference's, each once), the ledger's
global steps are 1..N without a gap, the global step at each daemon start never decreases, and the final
global step equals the reference's. Writes ``bench/out/soak.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PYTHON, ROOT, STORIES260K, emit_json, require  # noqa: E402 (puts ROOT on sys.path)

sys.path.insert(0, str(ROOT / "scripts"))

from shared_quests import GSM8K_FIELD_MAP, write_shared_quests  # noqa: E402

from core.ledger import Ledger  # noqa: E402
from core.realm import Realm, init_realm  # noqa: E402
from safety.processes import alive, read_pid  # noqa: E402

OVERRIDES = {
    "validation": {"field_map": GSM8K_FIELD_MAP},
    "training": {"max_length": 256, "micro_batch_size": 4, "save_steps": 5, "eval_steps": 0},
    "supervisor": {"max_restarts": 1000, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 2},
    "ingest": {"settle_seconds": 0.3, "poll_interval_seconds": 0.5},
}


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e.pop("REALM_HOME", None)
    return e


def cli(realm: Realm, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), *args], capture_output=True,
                          text=True, timeout=timeout, env=env(), cwd=ROOT)


def trained(realm: Realm) -> dict:
    """Per quest name: trained line numbers (in order); plus the global steps and quest states."""
    ledger = Ledger(realm.ledger_path)
    try:
        names = {q["id"]: q["name"] for q in ledger.list_quests()}
        per_quest: dict[str, list[int]] = {}
        steps = []
        for row in ledger.steps():
            steps.append(row["global_step"])
            per_quest.setdefault(names[row["quest_id"]], []).extend(json.loads(row["examples_json"]))
        starts = [json.loads(e["data"] or "{}").get("global_step") for e in ledger.events(limit=10**6)
                  if e["kind"] == "daemon_started"]
        states = {q["name"]: q["state"] for q in ledger.list_quests()}
    finally:
        ledger.close()
    return {"lines": per_quest, "steps": steps, "starts": starts, "states": states}


def last_step(realm: Realm) -> int:
    if not realm.ledger_path.exists():
        return 0
    ledger = Ledger(realm.ledger_path)
    try:
        row = ledger.last_step()
        return row["global_step"] if row else 0
    finally:
        ledger.close()


def all_done(realm: Realm, n_files: int) -> bool:
    """Every dropped file is a quest in the ledger and none is waiting, validating or training."""
    if not realm.ledger_path.exists():
        return False
    ledger = Ledger(realm.ledger_path)
    try:
        counts = ledger.queue_counts()
    finally:
        ledger.close()
    pending = counts["validating"] + counts["queued"] + counts["processing"]
    return sum(counts.values()) >= n_files and pending == 0


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--shakespeare-chars", type=int, default=None)
    p.add_argument("--gsm8k-lines", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    require(STORIES260K)
    rng = random.Random(a.seed)
    base = Path(tempfile.mkdtemp(prefix="realm-soak-"))
    realms = {}
    for name in ("reference", "soak"):
        realms[name] = init_realm(base / name, base_model=str(STORIES260K), overrides=OVERRIDES)
        n_files = len(write_shared_quests(realms[name].inbox, shakespeare_chars=a.shakespeare_chars,
                                          gsm8k_lines=a.gsm8k_lines, quests=3, hh_rlhf=False))

    t0 = time.time()
    ref = cli(realms["reference"], "daemon", "--until-idle", timeout=3600)
    if ref.returncode != 0:
        print(ref.stderr[-3000:])
        return 1
    reference_seconds = time.time() - t0
    expected = trained(realms["reference"])
    print(f"reference: {len(expected['steps'])} steps in {reference_seconds:.0f} s")

    soak = realms["soak"]
    t0 = time.time()
    started = cli(soak, "start-all", "--no-tavern")
    if started.returncode != 0:
        print(started.stdout + started.stderr)
        return 1
    kills = []
    try:
        for k in range(a.kills):
            pid = wait_for(lambda: (p := read_pid(soak, "daemon")) and alive(p) and p, 120, "a daemon")
            before = last_step(soak)
            wait_for(lambda b=before: last_step(soak) > b or all_done(soak, n_files), 600, "a new step")
            if all_done(soak, n_files):
                break
            time.sleep(rng.uniform(0, 3))
            if read_pid(soak, "daemon") != pid or not alive(pid):
                continue
            step = last_step(soak)
            os.kill(pid, signal.SIGKILL)
            kills.append({"kill": k + 1, "pid": pid, "global_step": step, "seconds": round(time.time() - t0, 1)})
            print(f"kill {k + 1}: pid {pid} at global step {step}")
            wait_for(lambda old=pid: read_pid(soak, "daemon") not in (None, old), 120, "a restart")
        wait_for(lambda: all_done(soak, n_files), 3600, "every quest done")
    finally:
        stopped = cli(soak, "stop-all", "--timeout", "120")
        print(stopped.stdout.strip())
    got = trained(soak)

    checks = {
        "all_quests_completed": set(got["states"].values()) == {"completed"},
        "same_examples_each_once": got["lines"] == expected["lines"]
        and all(len(v) == len(set(v)) for v in got["lines"].values()),
        "steps_contiguous": got["steps"] == list(range(1, len(got["steps"]) + 1)),
        "start_steps_monotonic": all(x <= y for x, y in zip(got["starts"], got["starts"][1:], strict=False)),
        "final_global_step_equal": (got["steps"] or [0])[-1] == (expected["steps"] or [0])[-1],
    }
    for name, ok in checks.items():
        print(f"{'ok ' if ok else 'FAIL'} {name}")
    emit_json({"kills": len(kills), "kill_log": kills, "reference_steps": len(expected["steps"]),
               "soak_steps": len(got["steps"]), "daemon_starts": len(got["starts"]), "checks": checks,
               "quests": got["states"], "soak_seconds": round(time.time() - t0, 1),
               "reference_seconds": round(reference_seconds, 1), "realms": str(base)}, "soak")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
