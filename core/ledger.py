"""The SQLite ledger (WAL): quests, per-step metrics, evaluations, events, control commands, heartbeat.

One ledger per realm (``ledger.sqlite``). Every process (daemon, Tavern, CLI, supervisor) opens its own
:class:`Ledger`; SQLite's WAL mode lets readers run beside the daemon's writer. Quest *state* changes go
through :mod:`core.quest_queue` only; this module stores rows.

The ledger is an API: code outside ``core`` calls the typed methods below and never writes SQL (a test
in ``tests/test_repository.py`` enforces it). The kv keys, daemon states, liveness rule and ETA shared
between processes are in :mod:`core.contract`; the chart rollups of ``steps``/``evals`` in
:mod:`core.step_rollups`. Schema changes are additive (``CREATE ... IF NOT EXISTS``) plus numbered
:data:`MIGRATIONS` tracked in SQLite's ``user_version``, so a ledger of an older version opens and is
upgraded in place.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from core import step_rollups
from core.contract import (
    DAEMON_KEY,
    HEARTBEAT_STALE_SECONDS,
    SUPERVISOR_KEY,
    DaemonStatus,
    read_daemon_status,
)


class QuestState(str, Enum):
    """States of a quest (a dropped file). Changed only by :class:`core.quest_queue.QuestQueue`."""

    VALIDATING = "validating"
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    SKIPPED = "skipped"
    FAILED = "failed"
    REMOVED = "removed"


class CommandState(str, Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


SCHEMA = """
CREATE TABLE IF NOT EXISTS quests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,              -- the file name the user dropped
    stored_name TEXT NOT NULL,       -- name inside queue/ folders: <id>-<name>
    state TEXT NOT NULL,
    priority TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    content_hash TEXT,
    format TEXT,
    size_bytes INTEGER,
    records INTEGER,                 -- lines in the file
    bad_records INTEGER,
    examples_total INTEGER,          -- valid examples to train (excluding held-out)
    examples_trained INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER,                  -- tokens of the valid examples
    steps INTEGER NOT NULL DEFAULT 0,  -- optimizer steps spent on this quest
    first_global_step INTEGER,
    last_global_step INTEGER,
    report_path TEXT,
    note TEXT,
    error TEXT,
    deferred INTEGER NOT NULL DEFAULT 0,  -- 1 after a user skip: trained after the other queued quests
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS quests_state ON quests(state, priority, id);
CREATE INDEX IF NOT EXISTS quests_hash ON quests(content_hash);
CREATE TABLE IF NOT EXISTS steps (
    global_step INTEGER PRIMARY KEY,
    quest_id INTEGER,
    time REAL NOT NULL,
    loss REAL,
    learning_rate REAL,
    grad_norm REAL,
    tokens INTEGER,
    tokens_per_second REAL,
    example_start INTEGER,           -- examples [example_start, example_end) of the quest (indices into its
    example_end INTEGER,             -- train examples, file order) were consumed by this step
    examples_json TEXT               -- JSON list of line numbers (1-based) trained in this step
);
CREATE TABLE IF NOT EXISTS evals (
    global_step INTEGER NOT NULL,
    quest_id INTEGER,
    time REAL NOT NULL,
    eval_loss REAL NOT NULL,
    examples INTEGER NOT NULL,
    PRIMARY KEY (global_step, quest_id)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    level TEXT NOT NULL,             -- info | warning | error
    kind TEXT NOT NULL,              -- e.g. quest_queued, checkpoint_saved, crash
    message TEXT NOT NULL,
    data TEXT
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    command TEXT NOT NULL,           -- pause | resume | skip | stop
    args TEXT,
    state TEXT NOT NULL,
    result TEXT,
    handled_at REAL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
""" + step_rollups.SCHEMA + """
-- skills: promotion trials (see the "skills" section at the end of this module)
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    hero TEXT NOT NULL,
    skill TEXT NOT NULL,
    level INTEGER NOT NULL,          -- the level the items were drawn at
    level_after INTEGER NOT NULL,    -- the skill's level after this trial (level + 1 when promoted)
    n INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    accuracy REAL NOT NULL,
    lower_bound REAL NOT NULL,       -- Wilson 95% lower bound of the accuracy
    threshold REAL NOT NULL,
    promoted INTEGER NOT NULL,
    global_step INTEGER NOT NULL,    -- of the weights answering
    checkpoint TEXT,
    seed INTEGER NOT NULL,
    duration_seconds REAL NOT NULL,
    samples_json TEXT NOT NULL       -- [{prompt, expected, answer, correct}, ...]
);
CREATE INDEX IF NOT EXISTS trials_skill ON trials(hero, skill, id);
"""

QUEST_COLUMNS = (
    "id", "name", "stored_name", "state", "priority", "attempts", "content_hash", "format", "size_bytes",
    "records", "bad_records", "examples_total", "examples_trained", "tokens", "steps", "first_global_step",
    "last_global_step", "report_path", "note", "error", "deferred", "created_at", "updated_at", "started_at", "finished_at",
    "source_url", "source_sha256", "school",
)


INTEGRATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS downloads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL,               -- as the user gave it (http(s)://, hf://datasets/..., s3://, gs://)
    priority TEXT NOT NULL,
    state TEXT NOT NULL,             -- downloading | done | failed
    pid INTEGER,                     -- the downloading process
    part_path TEXT,                  -- the hidden .part file being written (absolute)
    path TEXT,                       -- the file published into the inbox (absolute), once done
    name TEXT,                       -- its file name
    sha256 TEXT,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER,             -- announced size, when known
    error TEXT,
    quest_id INTEGER,                -- the quest the daemon made of it (set at admission)
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS downloads_path ON downloads(path);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook TEXT NOT NULL,           -- key of the receiver (core.webhooks.webhook_key: a hash of its url)
    url TEXT NOT NULL,
    event_id INTEGER NOT NULL,       -- events.id
    event TEXT NOT NULL,             -- webhook event name (quest_completed, level_up, ...)
    state TEXT NOT NULL,             -- pending | delivered | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    status_code INTEGER,             -- HTTP status of the last attempt (NULL: no answer)
    error TEXT,                      -- why the last attempt failed
    next_attempt_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (webhook, event_id)
);
"""
FEEDBACK_SCHEMA = """
CREATE TABLE IF NOT EXISTS preferences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,              -- unix seconds
    kind TEXT NOT NULL,              -- rating | pair
    checkpoint TEXT NOT NULL,        -- checkpoint name that produced the answer(s), or base
    prompt TEXT NOT NULL,            -- JSON list of {role, content} messages, last one from the user
    chosen TEXT,                     -- the preferred answer (pair, or a +1 rating)
    rejected TEXT,                   -- the worse answer (pair, or a -1 rating)
    rating INTEGER,                  -- +1 / -1 for ratings, NULL for pairs
    source TEXT NOT NULL             -- where it was given: oracle | api
);
CREATE INDEX IF NOT EXISTS preferences_kind ON preferences(kind, id);
CREATE TABLE IF NOT EXISTS feedback_quests (
    number INTEGER PRIMARY KEY,      -- N of "Judge quest #N"
    kind TEXT NOT NULL,              -- pair | rating
    name TEXT NOT NULL,              -- the quest file name
    state TEXT NOT NULL,             -- claimed | written
    records INTEGER NOT NULL,        -- records trained
    held_out INTEGER NOT NULL,       -- held-out pairs it is scored on
    content_sha256 TEXT NOT NULL,    -- of the quest file
    quest_id INTEGER,                -- the ledger quest, once it started
    accuracy_before REAL,            -- preference accuracy on the held-out pairs, weights at the quest's start
    margin_before REAL,              -- mean log p(chosen) - log p(rejected), nats
    global_step_before INTEGER,
    accuracy_after REAL,             -- the same with the weights at its end
    margin_after REAL,
    global_step_after INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback_uses (
    preference_id INTEGER PRIMARY KEY,  -- preferences.id
    kind TEXT NOT NULL,                 -- pair | rating
    quest_number INTEGER NOT NULL,      -- feedback_quests.number
    role TEXT NOT NULL                  -- train | held_out
);
CREATE INDEX IF NOT EXISTS feedback_uses_quest ON feedback_uses(quest_number, role);
"""
"""People's preferences (:mod:`core.preferences`: ratings and chosen/rejected pairs from the oracle and the API)
and the feedback loop's bookkeeping (:mod:`core.feedback`: which rows each Judge quest trained or held out)."""
SOURCE_COLUMNS = {"source_url": "TEXT", "source_sha256": "TEXT"}


