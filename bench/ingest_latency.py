"""Ingest latency of a real daemon process: a file closed in inbox/ -> queued, and -> first optimizer step.

    .venv/bin/python bench/ingest_latency.py            # 100 files + 5 drops on an idle daemon
    .venv/bin/python bench/ingest_latency.py --quick    # 20 files + 3 drops
    .venv/bin/python bench/ingest_latency.py --polling  # the same with the polling fallback (no inotify)

Realms on ../shared/models/stories260K with the default config (``ingest.settle_seconds`` 1.0,
``poll_interval_seconds`` 2.0), each daemon started with ``python -m training --realm R daemon``.

1. **closed -> queued**: the daemon is paused through the control channel (so nothing trains), then files
   of 16 GSM8K prompt/completion records are written one at a time (open, write, close); the latency is the
   ledger's ``quest_queued`` event time minus the time the writer closed the file (one clock), median and
   p95.
2. **closed -> first optimizer step** on an idle daemon with the model loaded: a second daemon, idle;
   a quest is dropped, and the latency is its first ``steps`` row's time (written after that step's update)
   minus the close time; then the quest is left to finish (evaluation, checkpoint) and the daemon to go idle
   before the next drop.

Prints a table and one JSON line (also bench/out/ingest_latency.json).
"""

from __future__ import annotations

import argparse
import os
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
    percentile,
    print_table,
    require,  # noqa: E402
)

from core.ledger import Ledger  # noqa: E402
from core.realm import init_realm  # noqa: E402

RECORDS_PER_FILE = 16


class DaemonProcess:
    """``python -m training --realm R daemon`` as a child process, stopped with SIGTERM (by its pid)."""

    def __init__(self, realm_root: Path):
        self.root = realm_root
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        env.pop("REALM_HOME", None)
        self.log = open(realm_root / "bench-daemon.log", "w")
        self.proc = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm_root), "daemon"], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ledger: Ledger | None = None

    def wait_state(self, state: str, timeout: float = 180.0) -> float:
        """Wait until the daemon reports ``state``; returns the seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log.name}")
            if self.ledger is None and (self.root / "ledger.sqlite").exists():
                self.ledger = Ledger(self.root / "ledger.sqlite")
            if self.ledger is not None and (self.ledger.get_value("daemon") or {}).get("state") == state:
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"daemon not {state} after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.ledger is not None:
            self.ledger.close()
        self.log.close()


def quest_lines(k: int) -> str:
    """RECORDS_PER_FILE GSM8K records as prompt/completion, distinct per ``k`` (no duplicate skipping)."""
    return gsm8k_jsonl(RECORDS_PER_FILE, offset=k * RECORDS_PER_FILE)


def drop(realm_root: Path, name: str, text: str) -> float:
    """Write ``inbox/name`` (open, write, close) and return the close time (``time.time()``)."""
    with open(realm_root / "inbox" / name, "w", encoding="utf-8") as f:
        f.write(text)
    return time.time()


def wait_row(ledger: Ledger, sql: str, params: tuple, timeout: float = 120.0) -> dict:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        rows = ledger.query(sql, params)
        if rows:
            return rows[0]
        time.sleep(0.01)
    raise TimeoutError(f"no row for {sql} {params}")


def queued_latencies(root: Path, files: int) -> list[float]:
    d = DaemonProcess(root)
    try:
        d.wait_state("idle")
        d.ledger.send_command("pause")
        d.wait_state("paused")
        out = []
        for k in range(files):
            name = f"quest-{k:03d}.jsonl"
            closed = drop(root, name, quest_lines(k))
            row = wait_row(d.ledger, "SELECT e.time FROM events e JOIN quests q ON q.id = json_extract(e.data, "
                           "'$.quest_id') WHERE e.kind = 'quest_queued' AND q.name = ?", (name,))
            out.append(row["time"] - closed)
        return out
    finally:
        d.stop()


def first_step_latencies(root: Path, drops: int, offset: int) -> list[dict]:
    d = DaemonProcess(root)
    try:
        d.wait_state("idle")
        time.sleep(1.0)  # idle and warm
        out = []
        for k in range(drops):
            name = f"drop-{k:03d}.jsonl"
            closed = drop(root, name, quest_lines(offset + k))
            q = wait_row(d.ledger, "SELECT id FROM quests WHERE name = ?", (name,))
            step = wait_row(d.ledger, "SELECT time FROM steps WHERE quest_id = ? ORDER BY global_step LIMIT 1",
                            (q["id"],))
            queued = wait_row(d.ledger, "SELECT time FROM events WHERE kind = 'quest_queued' AND "
                              "json_extract(data, '$.quest_id') = ?", (q["id"],))
            out.append({"queued_s": queued["time"] - closed, "first_step_s": step["time"] - closed})
            wait_row(d.ledger, "SELECT id FROM quests WHERE id = ? AND state = 'completed'", (q["id"],), 300)
            d.wait_state("idle")
            time.sleep(1.0)
        return out
    finally:
        d.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 files and 3 drops")
    p.add_argument("--files", type=int, help="files for closed -> queued (default 100, quick 20)")
    p.add_argument("--drops", type=int, help="drops for closed -> first step (default 5, quick 3)")
    p.add_argument("--keep", action="store_true", help="keep the realms (and daemon logs) for inspection")
    p.add_argument("--polling", action="store_true", help="force the polling observer (no inotify events)")
    a = p.parse_args()
    require(STORIES260K)
    require(GSM8K)
    files = a.files or (20 if a.quick else 100)
    drops = a.drops or (3 if a.quick else 5)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    print(f"realms under {work} (removed at the end unless --keep)", flush=True)
    overrides = {"ingest": {"use_polling": True}} if a.polling else None
    try:
        r1 = init_realm(work / "queued", base_model=str(STORIES260K), overrides=overrides)
        queued = queued_latencies(r1.root, files)
        r2 = init_realm(work / "first-step", base_model=str(STORIES260K), overrides=overrides)
        steps = first_step_latencies(r2.root, drops, offset=files)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    first = [s["first_step_s"] for s in steps]
    rows = [
        {"what": "closed -> queued", "n": len(queued), "median": median(queued), "p95": percentile(queued, 95),
         "max": max(queued), "target": "median <= 0.5 s"},
        {"what": "closed -> first optimizer step (idle warm daemon)", "n": len(first), "median": median(first),
         "p95": percentile(first, 95), "max": max(first), "target": "<= 2 s"},
    ]
    print_table(rows, [("what", "latency", ""), ("n", "n", ""), ("median", "median s", ".3f"),
                       ("p95", "p95 s", ".3f"), ("max", "max s", ".3f"), ("target", "target", "")])
    emit_json({"bench": "ingest_latency", "mode": "polling" if a.polling else "events", "machine": machine(),
               "records_per_file": RECORDS_PER_FILE, "queued_s": [round(x, 4) for x in queued],
               "first_step": [{k: round(v, 4) for k, v in s.items()} for s in steps],
               "queued_median_s": round(median(queued), 4), "queued_p95_s": round(percentile(queued, 95), 4),
               "first_step_median_s": round(median(first), 4),
               "targets": {"queued_median": {"value": round(median(queued), 4), "target": 0.5,
                                             "met": median(queued) <= 0.5},
                           "first_step": {"value": round(max(first), 4), "target": 2.0, "met": max(first) <= 2.0}}},
              "ingest_latency")
    return 0


if __name__ == "__main__":
    sys.exit(main())
