"""Chart history at scale: /api/history latency at several zooms on a 10,000,000-step ledger, rollups vs the
full scan it replaced, and what the ledger costs per step on disk.

    .venv/bin/python bench/ledger_history.py            # 10M steps (~3 GB free in the temp dir, a few minutes)
    .venv/bin/python bench/ledger_history.py --quick    # 1M steps

Builds a realm in a temp dir with ``Ledger.bulk_record_steps`` (the fast bulk path: one transaction, rollups
recomputed set-based) — realistic rows: a decaying noisy loss, a learning rate, 8 example line numbers per
step — plus one eval every 100 steps (``record_eval``). Then, for each zoom (whole history at the API's maximum (4,096) and at
1,500 points, then 1M, 100k, 16,384, 10k and 1k steps at random places, 1,500 points as the Tavern asks),
the median and max over repeats of:

- ``ledger``: ``Ledger.history`` + ``history_bounds`` (what /api/history runs);
- ``api``: ``GET /api/history`` through the Tavern app (Flask test client, JSON included);
- ``full scan``: the pre-rollup query (``AVG ... GROUP BY (global_step - lo) / bucket`` over ``steps`` and
  ``evals``) — the baseline, measured in the same run.

Also: ``record_step`` latency with the rollups against the same transaction without them, and the bytes
per step on disk (the whole file after a WAL checkpoint, and per table when SQLite's ``dbstat`` is there).
Prints tables and one JSON line (also bench/out/ledger_history.json).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json, machine, median, print_table  # noqa: E402

from core.ledger import Ledger, StepRow  # noqa: E402
from core.realm import Realm  # noqa: E402
from tavern.api import MAX_HISTORY_POINTS  # noqa: E402

EVAL_EVERY_STEPS = 100
EXAMPLES_PER_STEP = 8
MAX_POINTS = 1500  # what the Tavern's home page asks for


def rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    t0 = 1.7e9
    for s in range(1, n + 1):
        start = (s - 1) * EXAMPLES_PER_STEP
        yield StepRow(global_step=s, quest_id=1 + s // 100_000, time=t0 + 0.5 * s,
                      loss=1.0 + 3.0 * math.exp(-s / 2e6) + 0.2 * rng.random(), learning_rate=3e-4,
                      grad_norm=0.5 + rng.random(), tokens=4096, tokens_per_second=8192.0 + rng.random(),
                      example_start=start % 100_000, example_end=start % 100_000 + EXAMPLES_PER_STEP,
                      example_lines=list(range(start % 100_000 + 1, start % 100_000 + 1 + EXAMPLES_PER_STEP)))


def build(path: Path, n: int) -> dict:
    ledger = Ledger(path)
    t = time.perf_counter()
    ledger.bulk_record_steps(rows(n))
    steps_seconds = time.perf_counter() - t
    t = time.perf_counter()
    rng = random.Random(1)
    for s in range(EVAL_EVERY_STEPS, n + 1, EVAL_EVERY_STEPS):
        ledger.record_eval(s, 1 + s // 100_000, 1.2 + 3.0 * math.exp(-s / 2e6) + 0.1 * rng.random(), 64)
    evals_seconds = time.perf_counter() - t
    ledger.close()
    return {"bulk_steps_seconds": steps_seconds, "evals_seconds": evals_seconds}


def full_scan(conn: sqlite3.Connection, lo: int | None, hi: int | None, max_points: int) -> int:
    """The /api/history queries before rollups (tavern/api.py ``downsample``), as they were."""
    b = conn.execute("SELECT MIN(global_step), MAX(global_step) FROM steps").fetchone()
    e = conn.execute("SELECT MIN(global_step), MAX(global_step) FROM evals").fetchone()
    lo = min(x for x in (b[0], e[0]) if x is not None) if lo is None else lo
    hi = max(x for x in (b[1], e[1]) if x is not None) if hi is None else hi
    bucket = max(1, math.ceil(max(1, hi - lo + 1) / max_points))
    train = conn.execute("SELECT AVG(global_step) AS global_step, AVG(loss) AS loss, MIN(loss) AS loss_min, "
                         "MAX(loss) AS loss_max, AVG(learning_rate) AS learning_rate FROM steps "
                         "WHERE global_step BETWEEN ? AND ? GROUP BY (global_step - ?) / ? ORDER BY 1",
                         (lo, hi, lo, bucket)).fetchall()
    evals = conn.execute("SELECT AVG(global_step) AS global_step, AVG(eval_loss) AS eval_loss FROM evals "
                         "WHERE global_step BETWEEN ? AND ? GROUP BY (global_step - ?) / ? ORDER BY 1",
                         (lo, hi, lo, bucket)).fetchall()
    return len(train) + len(evals)


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return median(times), max(times)


def record_step_cost(tmp: Path, n: int = 3000) -> dict:
    """Median µs of ``Ledger.record_step`` (rollups included) vs the same insert + quest update alone."""
    ledger = Ledger(tmp / "record.sqlite")
    with ledger.transaction() as c:
        c.execute("INSERT INTO quests(name, stored_name, state, priority, created_at, updated_at) "
                  "VALUES ('q', 'q', 'processing', 'normal', 0, 0)")
    with_rollups, without = [], []
    for s in range(1, 2 * n + 1, 2):
        t = time.perf_counter()
        ledger.record_step(global_step=s, quest_id=1, loss=1.0 / s, learning_rate=1e-4, grad_norm=1.0, tokens=10,
                           tokens_per_second=1.0, example_start=s, example_end=s + 8,
                           example_lines=list(range(s, s + 8)), quest_steps=s)
        with_rollups.append(time.perf_counter() - t)
        t = time.perf_counter()
        with ledger.transaction() as c:  # record_step before rollups existed
            c.execute("INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                      (s + 1, 1, time.time(), 1.0 / s, 1e-4, 1.0, 10, 1.0, s, s + 8, json.dumps(list(range(s, s + 8)))))
            c.execute("UPDATE quests SET examples_trained=?, steps=?, last_global_step=?, first_global_step="
                      "COALESCE(first_global_step, ?), updated_at=? WHERE id=?", (s + 8, s, s + 1, s + 1, time.time(), 1))
        without.append(time.perf_counter() - t)
    ledger.close()
    return {"record_step_us": 1e6 * median(with_rollups), "record_step_without_rollups_us": 1e6 * median(without)}


def disk_usage(path: Path, steps: int) -> dict:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    out = {"file_bytes": path.stat().st_size, "bytes_per_step": path.stat().st_size / steps}
    try:
        tables = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
    except sqlite3.OperationalError:  # SQLite built without dbstat
        tables = {}
    if tables:
        evals = tables.pop("evals", 0) + tables.pop("sqlite_autoindex_evals_1", 0)
        out.update({"bytes_per_step[steps]": tables.pop("steps", 0) / steps,
                    "bytes_per_step[rollups]": tables.pop("rollups", 0) / steps,
                    "bytes_per_step[evals, 1 per 100 steps]": evals / steps,
                    "bytes_per_step[other tables]": sum(tables.values()) / steps})
    conn.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10_000_000)
    ap.add_argument("--quick", action="store_true", help="1,000,000 steps")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline-repeats", type=int, default=3)
    args = ap.parse_args()
    n = 1_000_000 if args.quick else args.steps
    from tavern.app import close_app, create_app

    with tempfile.TemporaryDirectory(prefix="ledger-history-") as tmp:
        realm = Realm(Path(tmp) / "realm")
        realm.ensure_layout()
        print(f"building a {n:,}-step ledger in {realm.ledger_path} ...", flush=True)
        built = build(realm.ledger_path, n)
        print(f"built: steps {built['bulk_steps_seconds']:.1f} s, evals {built['evals_seconds']:.1f} s", flush=True)
        disk = disk_usage(realm.ledger_path, n)
        ledger = Ledger(realm.ledger_path)
        app = create_app(realm, testing=True)
        client = app.test_client()
        raw = sqlite3.connect(realm.ledger_path)
        rng = random.Random(2)
        zooms = [("whole", None, MAX_HISTORY_POINTS), ("whole", None, MAX_POINTS), ("1M", 1_000_000, MAX_POINTS),
                 ("100k", 100_000, MAX_POINTS), ("16,384", 16_384, MAX_POINTS), ("10k", 10_000, MAX_POINTS),
                 ("1k", 1_000, MAX_POINTS)]
        results = []
        for label, span, points in zooms:
            if span is not None and span >= n:
                continue
            lo = None if span is None else rng.randrange(1, n - span)
            hi = None if span is None else lo + span - 1

            def new(lo=lo, hi=hi, points=points):
                b = ledger.history_bounds()
                a, z = (b.first_step, b.last_step) if lo is None else (lo, hi)
                return ledger.history(a, z, points)

            query = f"/api/history?max_points={points}" + ("" if lo is None else f"&from_step={lo}&to_step={hi}")

            def api(query=query):
                r = client.get(query)
                assert r.status_code == 200, r.get_data(as_text=True)
                return r

            h = new()
            ledger_ms, ledger_max = timed(new, args.repeats)
            api_ms, _ = timed(api, args.repeats)
            scan_ms, _ = timed(lambda lo=lo, hi=hi, points=points: full_scan(raw, lo, hi, points),
                               args.baseline_repeats)
            results.append({"zoom": label, "from_step": h.from_step, "to_step": h.to_step, "max_points": points,
                            "bucket_steps": h.bucket_steps, "points": len(h.train["global_step"]),
                            "ledger_ms": ledger_ms, "ledger_max_ms": ledger_max, "api_ms": api_ms,
                            "full_scan_ms": scan_ms, "speedup": scan_ms / ledger_ms})
            print(f"  {label:>7} ({points} points): {ledger_ms:.1f} ms (api {api_ms:.1f} ms), full scan "
                  f"{scan_ms:.1f} ms", flush=True)
        raw.close()
        close_app(app)
        ledger.close()
        cost = record_step_cost(Path(tmp))
    print()
    print_table(results, [("zoom", "zoom", ""), ("max_points", "max_points", "d"),
                          ("bucket_steps", "bucket_steps", "d"), ("points", "points", "d"),
                          ("ledger_ms", "history ms (median)", ".1f"), ("ledger_max_ms", "max ms", ".1f"),
                          ("api_ms", "GET /api/history ms", ".1f"), ("full_scan_ms", "full scan ms", ".1f"),
                          ("speedup", "x faster", ".0f")])
    print()
    for k, v in {**disk, **cost}.items():
        print(f"{k:>40}: {v:,.1f}")
    emit_json({"bench": "ledger_history", "steps": n, "evals": n // EVAL_EVERY_STEPS, **built, **disk, **cost,
               "zooms": results, "machine": machine()}, "ledger_history")


if __name__ == "__main__":
    main()