def _add_source_columns(c: sqlite3.Connection) -> None:
    """``quests.source_url``/``source_sha256`` (the URL a downloaded quest came from) on an older ledger."""
    have = {r[1] for r in c.execute("PRAGMA table_info(quests)").fetchall()}
    for column, sql_type in SOURCE_COLUMNS.items():
        if column not in have:
            c.execute(f"ALTER TABLE quests ADD COLUMN {column} {sql_type}")


def _add_schools(c: sqlite3.Connection) -> None:
    """``quests.school`` (the school training the quest, :mod:`core.schools`) and the ``step_metrics`` table
    (a school's own per-step metrics, e.g. ``rewards/margins``: one row per step and name)."""
    have = {r[1] for r in c.execute("PRAGMA table_info(quests)").fetchall()}
    if "school" not in have:
        c.execute("ALTER TABLE quests ADD COLUMN school TEXT")
    c.execute("CREATE TABLE IF NOT EXISTS step_metrics (global_step INTEGER NOT NULL, name TEXT NOT NULL, "
              "value REAL NOT NULL, PRIMARY KEY (global_step, name))")


#: Data migrations run once per ledger, in order; ``PRAGMA user_version`` = how many have run.
#: 1: fill the chart rollups of a ledger written before they existed. 2: the quests' source columns.
#: 3: the quests' school and the schools' step metrics.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (step_rollups.rebuild_all, _add_source_columns,
                                                                 _add_schools)


class DownloadState(str, Enum):
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(str, Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Ledger:
    """A connection to the realm's ledger. Thread-safe (one connection guarded by a lock)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._conn.executescript(SCHEMA)
            self._conn.executescript(INTEGRATIONS_SCHEMA)
            self._conn.executescript(FEEDBACK_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Run the :data:`MIGRATIONS` this ledger has not had yet (under the write lock, re-checked inside it:
        several processes may open an old ledger at once)."""
        if self._conn.execute("PRAGMA user_version").fetchone()[0] >= len(MIGRATIONS):
            return
        with self.transaction() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            for migration in MIGRATIONS[version:]:
                migration(c)
            if version < len(MIGRATIONS):
                c.execute(f"PRAGMA user_version={len(MIGRATIONS)}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: the queries inside see one consistent state of the ledger."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        """Raw SQL, for ``core`` modules only (outside ``core`` use the typed methods)."""
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, params).fetchall()]

    def execute(self, sql: str, params: tuple | dict = ()) -> None:
        with self._lock:
            self._conn.execute(sql, params)

    # quests ------------------------------------------------------------------
    def get_quest(self, quest_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM quests WHERE id=?", (quest_id,))
        return rows[0] if rows else None

    def list_quests(self, states: list[QuestState] | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        if states:
            marks = ",".join("?" * len(states))
            return self.query(f"SELECT * FROM quests WHERE state IN ({marks}) ORDER BY id LIMIT ?",
                              (*[s.value for s in states], limit))
        return self.query("SELECT * FROM quests ORDER BY id LIMIT ?", (limit,))

    def update_quest(self, quest_id: int, **fields: Any) -> None:
        """Update non-state columns of a quest (state goes through QuestQueue)."""
        if "state" in fields:
            raise ValueError("quest state changes go through core.quest_queue.QuestQueue")
        bad = set(fields) - set(QUEST_COLUMNS)
        if bad:
            raise ValueError(f"unknown quest columns {sorted(bad)}")
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as c:
            c.execute(f"UPDATE quests SET {sets} WHERE id=?", (*fields.values(), quest_id))

    def queue_counts(self) -> dict[str, int]:
        """``{state: number of quests}`` for every :class:`QuestState` (0 when none)."""
        counts = {s.value: 0 for s in QuestState}
        for r in self.query("SELECT state, COUNT(*) AS n FROM quests GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts

    def queued_counts_by_priority(self) -> dict[str, int]:
        """``{priority: number of queued quests}`` for the priorities that have any."""
        return {r["priority"]: r["n"] for r in self.query(
            "SELECT priority, COUNT(*) AS n FROM quests WHERE state=? GROUP BY priority", (QuestState.QUEUED.value,))}

    def recent_quests(self, state: QuestState, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` quests in ``state`` changed most recently, newest first."""
        return self.query("SELECT * FROM quests WHERE state=? ORDER BY updated_at DESC, id DESC LIMIT ?",
                          (state.value, limit))

    def quests_updated_since(self, updated_at: float) -> list[dict[str, Any]]:
        """Quests whose ``updated_at`` (epoch seconds) is after ``updated_at``, by id."""
        return self.query("SELECT * FROM quests WHERE updated_at > ? ORDER BY id", (updated_at,))

    def quest_states(self) -> dict[int, tuple[str, str]]:
        """``{quest id: (state, priority)}`` of every quest."""
        return {r["id"]: (r["state"], r["priority"]) for r in self.query("SELECT id, state, priority FROM quests")}

    def last_quest_update(self) -> float:
        """The newest ``updated_at`` of any quest (epoch seconds; 0.0 when there is none)."""
        return self.query("SELECT COALESCE(MAX(updated_at), 0) AS m FROM quests")[0]["m"]

    def quests_trained_until(self, global_step: int) -> list[dict[str, Any]]:
        """Quests with steps at or before ``global_step``, in the order they started: ``{"id", "name",
        "steps", "examples_trained"}`` counted over those steps only."""
        return self.query(
            "SELECT s.quest_id AS id, q.name AS name, COUNT(*) AS steps, MAX(s.example_end) AS examples_trained "
            "FROM steps s LEFT JOIN quests q ON q.id = s.quest_id WHERE s.global_step <= ? AND s.quest_id IS NOT "
            "NULL GROUP BY s.quest_id ORDER BY MIN(s.global_step)", (global_step,))

    # steps and evals -----------------------------------------------------------
    def record_step(self, *, global_step: int, quest_id: int | None, loss: float, learning_rate: float,
                    grad_norm: float, tokens: int, tokens_per_second: float, example_start: int,
                    example_end: int, example_lines: list[int], quest_steps: int,
                    metrics: dict[str, float] | None = None) -> None:
        """One optimizer step's metrics, the quest's progress and the chart rollups, in one transaction.
        ``metrics``: the school's own (``{"rewards/margins": 0.3, ...}``, finite values), in ``step_metrics``."""
        now = time.time()
        with self.transaction() as c:
            replaced = c.execute("SELECT 1 FROM steps WHERE global_step=?", (global_step,)).fetchone()
            c.execute(
                "INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (global_step, quest_id, now, loss, learning_rate, grad_norm, tokens, tokens_per_second,
                 example_start, example_end, json.dumps(example_lines)),
            )
            if replaced:
                c.execute("DELETE FROM step_metrics WHERE global_step=?", (global_step,))
            if metrics:
                c.executemany("INSERT OR REPLACE INTO step_metrics VALUES (?,?,?)",
                              [(global_step, k, float(v)) for k, v in metrics.items() if math.isfinite(v)])
            if replaced:
                step_rollups.rebuild_block(c, step_rollups.STEPS, global_step)
            else:
                step_rollups.add(c, step_rollups.STEPS, global_step, loss, learning_rate)
            if quest_id is not None:
                c.execute(
                    "UPDATE quests SET examples_trained=?, steps=?, last_global_step=?, "
                    "first_global_step=COALESCE(first_global_step, ?), updated_at=? WHERE id=?",
                    (example_end, quest_steps, global_step, global_step, now, quest_id),
                )

    def bulk_record_steps(self, rows: Iterable[StepRow]) -> int:
        """Append many steps at once (an import, a benchmark): one transaction, the rollups recomputed
        set-based afterwards. Quest progress is not touched. Returns the number of rows written."""
        n = 0
        with self.transaction() as c:
            for chunk in _chunks(rows, 50_000):
                c.executemany("INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                              [(r.global_step, r.quest_id, r.time, r.loss, r.learning_rate, r.grad_norm, r.tokens,
                                r.tokens_per_second, r.example_start, r.example_end, json.dumps(r.example_lines))
                               for r in chunk])
                n += len(chunk)
            step_rollups.rebuild_all(c)
        return n

    def step_metrics(self, quest_id: int | None = None, since_step: int = 0) -> dict[int, dict[str, float]]:
        """``{global_step: {name: value}}`` of the schools' step metrics after ``since_step`` (of one quest)."""
        sql = ("SELECT m.global_step AS s, m.name AS name, m.value AS value FROM step_metrics m "
               "JOIN steps t ON t.global_step = m.global_step WHERE m.global_step > ?")
        params: tuple = (since_step,)
        if quest_id is not None:
            sql += " AND t.quest_id = ?"
            params += (quest_id,)
        out: dict[int, dict[str, float]] = {}
        for r in self.query(sql + " ORDER BY m.global_step", params):
            out.setdefault(r["s"], {})[r["name"]] = r["value"]
        return out

    def school_step_counts(self) -> dict[str, dict[str, int]]:
        """``{school: {"quests", "steps"}}`` over the quests that trained steps (school NULL counted as sft)."""
        rows = self.query("SELECT COALESCE(school, 'sft') AS school, COUNT(*) AS quests, SUM(steps) AS steps "
                          "FROM quests WHERE steps > 0 GROUP BY COALESCE(school, 'sft')")
        return {r["school"]: {"quests": r["quests"], "steps": r["steps"] or 0} for r in rows}

    def step_counts_of_quests_named(self, name_glob: str) -> dict[str, int]:
        """``{"quests", "steps"}`` over the quests named ``name_glob`` (SQLite ``GLOB``) that trained steps."""
        row = self.query("SELECT COUNT(*) AS quests, COALESCE(SUM(steps), 0) AS steps FROM quests "
                         "WHERE steps > 0 AND name GLOB ?", (name_glob,))[0]
        return {"quests": row["quests"], "steps": row["steps"]}

    def step_metric_names(self) -> dict[str, list[str]]:
        """``{school: [metric name, ...]}``: the step metrics each school recorded (school NULL as sft)."""
        rows = self.query("SELECT DISTINCT COALESCE(q.school, 'sft') AS school, m.name AS name FROM step_metrics m "
                          "JOIN steps t ON t.global_step = m.global_step JOIN quests q ON q.id = t.quest_id "
                          "ORDER BY school, name")
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r["school"], []).append(r["name"])
        return out

    def step_metric_series(self, name: str, schools: Iterable[str], max_points: int = 4096
                           ) -> list[tuple[int, float]]:
        """``[(global_step, value)]`` of step metric ``name`` over the steps of quests of ``schools`` (school
        NULL as sft), oldest first; with more than ``max_points`` steps, every k-th (and the last)."""
        schools = list(schools)
        if not schools:
            return []
        rows = self.query(f"SELECT m.global_step AS s, m.value AS v FROM step_metrics m JOIN steps t ON "
                          f"t.global_step = m.global_step JOIN quests q ON q.id = t.quest_id WHERE m.name = ? AND "
                          f"COALESCE(q.school, 'sft') IN ({','.join('?' * len(schools))}) ORDER BY m.global_step",
                          (name, *schools))
        points = [(r["s"], r["v"]) for r in rows]
        if len(points) > max_points > 1:
            k = -(-len(points) // (max_points - 1))
            points = points[::k] + ([points[-1]] if (len(points) - 1) % k else [])
        return points

    def record_eval(self, global_step: int, quest_id: int | None, eval_loss: float, examples: int) -> None:
        """A held-out evaluation at ``global_step`` (``eval_loss``: mean token cross-entropy, nats)."""
        with self.transaction() as c:
            replaced = c.execute("SELECT 1 FROM evals WHERE global_step=? AND quest_id=?",
                                 (global_step, quest_id)).fetchone()
            c.execute("INSERT OR REPLACE INTO evals VALUES (?,?,?,?,?)",
                      (global_step, quest_id, time.time(), eval_loss, examples))
            if replaced:
                step_rollups.rebuild_block(c, step_rollups.EVALS, global_step)
            else:
                step_rollups.add(c, step_rollups.EVALS, global_step, eval_loss)

    def rollback_to(self, global_step: int) -> int:
        """Forget steps and evals after ``global_step`` (their weights were lost with a crash), and set
        each affected quest's progress back to what its remaining steps consumed.

        Steps consume a quest's examples in order, so ``examples_trained`` = the largest remaining
        ``example_end`` of that quest (0 when none remain). The chart rollups follow. Returns the number of
        step rows removed.
        """
        with self.transaction() as c:
            affected = [r[0] for r in c.execute(
                "SELECT DISTINCT quest_id FROM steps WHERE global_step > ? AND quest_id IS NOT NULL",
                (global_step,)).fetchall()]
            n = c.execute("DELETE FROM steps WHERE global_step > ?", (global_step,)).rowcount
            c.execute("DELETE FROM step_metrics WHERE global_step > ?", (global_step,))
            c.execute("DELETE FROM evals WHERE global_step > ?", (global_step,))
            step_rollups.truncate_after(c, global_step)
            for qid in affected:
                row = c.execute("SELECT MAX(example_end), COUNT(*), MIN(global_step), MAX(global_step) "
                                "FROM steps WHERE quest_id=?", (qid,)).fetchone()
                c.execute("UPDATE quests SET examples_trained=?, steps=?, first_global_step=?, "
                          "last_global_step=?, updated_at=? WHERE id=?",
                          (row[0] or 0, row[1], row[2], row[3], time.time(), qid))
        return n

    def last_step(self) -> dict[str, Any] | None:
        """The newest ``steps`` row (all columns), or None."""
        rows = self.query("SELECT * FROM steps ORDER BY global_step DESC LIMIT 1")
        return rows[0] if rows else None

    def step_bounds(self) -> tuple[int | None, int | None]:
        """(lowest, highest) global step in ``steps``; (None, None) when empty."""
        with self._snapshot() as c:  # one MIN or MAX per statement: SQLite then reads one index entry
            lo, hi = (c.execute(f"SELECT {f}(global_step) FROM steps").fetchone()[0] for f in ("MIN", "MAX"))
        return lo, hi

    def steps(self, since_step: int = 0, limit: int = 100000, *, with_examples: bool = True) -> list[dict[str, Any]]:
        """Steps after ``since_step``, oldest first; without ``examples_json`` unless ``with_examples``."""
        columns = "*" if with_examples else ", ".join(STEP_METRIC_COLUMNS)
        return self.query(f"SELECT {columns} FROM steps WHERE global_step > ? ORDER BY global_step LIMIT ?",
                          (since_step, limit))

    def recent_steps(self, n: int, quest_id: int | None = None) -> list[dict[str, Any]]:
        """The ``n`` newest steps (of quest ``quest_id`` when given), newest first, without
        ``examples_json``. A quest's steps are searched within its first..last global step only."""
        columns = ", ".join(STEP_METRIC_COLUMNS)
        if quest_id is None:
            return self.query(f"SELECT {columns} FROM steps ORDER BY global_step DESC LIMIT ?", (n,))
        quest = self.query("SELECT first_global_step AS lo, last_global_step AS hi FROM quests WHERE id=?",
                           (quest_id,))
        if not quest or quest[0]["lo"] is None or quest[0]["hi"] is None:
            return []
        return self.query(f"SELECT {columns} FROM steps WHERE global_step BETWEEN ? AND ? AND quest_id=? "
                          "ORDER BY global_step DESC LIMIT ?", (quest[0]["lo"], quest[0]["hi"], quest_id, n))

    def evals(self, quest_id: int | None = None) -> list[dict[str, Any]]:
        """Every evaluation (of quest ``quest_id`` when given), by global step."""
        if quest_id is None:
            return self.query("SELECT * FROM evals ORDER BY global_step")
        return self.query("SELECT * FROM evals WHERE quest_id=? ORDER BY global_step", (quest_id,))

    def step_quests(self) -> list[tuple[int, int | None]]:
        """``(global_step, quest_id)`` of every step, by global step (what the Temple's blessing judges)."""
        return [(r["global_step"], r["quest_id"]) for r in
                self.query("SELECT global_step, quest_id FROM steps ORDER BY global_step")]

    def evaluation_marks(self) -> tuple[int, int, int, int]:
        """``(evals count, newest eval rowid, trials count, newest trial id)``: changes whenever an
        evaluation or trial is written or removed (a cache key)."""
        e = self.query("SELECT COUNT(*) AS n, COALESCE(MAX(rowid), 0) AS m FROM evals")[0]
        t = self.query("SELECT COUNT(*) AS n, COALESCE(MAX(id), 0) AS m FROM trials")[0]
        return e["n"], e["m"], t["n"], t["m"]

    def latest_eval(self) -> dict[str, Any] | None:
        """The evaluation at the highest global step (the newest one of that step), or None."""
        rows = self.query("SELECT * FROM evals ORDER BY global_step DESC, time DESC LIMIT 1")
        return rows[0] if rows else None

    def evals_until(self, global_step: int, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` latest evaluations at or before ``global_step``, newest first: ``{"global_step",
        "quest_id", "eval_loss", "examples"}``."""
        return self.query("SELECT global_step, quest_id, eval_loss, examples FROM evals WHERE global_step <= ? "
                          "ORDER BY global_step DESC LIMIT ?", (global_step, limit))

    def evals_written_after(self, seq: int) -> list[dict[str, Any]]:
        """Evaluations written after write sequence number ``seq`` (the row's ``seq`` key, its SQLite rowid),
        in write order. Start from :meth:`last_eval_seq`."""
        return self.query("SELECT rowid AS seq, * FROM evals WHERE rowid > ? ORDER BY rowid", (seq,))

    def last_eval_seq(self) -> int:
        """The write sequence number of the newest evaluation (0 when none); see :meth:`evals_written_after`."""
        return self.query("SELECT COALESCE(MAX(rowid), 0) AS m FROM evals")[0]["m"]

    # chart history ---------------------------------------------------------------
    def history_bounds(self) -> HistoryBounds:
        """The global steps the chart history spans (steps and evals together)."""
        with self._snapshot() as c:  # one MIN or MAX per statement: SQLite then reads one index entry
            s = [c.execute(f"SELECT {f}(global_step) FROM steps").fetchone()[0] for f in ("MIN", "MAX")]
            e = [c.execute(f"SELECT {f}(global_step) FROM evals").fetchone()[0] for f in ("MIN", "MAX")]
        los = [x for x in (s[0], e[0]) if x is not None]
        his = [x for x in (s[1], e[1]) if x is not None]
        return HistoryBounds(first_step=min(los) if los else None, last_step=max(his) if his else None,
                             last_global_step=s[1])

    def history(self, from_step: int, to_step: int, max_points: int) -> History:
        """Train loss / learning rate and eval loss over global steps ``[from_step, to_step]`` in at most
        ``max_points`` buckets: per bucket the mean step, mean loss, min/max loss, mean learning rate (train)
        and mean step, mean eval loss (eval). Ranges up to ``step_rollups.RAW_SCAN_MAX_STEPS`` are read raw
        (buckets of ``ceil(span / max_points)`` steps counted from ``from_step``), longer ones from the
        rollups (see :mod:`core.step_rollups`): bounded time at any ledger length. Non-finite values are
        None (JSON has neither NaN nor infinity). Raises ``ValueError`` when ``to_step < from_step`` or
        ``max_points < 1``."""
        if to_step < from_step or max_points < 1:
            raise ValueError(f"empty range [{from_step}, {to_step}] or max_points {max_points} < 1")
        p = step_rollups.plan(from_step, to_step, max_points)
        with self._snapshot() as c:
            last = c.execute("SELECT MAX(global_step) FROM steps").fetchone()[0]
            if p.level is None:
                train = _columns(c.execute(
                    "SELECT AVG(global_step), AVG(loss), MIN(loss), MAX(loss), AVG(learning_rate) FROM steps "
                    "WHERE global_step BETWEEN ? AND ? GROUP BY (global_step - ?) / ? ORDER BY 1",
                    (from_step, to_step, from_step, p.bucket_steps)), HISTORY_TRAIN_COLUMNS)
                evals = _columns(c.execute(
                    "SELECT AVG(global_step), AVG(eval_loss) FROM evals WHERE global_step BETWEEN ? AND ? "
                    "GROUP BY (global_step - ?) / ? ORDER BY 1", (from_step, to_step, from_step, p.bucket_steps)),
                    HISTORY_EVAL_COLUMNS)
            else:
                t = step_rollups.query(c, step_rollups.STEPS, from_step, to_step, p)
                e = step_rollups.query(c, step_rollups.EVALS, from_step, to_step, p)
                train = {"global_step": t["global_step"], "loss": t["value"], "loss_min": t["value_min"],
                         "loss_max": t["value_max"], "learning_rate": t["learning_rate"]}
                evals = {"global_step": e["global_step"], "eval_loss": e["value"]}
        return History(from_step=from_step, to_step=to_step, bucket_steps=p.bucket_steps, last_global_step=last,
                       train=_finite(train), eval=_finite(evals))

    # events ------------------------------------------------------------------
    def event(self, kind: str, message: str, level: str = "info", **data: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                      (time.time(), level, kind, message, json.dumps(data, default=str) if data else None))

    def events(self, since_id: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """Up to ``limit`` events after id ``since_id``, oldest first (``data``: a JSON string or None)."""
        return self.query("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (since_id, limit))

    def latest_events(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest events, oldest first."""
        return self.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))[::-1]

    def last_event_id(self) -> int:
        """The newest event's id (0 when none)."""
        return self.query("SELECT COALESCE(MAX(id), 0) AS m FROM events")[0]["m"]

    def events_of_kind(self, kind: str, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest events of ``kind``, newest first, with ``data`` parsed from JSON (None when
        absent, ``{}`` when unreadable)."""
        rows = self.query("SELECT * FROM events WHERE kind=? ORDER BY id DESC LIMIT ?", (kind, limit))
        for r in rows:
            try:
                r["data"] = json.loads(r["data"]) if r["data"] else None
            except ValueError:
                r["data"] = {}
        return rows

    # control channel -----------------------------------------------------------
    def send_command(self, command: str, **args: Any) -> int:
        """Queue a control command for the daemon (pause, resume, skip, stop). Returns its id."""
        with self.transaction() as c:
            cur = c.execute("INSERT INTO commands(time, command, args, state) VALUES (?,?,?,?)",
                            (time.time(), command, json.dumps(args), CommandState.PENDING.value))
            return int(cur.lastrowid)

    def pending_commands(self) -> list[dict[str, Any]]:
        """Commands the daemon has not handled yet, oldest first."""
        return self.query("SELECT * FROM commands WHERE state=? ORDER BY id", (CommandState.PENDING.value,))

    def command(self, command_id: int) -> dict[str, Any] | None:
        """One command row (``state`` pending -> done | failed, ``result``, ``args`` as JSON), or None."""
        rows = self.query("SELECT * FROM commands WHERE id=?", (command_id,))
        return rows[0] if rows else None

    def recent_commands(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest commands, newest first."""
        return self.query("SELECT * FROM commands ORDER BY id DESC LIMIT ?", (limit,))

    def command_states(self) -> dict[int, str]:
        """``{command id: state}`` of every command."""
        return {r["id"]: r["state"] for r in self.query("SELECT id, state FROM commands")}

    def commands_since(self, after_id: int, also: Iterable[int] = ()) -> list[dict[str, Any]]:
        """Commands with an id above ``after_id``, plus those whose ids are in ``also`` (e.g. the ones seen
        pending before), by id."""
        also = [int(i) for i in also]
        marks = ",".join("?" * len(also)) or "NULL"
        return self.query(f"SELECT * FROM commands WHERE id > ? OR id IN ({marks}) ORDER BY id", (after_id, *also))

    def finish_command(self, command_id: int, state: CommandState, result: str = "") -> None:
        with self.transaction() as c:
            c.execute("UPDATE commands SET state=?, result=?, handled_at=? WHERE id=?",
                      (state.value, result, time.time(), command_id))

    # key/value (heartbeat, daemon state) ----------------------------------------
    def set_value(self, key: str, value: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (key, json.dumps(value), time.time()))

    def set_value_if_absent(self, key: str, value: Any) -> bool:
        """Write ``key`` only when it does not exist (atomically: of two processes racing, one wins).
        Returns True when this call wrote it."""
        with self.transaction() as c:
            cur = c.execute("INSERT OR IGNORE INTO kv VALUES (?,?,?)", (key, json.dumps(value), time.time()))
            return cur.rowcount == 1

    def get_value(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def get_value_with_time(self, key: str) -> tuple[Any, float | None]:
        """(value, ``updated_at`` epoch seconds) of ``key``; (None, None) when absent."""
        rows = self.query("SELECT value, updated_at FROM kv WHERE key=?", (key,))
        return (json.loads(rows[0]["value"]), rows[0]["updated_at"]) if rows else (None, None)

    def value_updated_at(self, key: str) -> float | None:
        """When ``key`` was last written (epoch seconds), None when absent: a cheap change clock."""
        rows = self.query("SELECT updated_at FROM kv WHERE key=?", (key,))
        return rows[0]["updated_at"] if rows else None

    # the cross-process contract (core.contract) ------------------------------------
    def publish_daemon_status(self, status: dict[str, Any]) -> None:
        """The daemon's heartbeat: ``status`` under :data:`core.contract.DAEMON_KEY`."""
        self.set_value(DAEMON_KEY, status)

    def daemon_status(self, now: float | None = None,
                      stale_after_seconds: float = HEARTBEAT_STALE_SECONDS) -> DaemonStatus:
        """The daemon's published status with the one liveness verdict (:func:`core.contract.read_daemon_status`)."""
        value, updated_at = self.get_value_with_time(DAEMON_KEY)
        return read_daemon_status(value, updated_at, now, stale_after_seconds)

    def publish_supervisor_status(self, status: dict[str, Any]) -> None:
        """The supervisor's status and its children's, under :data:`core.contract.SUPERVISOR_KEY`."""
        self.set_value(SUPERVISOR_KEY, status)

    def supervisor_status(self) -> dict[str, Any] | None:
        """What the supervisor last published (``pid``, ``state``, ``children``), or None."""
        value = self.get_value(SUPERVISOR_KEY)
        return value if isinstance(value, dict) else None


    # --- integrations: downloads into the inbox (core.sources), webhook deliveries (core.webhooks) ---------

    # downloads ------------------------------------------------------------------------------------
    def start_download(self, url: str, priority: str, part_path: str, pid: int) -> int:
        """A download into the inbox begins. Returns its id."""
        now = time.time()
        with self.transaction() as c:
            cur = c.execute("INSERT INTO downloads(url, priority, state, pid, part_path, created_at, updated_at) "
                            "VALUES (?,?,?,?,?,?,?)", (url, priority, DownloadState.DOWNLOADING.value, pid,
                                                        part_path, now, now))
            return int(cur.lastrowid)

    def download_progress(self, download_id: int, bytes_done: int, bytes_total: int | None) -> None:
        with self.transaction() as c:
            c.execute("UPDATE downloads SET bytes_done=?, bytes_total=?, updated_at=? WHERE id=?",
                      (bytes_done, bytes_total, time.time(), download_id))

    def finish_download(self, download_id: int, *, path: str, name: str, sha256: str,
                        size_bytes: int) -> None:
        """The file was published into the inbox as ``path`` (absolute)."""
        with self.transaction() as c:
            c.execute("UPDATE downloads SET state=?, path=?, name=?, sha256=?, bytes_done=?, bytes_total=?, "
                      "part_path=NULL, updated_at=? WHERE id=?",
                      (DownloadState.DONE.value, path, name, sha256, size_bytes, size_bytes, time.time(),
                       download_id))

    def fail_download(self, download_id: int, error: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE downloads SET state=?, error=?, part_path=NULL, updated_at=? WHERE id=?",
                      (DownloadState.FAILED.value, error, time.time(), download_id))

    def get_download(self, download_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM downloads WHERE id=?", (download_id,))
        return rows[0] if rows else None

    def list_downloads(self, limit: int = 50, state: DownloadState | None = None) -> list[dict[str, Any]]:
        """The newest downloads first."""
        if state is not None:
            return self.query("SELECT * FROM downloads WHERE state=? ORDER BY id DESC LIMIT ?", (state.value, limit))
        return self.query("SELECT * FROM downloads ORDER BY id DESC LIMIT ?", (limit,))

    def link_download(self, quest_id: int, inbox_path: str) -> dict[str, Any] | None:
        """Called when a file is admitted from the inbox as quest ``quest_id``: if a finished download
        published it at ``inbox_path``, record its URL and SHA-256 on the quest (``source_url``,
        ``source_sha256``) and the quest on the download. Returns the download row, or None."""
        with self.transaction() as c:
            row = c.execute("SELECT * FROM downloads WHERE path=? AND state=? AND quest_id IS NULL "
                            "ORDER BY id DESC LIMIT 1", (inbox_path, DownloadState.DONE.value)).fetchone()
            if row is None:
                return None
            c.execute("UPDATE downloads SET quest_id=?, updated_at=? WHERE id=?", (quest_id, time.time(), row["id"]))
            c.execute("UPDATE quests SET source_url=?, source_sha256=? WHERE id=?",
                      (row["url"], row["sha256"], quest_id))
        return dict(row)

    def queued_by_priority(self) -> dict[str, int]:
        """``{priority: queued quests}`` (priorities with none are absent)."""
        rows = self.query("SELECT priority, COUNT(*) AS n FROM quests WHERE state=? GROUP BY priority",
                          (QuestState.QUEUED.value,))
        return {r["priority"]: r["n"] for r in rows}

    # events, as webhooks and metrics read them -----------------------------------------------------
    def max_event_id(self) -> int:
        return int(self.query("SELECT COALESCE(MAX(id), 0) AS n FROM events")[0]["n"])

    def next_event(self, after_id: int, kinds: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
        """The oldest event with ``id > after_id`` whose kind is one of ``kinds``, or None."""
        if not kinds:
            return None
        marks = ",".join("?" * len(kinds))
        rows = self.query(f"SELECT * FROM events WHERE id > ? AND kind IN ({marks}) ORDER BY id LIMIT 1",
                          (after_id, *kinds))
        return rows[0] if rows else None

    def event_with_value(self, kind: str, message: str, key: str, value: Any, level: str = "info",
                         **data: Any) -> None:
        """An event and a kv value in one transaction (e.g. a level-up and the level it announced)."""
        now = time.time()
        with self.transaction() as c:
            c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                      (now, level, kind, message, json.dumps(data, default=str) if data else None))
            c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (key, json.dumps(value), now))

    def last_event(self, kind: str) -> dict[str, Any] | None:
        """The newest event of ``kind``, or None."""
        rows = self.query("SELECT * FROM events WHERE kind=? ORDER BY id DESC LIMIT 1", (kind,))
        return rows[0] if rows else None

    # webhook deliveries ----------------------------------------------------------------------------
    def webhook_delivery(self, webhook: str, url: str, event_id: int, event: str) -> dict[str, Any]:
        """The delivery row of ``event_id`` to receiver ``webhook``, created (pending) if new."""
        now = time.time()
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO webhook_deliveries(webhook, url, event_id, event, state, "
                      "created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                      (webhook, url, event_id, event, DeliveryState.PENDING.value, now, now))
            return dict(c.execute("SELECT * FROM webhook_deliveries WHERE webhook=? AND event_id=?",
                                  (webhook, event_id)).fetchone())

    def webhook_attempt(self, delivery_id: int, *, state: DeliveryState, status_code: int | None,
                        error: str | None, next_attempt_at: float | None = None,
                        position_key: str | None = None) -> None:
        """Record one attempt of a delivery. When it ends the delivery (delivered, or failed for good) the
        receiver's position (kv ``position_key``) moves to its event, in the same transaction."""
        now = time.time()
        with self.transaction() as c:
            row = c.execute("SELECT event_id FROM webhook_deliveries WHERE id=?", (delivery_id,)).fetchone()
            c.execute("UPDATE webhook_deliveries SET state=?, attempts=attempts+1, status_code=?, error=?, "
                      "next_attempt_at=?, updated_at=?, delivered_at=? WHERE id=?",
                      (state.value, status_code, error, next_attempt_at, now,
                       now if state == DeliveryState.DELIVERED else None, delivery_id))
            if position_key and row is not None and state != DeliveryState.PENDING:
                c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (position_key, json.dumps(row[0]), now))

    def webhook_deliveries(self, limit: int = 100, webhook: str | None = None) -> list[dict[str, Any]]:
        """Delivery rows, oldest first among the newest ``limit``."""
        if webhook is not None:
            rows = self.query("SELECT * FROM webhook_deliveries WHERE webhook=? ORDER BY id DESC LIMIT ?",
                              (webhook, limit))
        else:
            rows = self.query("SELECT * FROM webhook_deliveries ORDER BY id DESC LIMIT ?", (limit,))
        return rows[::-1]

    # =============================================================================================
    # skills: promotion trials and skill levels (issue 10; core.skills.trials writes, status reads)
    # =============================================================================================
    def record_trial(self, trial: TrialRecord) -> int:
        """Store a trial, with its ``trial`` event and, when promoted, a ``promotion`` event, in one
        transaction. Returns the trial's id."""
        t = trial
        now = t.time or time.time()
        verdict = (f"promoted to level {t.level_after}" if t.promoted else
                   f"stays at level {t.level_after}")
        message = (f"{t.skill} level {t.level} trial at step {t.global_step}: {t.correct}/{t.n} right "
                   f"({100 * t.accuracy:.1f}%), Wilson lower bound {t.lower_bound:.3f} "
                   f"{'>=' if t.lower_bound >= t.threshold else '<'} {t.threshold}: {verdict}")
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO trials(time, hero, skill, level, level_after, n, correct, accuracy, lower_bound, "
                "threshold, promoted, global_step, checkpoint, seed, duration_seconds, samples_json) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (now, t.hero, t.skill, t.level, t.level_after, t.n, t.correct, t.accuracy, t.lower_bound,
                 t.threshold, int(t.promoted), t.global_step, t.checkpoint, t.seed, t.duration_seconds,
                 json.dumps(t.samples)))
            trial_id = int(cur.lastrowid)
            data = {"trial_id": trial_id, "hero": t.hero, "skill": t.skill, "level": t.level,
                    "level_after": t.level_after, "n": t.n, "correct": t.correct, "accuracy": t.accuracy,
                    "lower_bound": t.lower_bound, "threshold": t.threshold, "promoted": t.promoted,
                    "global_step": t.global_step, "checkpoint": t.checkpoint}
            c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                      (now, "info", "trial", message, json.dumps(data)))
            if t.promoted:
                c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                          (now, "info", "promotion", f"{t.skill}: level {t.level} -> {t.level_after} "
                           f"(trial #{trial_id}, {t.correct}/{t.n} right at step {t.global_step})",
                           json.dumps({**data, "from_level": t.level})))
        return trial_id

    def trials(self, hero: str, skill: str | None = None, limit: int = 100) -> list[TrialRecord]:
        """The newest ``limit`` trials of ``hero`` (of one ``skill``, or all), oldest first."""
        where, params = ("hero=? AND skill=?", (hero, skill)) if skill is not None else ("hero=?", (hero,))
        rows = self.query(f"SELECT * FROM (SELECT * FROM trials WHERE {where} ORDER BY id DESC LIMIT ?) "
                          "ORDER BY id", (*params, limit))
        return [TrialRecord.from_row(r) for r in rows]

    def count_trials(self, hero: str, skill: str, level: int, global_step: int) -> int:
        """Trials of ``skill`` at ``level`` on the weights of ``global_step`` (the attempt number of the next)."""
        rows = self.query("SELECT COUNT(*) AS n FROM trials WHERE hero=? AND skill=? AND level=? AND global_step=?",
                          (hero, skill, level, global_step))
        return int(rows[0]["n"])

    def last_trial(self, hero: str, skill: str) -> TrialRecord | None:
        rows = self.query("SELECT * FROM trials WHERE hero=? AND skill=? ORDER BY id DESC LIMIT 1", (hero, skill))
        return TrialRecord.from_row(rows[0]) if rows else None

    def skill_level(self, hero: str, skill: str) -> int:
        """The skill's level: ``level_after`` of its newest trial, 0 before any trial."""
        last = self.last_trial(hero, skill)
        return last.level_after if last else 0

    def skill_summary(self, hero: str) -> dict[str, dict[str, Any]]:
        """Per skill with a trial: ``{"level", "trials", "last_trial": TrialRecord}``."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.query("SELECT skill, COUNT(*) AS n, MAX(id) AS last FROM trials WHERE hero=? "
                            "GROUP BY skill ORDER BY skill", (hero,)):
            last = TrialRecord.from_row(self.query("SELECT * FROM trials WHERE id=?", (r["last"],))[0])
            out[r["skill"]] = {"level": last.level_after, "trials": r["n"], "last_trial": last}
        return out

    def forget_trials_after(self, global_step: int) -> int:
        """Delete trials of weights after ``global_step`` (lost with a crash, like :meth:`rollback_to`'s
        steps), so no level rests on weights that no longer exist. Returns the number removed."""
        with self.transaction() as c:
            return c.execute("DELETE FROM trials WHERE global_step > ?", (global_step,)).rowcount

    def steps_of_quests_named(self, name_glob: str, after_step: int) -> int:
        """Optimizer steps after ``after_step`` that trained quests whose name matches ``name_glob`` (SQLite
        ``GLOB``: ``*``, ``?``, case-sensitive), e.g. ``skill-BIN-L*``: the steps trained on a skill."""
        rows = self.query("SELECT COUNT(*) AS n FROM steps s JOIN quests q ON s.quest_id = q.id "
                          "WHERE q.name GLOB ? AND s.global_step > ?", (name_glob, after_step))
        return int(rows[0]["n"])

    def newest_quest_named(self, name_glob: str) -> dict[str, Any] | None:
        """The newest quest (highest id) whose name matches ``name_glob`` (SQLite ``GLOB``), or None."""
        rows = self.query("SELECT * FROM quests WHERE name GLOB ? ORDER BY id DESC LIMIT 1", (name_glob,))
        return rows[0] if rows else None

    def count_quests_named(self, name_glob: str, states: Iterable[QuestState]) -> int:
        """Quests in ``states`` whose name matches ``name_glob`` (SQLite ``GLOB``)."""
        states = [QuestState(s).value for s in states]
        if not states:
            return 0
        rows = self.query(f"SELECT COUNT(*) AS n FROM quests WHERE name GLOB ? AND state IN "
                          f"({','.join('?' * len(states))})", (name_glob, *states))
        return int(rows[0]["n"])

    # sparring rounds (core.skills.sparring): an event each, numbered by an atomic counter -----------------
    def next_spar_round(self) -> int:
        """The number of a new sparring round: 1, 2, ... (an atomic counter in ``kv`` under
        :data:`SPAR_ROUNDS_KEY`, so a round of the CLI and one of the daemon never share a number, a seed
        or a file name)."""
        with self.transaction() as c:
            row = c.execute("SELECT value FROM kv WHERE key=?", (SPAR_ROUNDS_KEY,)).fetchone()
            number = int(json.loads(row[0]) if row else 0) + 1
            c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (SPAR_ROUNDS_KEY, json.dumps(number), time.time()))
        return number

    def record_spar_round(self, record: SparRecord) -> None:
        """Store a sparring round as a ``spar`` event (its data: :meth:`SparRecord.to_dict`)."""
        r = record
        quest = f"-> {r.quest} ({r.examples} correction example(s))" if r.quest else "no correction quest"
        message = (f"{r.skill} level {r.level} sparring round #{r.round} at step {r.global_step}: "
                   f"{r.wrong}/{r.n} wrong ({100 * r.accuracy:.1f}% right) {quest}")
        with self.transaction() as c:  # not event(): its ``level`` argument is the event's severity
            c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                      (r.time or time.time(), "info", "spar", message, json.dumps(r.to_dict())))

    def spar_rounds(self, hero: str, skill: str | None = None, limit: int = 100) -> list[SparRecord]:
        """The newest ``limit`` sparring rounds of ``hero`` (of one ``skill``, or all), newest first."""
        fields = set(SparRecord.__dataclass_fields__)
        out = []
        for row in self.query("SELECT data FROM events WHERE kind='spar' AND json_extract(data, '$.hero')=? "
                              "AND (? IS NULL OR json_extract(data, '$.skill')=?) ORDER BY id DESC LIMIT ?",
                              (hero, skill, skill, limit)):
            data = json.loads(row["data"])
            out.append(SparRecord(**{k: v for k, v in data.items() if k in fields}))
        return out

    # campaigns (core.campaigns): the state of the running campaign, one kv value ------------------------
    def campaign_state(self) -> dict[str, Any] | None:
        """The campaign's state (:class:`core.campaigns.CampaignState` as a dict), None before any."""
        return self.get_value(CAMPAIGN_KEY)

    def set_campaign_state(self, state: dict[str, Any], kind: str, message: str, level: str = "info") -> None:
        """Store the campaign's state with its ``kind`` event (``campaign_started``, ``campaign_stage``,
        ``campaign_finished``, ``campaign_changed``) in one transaction: a restart never sees one without
        the other."""
        self.event_with_value(kind, message, CAMPAIGN_KEY, state, level=level,
                              stage=state.get("stage"), stage_name=state.get("stage_name"))

    def max_trial_id(self) -> int:
        """The newest trial's id (0 when none)."""
        return int(self.query("SELECT COALESCE(MAX(id), 0) AS m FROM trials")[0]["m"])

    def set_skill_load_errors(self, errors: list[dict[str, str]]) -> None:
        """The problems of the last skill registry built (``[{"source", "message"}]``), and a
        ``skill_error`` warning event for each one not stored before."""
        before = {(e.get("source"), e.get("message")) for e in self.skill_load_errors()}
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (SKILL_ERRORS_KEY, json.dumps(errors), time.time()))
            for e in errors:
                if (e.get("source"), e.get("message")) not in before:
                    c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                              (time.time(), "warning", "skill_error", f"skill {e['source']}: "
                               f"{e['message'].strip().splitlines()[-1][:300]}", json.dumps(e)))

    def skill_load_errors(self) -> list[dict[str, str]]:
        return self.get_value(SKILL_ERRORS_KEY, []) or []


STEP_METRIC_COLUMNS = ("global_step", "quest_id", "time", "loss", "learning_rate", "grad_norm", "tokens",
                       "tokens_per_second", "example_start", "example_end")
HISTORY_TRAIN_COLUMNS = ("global_step", "loss", "loss_min", "loss_max", "learning_rate")
HISTORY_EVAL_COLUMNS = ("global_step", "eval_loss")


@dataclass(frozen=True)
class StepRow:
    """One ``steps`` row for :meth:`Ledger.bulk_record_steps` (units as in ``record_step``)."""

    global_step: int
    loss: float | None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None
    quest_id: int | None = None
    time: float = 0.0
    example_start: int | None = None
    example_end: int | None = None
    example_lines: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class HistoryBounds:
    """``first_step``/``last_step``: the range of steps and evals together (None when both are empty);
    ``last_global_step``: the highest step in ``steps`` (None when empty)."""

    first_step: int | None
    last_step: int | None
    last_global_step: int | None


@dataclass(frozen=True)
class History:
    """What :meth:`Ledger.history` returns; ``train``/``eval``: column name -> list, one item per bucket
    (columns :data:`HISTORY_TRAIN_COLUMNS` / :data:`HISTORY_EVAL_COLUMNS`; means are None for a bucket
    without a value)."""

    from_step: int
    to_step: int
    bucket_steps: int
    last_global_step: int | None
    train: dict[str, list]
    eval: dict[str, list]


def _columns(rows: Iterable[Any], names: tuple[str, ...]) -> dict[str, list]:
    """Rows (sequences) as ``{name: column list}``."""
    cols: dict[str, list] = {name: [] for name in names}
    for r in rows:
        for name, x in zip(names, r, strict=True):
            cols[name].append(x)
    return cols


def _finite(columns: dict[str, list]) -> dict[str, list]:
    """``columns`` with every non-finite float replaced by None (a column whose sum is finite has none:
    one C-level pass instead of a check per value)."""
    out = {}
    for name, xs in columns.items():
        try:
            clean = math.isfinite(math.fsum([x for x in xs if x is not None]))
        except (OverflowError, ValueError):  # inf - inf, or finite values summing past the float range
            clean = False
        out[name] = xs if clean else [x if x is None or math.isfinite(x) else None for x in xs]
    return out


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for r in rows:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


SKILL_ERRORS_KEY = "skills/load_errors"
SPAR_ROUNDS_KEY = "skills/spar_rounds"
CAMPAIGN_KEY = "campaign"


@dataclass(frozen=True)
class SparRecord:
    """One sparring round (:mod:`core.skills.sparring`), stored as a ``spar`` event. ``n`` items answered,
    ``correct`` right, ``wrong`` = n - correct, ``accuracy`` = correct / n; ``quest``: the correction quest's
    file name (None when every answer was right: no file); ``examples``: correction examples written (one
    per wrong answer); ``time``: Unix seconds."""

    hero: str
    skill: str
    level: int
    round: int
    n: int
    correct: int
    wrong: int
    accuracy: float
    global_step: int
    checkpoint: str | None
    seed: int
    quest: str | None
    examples: int
    feedback_turn: bool
    duration_seconds: float
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)



@dataclass(frozen=True)
class TrialRecord:
    """One promotion trial (a row of ``trials``). ``accuracy`` = correct / n; ``lower_bound``: Wilson 95%
    lower bound (:func:`core.skills.stats.wilson_lower_bound`); ``samples``: a few answers as
    ``{"prompt", "expected", "answer", "correct"}``; ``time``: Unix seconds (0: now, when recorded)."""

    hero: str
    skill: str
    level: int
    level_after: int
    n: int
    correct: int
    accuracy: float
    lower_bound: float
    threshold: float
    promoted: bool
    global_step: int
    checkpoint: str | None
    seed: int
    duration_seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    time: float = 0.0
    id: int | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TrialRecord:
        return cls(hero=row["hero"], skill=row["skill"], level=row["level"], level_after=row["level_after"],
                   n=row["n"], correct=row["correct"], accuracy=row["accuracy"], lower_bound=row["lower_bound"],
                   threshold=row["threshold"], promoted=bool(row["promoted"]), global_step=row["global_step"],
                   checkpoint=row["checkpoint"], seed=row["seed"], duration_seconds=row["duration_seconds"],
                   samples=json.loads(row["samples_json"]), time=row["time"], id=row["id"])

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
